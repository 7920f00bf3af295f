"""Whether a guest kernel file boots with its address randomised (KASLR).

QEMU boots two kinds of x86 kernel file.  A *bzImage* (Linux x86 boot
protocol, Documentation/arch/x86/boot.rst: the setup header's magic
``HdrS`` at offset 0x202) runs its decompressor first, which picks a
random 2 MiB-aligned physical and virtual address for the kernel when it is
built with ``CONFIG_RANDOMIZE_BASE`` (arch/x86/boot/compressed/kaslr.c).
An ELF *vmlinux* with a PVH note is entered directly at its 64-bit entry
(``-kernel vmlinux``): no decompressor runs, so the kernel always runs at its
link address.  :func:`kaslr_problem` says why a configuration would not get
KASLR; :func:`describe_kaslr` reads the files it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

#: boot.rst, "The real-mode kernel header": ``header`` at 0x202.
_BZIMAGE_MAGIC_OFFSET = 0x202
_BZIMAGE_MAGIC = b"HdrS"
_ELF_MAGIC = b"\x7fELF"
#: Enough of the file for either magic.
HEAD_BYTES = 0x210
#: guest/kernel/build.py keeps the kernel's .config beside it under this name.
BUILD_CONFIG = "config"


def kernel_format(head: bytes) -> str:
    """``bzImage``, ``elf`` or ``unknown``, from the first :data:`HEAD_BYTES` of a kernel file; pure."""
    if head[:4] == _ELF_MAGIC:
        return "elf"
    if head[_BZIMAGE_MAGIC_OFFSET : _BZIMAGE_MAGIC_OFFSET + 4] == _BZIMAGE_MAGIC:
        return "bzImage"
    return "unknown"


def kaslr_problem(kind: str, build_config: str | None, kernel_params: Sequence[str]) -> str | None:
    """Why guests of this kernel would all run it at one address, or None; pure.

    ``build_config`` is the kernel's ``.config`` if known; ``kernel_params``
    the parameters the configuration adds to the command line.
    """
    if kind == "elf":
        return (
            "an ELF vmlinux boots through its PVH entry, which skips the decompressor that "
            "randomises the kernel's address: every VM runs it at the same address (boot the bzImage)"
        )
    if kind != "bzImage":
        return "not a bzImage: cannot tell"
    if "nokaslr" in kernel_params:
        return "hypervisor.kernel_params has nokaslr"
    if build_config is not None and "CONFIG_RANDOMIZE_BASE=y" not in build_config.splitlines():
        return "built without CONFIG_RANDOMIZE_BASE"
    return None


def describe_kaslr(kernel: Path, kernel_params: Sequence[str]) -> str | None:
    """:func:`kaslr_problem` of the kernel file at ``kernel`` (reads it and the build's ``config`` beside it)."""
    try:
        with kernel.open("rb") as file:
            head = file.read(HEAD_BYTES)
    except OSError as exc:
        return f"cannot read {kernel}: {exc.strerror}"
    build_config = None
    with contextlib.suppress(OSError):
        build_config = (kernel.resolve().parent / BUILD_CONFIG).read_text()
    return kaslr_problem(kernel_format(head), build_config, kernel_params)
