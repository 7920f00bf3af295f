"""The pure parts of guest/image/build.py and the guest's /init.

build.py is a stand-alone script (not part of the capsa package), so it is
loaded from its path. Nothing here downloads, runs a guest binary or boots.
"""

from __future__ import annotations

import importlib.util
import io
import re
import stat
import struct
import sys
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest

IMAGE_DIR = Path(__file__).resolve().parents[2] / "guest" / "image"


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capsa_image_build", IMAGE_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


build = _load_build()


# --- package resolution and keys ------------------------------------------

_CRUN = "http://deb.debian.org/debian/pool/main/c/crun/crun_1.8.1-1%2bdeb12u1_amd64.deb"
_ZLIB = "http://deb.debian.org/debian/pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb"
PRINT_URIS = (
    f"'{_CRUN}' crun_1.8.1-1+deb12u1_amd64.deb 289288 "
    "SHA256:34bdcf1a097ec34da2e7b77b65fa351134702af775174af22555b16421709c51\n"
    f"'{_ZLIB}' zlib1g_1%3a1.2.13.dfsg-1_amd64.deb 87004 "
    "SHA256:d7dd1d1411fedf27f5e27650a6eff20ef294077b568f4c8c5e51466dc7c08ce4\n"
)


def test_print_uris_are_parsed_into_package_files() -> None:
    debs = build.parse_print_uris("Reading package lists...\n" + PRINT_URIS)
    assert [deb.package for deb in debs] == ["crun", "zlib1g"]
    assert debs[0].size == 289288
    assert debs[1].sha256.startswith("d7dd1d14")
    assert build._version_of(debs[1]) == "1:1.2.13.dfsg-1"


def test_base_key_follows_the_package_files() -> None:
    debs = build.parse_print_uris(PRINT_URIS)
    updated = [debs[0], build.Deb(debs[1].url, debs[1].filename, debs[1].size, "0" * 64)]
    assert build.base_key(debs) == build.base_key(list(debs))
    assert build.base_key(debs) != build.base_key(updated)


def test_image_key_follows_content_and_format() -> None:
    def key(base: str, files: dict[str, bytes], image_format: object = build.Format.INITRD) -> str:
        result: str = build.image_key(base, files, image_format=image_format, compression=build.Compression.NONE)
        return result

    files = {"capsa/capsa/__init__.py": b"x = 1\n", "init": b"#!/bin/true\n"}
    assert key("b", files) == key("b", dict(files))
    assert key("b", files) != key("b", {**files, "capsa/capsa/__init__.py": b"x = 2\n"})
    assert key("b", files) != key("b", files, build.Format.EROFS)
    assert key("b", files) != key("b2", files)


# --- what the standard library keeps ---------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "asyncio/base_events.py",
        "json/__init__.py",
        "subprocess.py",
        "ctypes/__init__.py",
        "encodings/utf_8.py",
        "lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so",
        "unittest/mock.py",  # pyroute2 imports it
    ],
)
def test_the_agent_needs_are_kept(path: str) -> None:
    assert build.keep_stdlib_entry(PurePosixPath(path))


@pytest.mark.parametrize(
    "path",
    [
        "test/test_os.py",
        "idlelib/idle.py",
        "lib2to3/main.py",
        "pydoc_data/topics.py",
        "distutils/core.py",
        "config-3.11-x86_64-linux-gnu/Makefile",
        "ssl.py",
        "asyncio/__pycache__/events.cpython-311.pyc",
        "lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so",
    ],
)
def test_dead_weight_is_dropped(path: str) -> None:
    assert not build.keep_stdlib_entry(PurePosixPath(path))


# --- ELF dynamic section ----------------------------------------------------


def make_elf(needed: list[str], interpreter: str | None = None, vaddr: int = 0x400000) -> bytes:
    """A minimal ELF64 file: one PT_LOAD mapping the whole file at ``vaddr``,
    an optional PT_INTERP, and a PT_DYNAMIC with DT_NEEDED + DT_STRTAB."""
    phnum = 2 + (interpreter is not None)
    phoff = 64
    body_offset = phoff + 56 * phnum
    strtab = b"\0"
    offsets = []
    for name in needed:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    interp = (interpreter.encode() + b"\0") if interpreter else b""
    interp_offset = body_offset
    strtab_offset = interp_offset + len(interp)
    dynamic_offset = strtab_offset + len(strtab) + (-(strtab_offset + len(strtab)) % 8)
    dynamic = b"".join(struct.pack("<qQ", 1, offset) for offset in offsets)
    dynamic += struct.pack("<qQ", 5, vaddr + strtab_offset) + struct.pack("<qQ", 0, 0)
    size = dynamic_offset + len(dynamic)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr, vaddr, size, size, 0x1000)
    if interpreter is not None:
        phdrs += struct.pack("<IIQQQQQQ", 3, 4, interp_offset, 0, 0, len(interp), len(interp), 1)
    phdrs += struct.pack("<IIQQQQQQ", 2, 6, dynamic_offset, 0, 0, len(dynamic), len(dynamic), 8)
    data = header + phdrs + interp + strtab
    data += b"\0" * (dynamic_offset - len(data)) + dynamic
    assert len(data) == size
    return data


def test_elf_dynamic_reads_interpreter_and_needed() -> None:
    elf = make_elf(["libz.so.1", "libc.so.6"], "/lib64/ld-linux-x86-64.so.2")
    assert build.elf_dynamic(elf) == build.ElfDynamic("/lib64/ld-linux-x86-64.so.2", ("libz.so.1", "libc.so.6"))


def test_elf_dynamic_of_a_static_file_needs_nothing() -> None:
    elf = make_elf([])
    assert build.elf_dynamic(elf).needed == ()


def test_elf_dynamic_of_a_real_binary() -> None:
    true = Path("/bin/true")
    if not true.exists() or not build.is_elf(true.read_bytes()[:4]):
        pytest.skip("no ELF /bin/true on this host")
    dynamic = build.elf_dynamic(true.read_bytes())
    assert "libc.so.6" in dynamic.needed
    assert dynamic.interpreter is not None and dynamic.interpreter.startswith("/lib")


def test_elf_dynamic_rejects_other_files() -> None:
    with pytest.raises(build.ImageBuildError):
        build.elf_dynamic(b"#!/bin/sh\n" + b"\0" * 64)


# --- library closure over a fake extracted tree ----------------------------


def _tree(tmp_path: Path) -> Path:
    lib = tmp_path / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir()
    (tmp_path / "usr/lib64").mkdir()
    (tmp_path / "lib64").symlink_to("usr/lib64")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr/lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (lib / "ld-linux-x86-64.so.2").write_bytes(make_elf([]))
    (lib / "libc.so.6").write_bytes(make_elf(["ld-linux-x86-64.so.2"]))
    (lib / "libfoo.so.1.2.3").write_bytes(make_elf(["libc.so.6"]))
    (lib / "libfoo.so.1").symlink_to("libfoo.so.1.2.3")
    (lib / "libunused.so.1").write_bytes(make_elf(["libc.so.6"]))
    (tmp_path / "usr/bin/tool").write_bytes(make_elf(["libfoo.so.1"], "/lib64/ld-linux-x86-64.so.2"))
    return tmp_path


def test_library_closure_follows_needed_and_links(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    chosen = build.close_over_libraries(tree, [PurePosixPath("usr/bin/tool")])
    assert {str(path) for path in chosen} == {
        "usr/bin/tool",
        "usr/lib64/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/x86_64-linux-gnu/libfoo.so.1",
        "usr/lib/x86_64-linux-gnu/libfoo.so.1.2.3",
    }


def test_a_missing_library_names_itself(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "usr/bin/other").write_bytes(make_elf(["libmissing.so.9"]))
    with pytest.raises(build.ImageBuildError, match=r"usr/bin/other needs libmissing\.so\.9"):
        build.close_over_libraries(tree, [PurePosixPath("usr/bin/other")])


def test_overlay_libraries_are_checked_against_the_base(tmp_path: Path) -> None:
    base = _tree(tmp_path / "base")
    overlay = tmp_path / "overlay"
    (overlay / "site").mkdir(parents=True)
    (overlay / "site/ok.so").write_bytes(make_elf(["libfoo.so.1"]))
    (overlay / "site/bad.so").write_bytes(make_elf(["libstdc++.so.6"]))
    build.close_over_libraries(overlay, [PurePosixPath("site/ok.so")], provided=base)
    with pytest.raises(build.ImageBuildError, match=r"libstdc\+\+\.so\.6"):
        build.close_over_libraries(overlay, [PurePosixPath("site/bad.so")], provided=base)


def test_resolve_in_root_treats_absolute_links_as_inside_the_root(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    resolved = build.resolve_in_root(tree, PurePosixPath("lib64/ld-linux-x86-64.so.2"))
    assert resolved == PurePosixPath("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert build.resolve_in_root(tree, PurePosixPath("lib64/nothing")) is None


# --- newc cpio ---------------------------------------------------------------


def parse_newc(data: bytes) -> list[dict[str, object]]:
    """A reader written from the format description, independent of the writer."""
    entries: list[dict[str, object]] = []
    offset = 0
    while True:
        assert offset % 4 == 0
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[data_start : data_start + filesize]
        offset = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert offset == len(data)
            return entries
        entries.append(
            {"name": name, "mode": fields[1], "uid": fields[2], "nlink": fields[4], "rdev": (fields[9], fields[10])}
            | {"data": body, "ino": fields[0]}
        )


def test_cpio_round_trip() -> None:
    buffer = io.BytesIO()
    writer = build.CpioWriter(buffer)
    writer.directory("dev")
    writer.device(build.DeviceNode("dev/console", 0o600, 5, 1))
    writer.file("init", b"#!/usr/bin/python3.11 -SIB\n", 0o755)
    writer.symlink("lib", "usr/lib")
    writer.close()
    entries = parse_newc(buffer.getvalue())
    assert [entry["name"] for entry in entries] == ["dev", "dev/console", "init", "lib"]
    dev, console, init, lib = entries
    assert dev["mode"] == stat.S_IFDIR | 0o755
    assert console["mode"] == stat.S_IFCHR | 0o600 and console["rdev"] == (5, 1)
    assert init["data"] == b"#!/usr/bin/python3.11 -SIB\n" and init["mode"] == stat.S_IFREG | 0o755
    assert lib["data"] == b"usr/lib" and stat.S_ISLNK(int(str(lib["mode"])))
    assert all(entry["uid"] == 0 for entry in entries)
    # Distinct inode numbers: the kernel treats equal (ino, nlink>1) as hard links.
    assert len({entry["ino"] for entry in entries}) == len(entries)


def test_cpio_tree_puts_parents_first_and_skips_existing_dirs(tmp_path: Path) -> None:
    root = tmp_path / "overlay"
    (root / "usr/lib/capsa").mkdir(parents=True)
    (root / "usr/lib/capsa/x.py").write_text("x = 1\n")
    existing = tmp_path / "base"
    (existing / "usr/lib").mkdir(parents=True)
    buffer = io.BytesIO()
    writer = build.CpioWriter(buffer)
    writer.tree(root, existing=existing)
    writer.close()
    assert [entry["name"] for entry in parse_newc(buffer.getvalue())] == ["usr/lib/capsa", "usr/lib/capsa/x.py"]


@pytest.mark.parametrize("compression", list(build.Compression))
@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 1001])
def test_segments_are_padded_for_concatenation(compression: object, length: int) -> None:
    padding = build.segment_padding(compression, length)
    assert set(padding) <= {0}
    assert (length + len(padding)) % 4 == 0
    if compression is build.Compression.LZ4:
        assert len(padding) >= 4  # unlz4 stops at a zero chunk size


# --- the guest's /init -------------------------------------------------------


def test_init_shebang_is_one_interpreter_argument() -> None:
    text = (IMAGE_DIR / "init").read_text()
    shebang = text.splitlines()[0]
    assert shebang == "#!/usr/bin/python3.11 -SIB"
    # binfmt_script passes one optional argument: the flags must be one word.
    assert len(shebang[2:].split()) == 2
    compile(text, "init", "exec")


def test_init_puts_the_image_site_on_the_path() -> None:
    text = (IMAGE_DIR / "init").read_text()
    assert f'SITE = "/{build.SITE}"' in text
    assert f'MODULES = "/{build.MODULES}"' in text
    assert "from capsa.agent.main import main" in text


def _base_with_python(tmp_path: Path) -> Path:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/python3.11").write_bytes(b"")
    (tmp_path / "bin").symlink_to("usr/bin")
    return tmp_path


def test_the_real_init_passes_the_check(tmp_path: Path) -> None:
    build.check_init((IMAGE_DIR / "init").read_bytes(), _base_with_python(tmp_path))


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (b"import os\n", "must start with a #!"),
        (b"#!/bin/sh\necho\n", "/bin/sh, which the image does not have"),
        (b"#!/usr/bin/python3.11 -SIB\nraise SystemExit(\n", "/init line"),
    ],
)
def test_an_init_the_guest_cannot_run_is_refused(tmp_path: Path, init: bytes, message: str) -> None:
    with pytest.raises(build.ImageBuildError, match=re.escape(message)):
        build.check_init(init, _base_with_python(tmp_path))
