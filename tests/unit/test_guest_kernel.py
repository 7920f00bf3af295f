"""Whether a guest kernel file boots with KASLR: its format, its build config, the command line."""

from __future__ import annotations

from pathlib import Path

from capsa.hypervisor.guest_kernel import describe_kaslr, kaslr_problem, kernel_format


def bzimage_head() -> bytes:
    head = bytearray(0x210)
    head[0x202:0x206] = b"HdrS"
    return bytes(head)


def test_format_from_the_first_bytes() -> None:
    assert kernel_format(bzimage_head()) == "bzImage"
    assert kernel_format(b"\x7fELF\x02\x01" + bytes(0x200)) == "elf"
    assert kernel_format(bytes(0x210)) == "unknown"
    assert kernel_format(b"") == "unknown"


def test_only_a_randomising_bzimage_without_nokaslr_passes() -> None:
    assert kaslr_problem("bzImage", "CONFIG_RELOCATABLE=y\nCONFIG_RANDOMIZE_BASE=y\n", ()) is None
    assert kaslr_problem("bzImage", None, ("quiet",)) is None  # a kernel of unknown build (Debian's)
    problem = kaslr_problem("elf", "CONFIG_RANDOMIZE_BASE=y\n", ())
    assert problem is not None and "PVH" in problem
    assert kaslr_problem("bzImage", "CONFIG_RANDOMIZE_BASE=y\n", ("nokaslr",)) == "hypervisor.kernel_params has nokaslr"
    assert kaslr_problem("bzImage", "# CONFIG_RANDOMIZE_BASE is not set\n", ()) == "built without CONFIG_RANDOMIZE_BASE"
    assert kaslr_problem("unknown", None, ()) is not None


def test_reads_the_build_config_beside_the_linked_kernel(tmp_path: Path) -> None:
    build = tmp_path / "cache" / "0123"
    build.mkdir(parents=True)
    (build / "bzImage").write_bytes(bzimage_head())
    (build / "config").write_text("# CONFIG_RANDOMIZE_BASE is not set\n")
    link = tmp_path / "bzImage"
    link.symlink_to(build / "bzImage")
    assert describe_kaslr(link, ()) == "built without CONFIG_RANDOMIZE_BASE"
    (build / "config").write_text("CONFIG_RANDOMIZE_BASE=y\n")
    assert describe_kaslr(link, ()) is None
    missing = describe_kaslr(tmp_path / "nope", ())
    assert missing is not None and "cannot read" in missing
