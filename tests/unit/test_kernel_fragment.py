"""The guest kernel fragment and the pure parts of guest/kernel/build.py.

build.py is a stand-alone script (not part of the capsa package), so it is
loaded from its path.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

KERNEL_DIR = Path(__file__).resolve().parents[2] / "guest" / "kernel"


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capsa_kernel_build", KERNEL_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


build = _load_build()


@pytest.fixture(scope="module")
def fragment() -> dict[str, str | None]:
    result: dict[str, str | None] = build.parse_fragment((KERNEL_DIR / "capsa.config").read_text())
    return result


def test_fragment_builds_no_modules(fragment: dict[str, str | None]) -> None:
    assert fragment["CONFIG_MODULES"] is None
    assert "m" not in fragment.values()


@pytest.mark.parametrize(
    "symbol",
    [
        "CONFIG_PVH",
        "CONFIG_VIRTIO_PCI",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_VIRTIO_FS",
        "CONFIG_NET_9P_VIRTIO",
        "CONFIG_OVERLAY_FS",
        "CONFIG_CGROUP_BPF",
        "CONFIG_SECCOMP_FILTER",
        "CONFIG_BLK_DEV_INITRD",
        "CONFIG_ACPI",
    ],
)
def test_fragment_builds_in_what_the_guest_needs(fragment: dict[str, str | None], symbol: str) -> None:
    assert fragment[symbol] == "y"


def test_fragment_rejects_duplicates() -> None:
    with pytest.raises(build.KernelBuildError, match="set twice"):
        build.parse_fragment("CONFIG_A=y\n# CONFIG_A is not set\n")


def test_fragment_rejects_modules() -> None:
    with pytest.raises(build.KernelBuildError, match="=m"):
        build.parse_fragment("CONFIG_VIRTIO_NET=m\n")


def test_fragment_rejects_garbage() -> None:
    with pytest.raises(build.KernelBuildError, match="line 2"):
        build.parse_fragment("CONFIG_A=y\nVIRTIO=y\n")


def test_fragment_values_and_comments() -> None:
    text = '# a comment\n\nCONFIG_NR_CPUS=64\nCONFIG_LOCALVERSION="-x"\n# CONFIG_VT is not set\n'
    parsed = build.parse_fragment(text)
    assert parsed == {"CONFIG_NR_CPUS": "64", "CONFIG_LOCALVERSION": '"-x"', "CONFIG_VT": None}


def test_unmet_symbols_reports_dropped_and_unwanted() -> None:
    fragment = {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": "64", "CONFIG_D": "y"}
    config = build.parse_config("CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=32\n# CONFIG_D is not set\n")
    unmet = build.unmet_symbols(fragment, config)
    assert [str(item) for item in unmet] == [
        "CONFIG_B: wanted not set, got y",
        "CONFIG_C: wanted 64, got 32",
        "CONFIG_D: wanted y, got not set",
    ]


def test_cache_key_tracks_every_input() -> None:
    base = build.cache_key({"CONFIG_A": "y"}, "6.1.1-1", 1)
    assert base == build.cache_key({"CONFIG_A": "y"}, "6.1.1-1", 1)
    assert base != build.cache_key({"CONFIG_A": None}, "6.1.1-1", 1)
    assert base != build.cache_key({"CONFIG_A": "y", "CONFIG_B": "y"}, "6.1.1-1", 1)
    assert base != build.cache_key({"CONFIG_A": "y"}, "6.1.1-2", 1)
    assert base != build.cache_key({"CONFIG_A": "y"}, "6.1.1-1", 2)


def test_cache_key_ignores_comments_and_order() -> None:
    one = build.parse_fragment("# why\nCONFIG_A=y\n# CONFIG_B is not set\n")
    two = build.parse_fragment("# CONFIG_B is not set\n\n# another reason\nCONFIG_A=y\n")
    assert build.cache_key(one, "6.1.1-1") == build.cache_key(two, "6.1.1-1")


def _elf_with_note(name: bytes, n_type: int, desc: bytes) -> bytes:
    """A minimal ELF64 LE image: header, one PT_NOTE program header, a note."""
    padded_name = name + b"\0" * (-len(name) % 4)
    note = struct.pack("<III", len(name), len(desc), n_type) + padded_name + desc
    phoff, note_offset = 64, 64 + 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    program_header = struct.pack("<IIQQQQQQ", 4, 0, note_offset, 0, 0, len(note), len(note), 4)
    return bytes(header) + program_header + note


def test_pvh_entry_found() -> None:
    assert build.pvh_entry(_elf_with_note(b"Xen\0", 18, struct.pack("<I", 0x1000370))) == 0x1000370


def test_pvh_entry_absent() -> None:
    assert build.pvh_entry(_elf_with_note(b"GNU\0", 3, b"\0" * 20)) is None
    assert build.pvh_entry(b"MZ not an elf") is None


def test_module_closure_adds_dependencies_first() -> None:
    deps = build.parse_modules_dep(
        "kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n"
        "kernel/sound/unrelated.ko:\n"
    )
    order = build.module_closure(deps, ["fs/9p/", "net/9p/"])
    assert set(order) == {
        "kernel/fs/9p/9p.ko",
        "kernel/fs/netfs/netfs.ko",
        "kernel/net/9p/9pnet.ko",
        "kernel/net/9p/9pnet_virtio.ko",
    }
    for module, needs in deps.items():
        if module in order:
            assert all(order.index(need) < order.index(module) for need in needs)


def test_cloud_image_package_from_apt_show() -> None:
    shown = (
        "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n"
    )
    assert build.cloud_image_package(shown) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")


# --- progress of make -------------------------------------------------------

OBJ = Path("/var/cache/capsa/kernel/obj-6.1.192-3")
SRC = Path("/var/cache/capsa/kernel/src-6.1.192-3")


@pytest.mark.parametrize(
    ("line", "step"),
    [
        ("  CC      fs/namei.o\n", "CC fs/namei.o"),
        ("  AR      drivers/built-in.a\n", "AR drivers/built-in.a"),
        ("  DESCEND objtool\n", "DESCEND objtool"),
        ("  HOSTCC  scripts/basic/fixdep\n", "HOSTCC scripts/basic/fixdep"),
        ("  VDSO2C  arch/x86/entry/vdso/vdso-image-64.c\n", "VDSO2C arch/x86/entry/vdso/vdso-image-64.c"),
        ("  CC [M]  fs/fuse/virtio_fs.o\n", "CC [M] fs/fuse/virtio_fs.o"),
        # objtool's own build, and scripts run from the source tree, print absolute paths.
        (f"  CC      {OBJ}/tools/objtool/exec-cmd.o\n", "CC tools/objtool/exec-cmd.o"),
        (f"  CALL    {SRC}/scripts/checksyscalls.sh\n", "CALL scripts/checksyscalls.sh"),
    ],
)
def test_parse_kbuild_step(line: str, step: str) -> None:
    parsed = build.parse_kbuild_step(line, (OBJ, SRC))
    assert parsed is not None and str(parsed) == step


@pytest.mark.parametrize(
    "line",
    [
        "make[1]: Entering directory '/var/cache/capsa/kernel/obj-6.1.192-3'\n",
        "#\n",
        "# configuration written to .config\n",
        "fs/namei.c: In function 'link_path_walk':\n",
        "fs/namei.c:2283:13: warning: unused variable 'x' [-Wunused-variable]\n",
        " 2283 |         int x;\n",
        "      |             ^\n",
        "Kernel: arch/x86/boot/bzImage is ready  (#1)\n",
        "  Kernel: arch/x86/boot/bzImage is ready  (#1)\n",
        "make: *** [Makefile:1992: fs] Error 2\n",
        "\n",
    ],
)
def test_parse_kbuild_step_ignores_what_is_not_a_step(line: str) -> None:
    assert build.parse_kbuild_step(line, (OBJ, SRC)) is None


def test_make_estimate_without_a_record_counts_against_a_fresh_build() -> None:
    estimate = build.MakeEstimate()
    for n in range(210):
        estimate.add(build.KbuildStep("CC", f"f{n}.o"))
    assert estimate.fraction == pytest.approx(210 / build.FRESH_BUILD_STEPS)


def test_make_estimate_follows_the_recorded_order_through_an_incremental_build() -> None:
    previous = [f"CC f{n}.o" for n in range(1000)]
    estimate = build.MakeEstimate(previous)
    # An incremental build redoes a few files here and there: how far make
    # has walked, not how many it redid, says how far it is.
    estimate.add(build.KbuildStep("CC", "f99.o"))
    assert estimate.fraction == pytest.approx(0.1)
    estimate.add(build.KbuildStep("CC", "f499.o"))
    estimate.add(build.KbuildStep("CC", "f300.o"))  # -j: a slower job prints late
    estimate.add(build.KbuildStep("GEN", "new.h"))  # not in the record
    assert estimate.fraction == pytest.approx(0.5)
    assert estimate.steps == ["CC f99.o", "CC f499.o", "CC f300.o", "GEN new.h"]


def test_make_estimate_stops_short_of_done() -> None:
    estimate = build.MakeEstimate(["CC a.o", "LD vmlinux"])
    for step in (build.KbuildStep("CC", "a.o"), build.KbuildStep("LD", "vmlinux"), build.KbuildStep("CC", "b.o")):
        estimate.add(step)
    assert estimate.fraction == build.MAX_ESTIMATE
