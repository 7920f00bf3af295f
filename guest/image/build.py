#!/usr/bin/env python3
"""Build the capsa guest image: Debian 12's Python and crun, protobuf, pyroute2, the agent.

The guest runs no distribution: its root filesystem is assembled from Debian
binary packages without a chroot, a package manager or a running guest, in
two cached stages under ``$CAPSA_CACHE_DIR/image/`` (default
``/var/cache/capsa``):

1. **base** (``base-<key>/``): ``apt-get download`` of :data:`PACKAGES`,
   ``dpkg-deb -x`` of each, the usr-merge applied, then a *selection* copied
   out: the interpreter, crun, the standard library minus what the agent can
   never use (:data:`STDLIB_DROP`), and exactly the shared libraries those
   ELF files need (a ``DT_NEEDED`` walk, so a library missing from the
   package list is an error, and a package that contributes nothing is
   reported). The standard library is byte-compiled by the *guest's own*
   interpreter (run on the host through the extracted ``ld.so``) with
   ``--invalidation-mode unchecked-hash`` into legacy ``.pyc`` files that
   replace the sources. The base is also kept as compressed cpio segments.
   Its key hashes the resolved package files (name and SHA-256 from the
   archive) and the recipe: :data:`BASE_RECIPE_VERSION` and the selection
   rules.
2. **image** (``<key>/``): the capsa package from this repository, the
   protobuf wheel of the version installed on the host, the pyroute2 wheel
   of :data:`PYROUTE2`, ``/init``
   (``init`` beside this script), optionally cloud-kernel modules; compiled
   the same way, then either appended as a second cpio archive to the
   cached base segment (``initrd.img``; the kernel unpacks concatenated
   archives, buffer-format.rst) or laid over a copy of the base and made
   into an erofs image (``rootfs.img``). Its key adds the content of every
   input, so an agent change rebuilds only this stage, in about a second.

The result is linked, atomically, from ``$CAPSA_GUEST_DIR/initrd.img`` (or
``rootfs.img``; default ``/var/lib/capsa/guest``). Concurrent runs serialise
on a lock; artefacts appear by ``rename(2)`` of finished files or
directories, so a failed or killed run leaves nothing half-written where
readers look. Old stage-2 builds beyond the newest few are removed.

Stand-alone and standard-library only (it runs before capsa is importable
anywhere), so its one exception type, :class:`ImageBuildError`, is local
(it derives from ``buildcache.BuildError``, which commands that fail raise;
``guest/buildcache.py`` holds the locking and publishing shared with the
kernel builder).
Needs root (the downloaded packages are unpacked as root-owned files, and an
erofs image needs device nodes) and the host tools apt-get, dpkg-deb, pip,
plus lz4, zstd or mkfs.erofs for those formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

# Run as a script: guest/, home of the shared buildcache and buildreport modules, is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import buildcache
import buildreport

# --------------------------------------------------------------------------
# The recipe: what goes into the image. Everything here is part of a cache key.
# --------------------------------------------------------------------------

#: Bump when stage 1 makes a different base from the same inputs and rules
#: (layout, compile flags, segment format): it is part of the base key.
BASE_RECIPE_VERSION = 1
#: Bump when stage 2 changes for the same inputs: part of the image key.
IMAGE_RECIPE_VERSION = 3

PYTHON = "python3.11"
STDLIB = PurePosixPath("usr/lib/python3.11")
#: Where the capsa package and protobuf live in the guest; /init puts it on
#: sys.path (the interpreter runs with -S, so no site-packages is scanned).
SITE = PurePosixPath("usr/lib/capsa/python")
#: Where --modules puts a /lib/modules tree; /init loads what it lists.
MODULES = PurePosixPath("usr/lib/modules")
MULTIARCH_LIB = PurePosixPath("usr/lib/x86_64-linux-gnu")
#: Where ld.so looks when neither a cache nor RUNPATH says otherwise: the
#: multiarch directories are Debian's compiled-in system search path.
LIBRARY_DIRS = (MULTIARCH_LIB, PurePosixPath("usr/lib"))

#: Debian 12 binary packages the base is made from. Roots: the interpreter
#: (python3.11-minimal + libpython3.11-minimal/-stdlib) and crun; the rest
#: are the shared libraries that the kept ELF files need, which the
#: DT_NEEDED walk checks: it fails naming a library no package provides.
PACKAGES: tuple[str, ...] = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "crun",
    "libc6",
    "libgcc-s1",  # see EXTRA_LIBRARIES
    "libstdc++6",  # see EXTRA_LIBRARIES
    "zlib1g",
    "libexpat1",
    "libffi8",  # _ctypes
    "libbz2-1.0",  # _bz2
    "liblzma5",  # _lzma, libsystemd
    "libuuid1",  # _uuid
    "libcap2",  # crun
    "libseccomp2",  # crun
    "libyajl2",  # crun
    "libsystemd0",  # crun (sd-bus for the systemd cgroup manager, unused here)
    "libzstd1",  # libsystemd
    "liblz4-1",  # libsystemd
    "libgcrypt20",  # libsystemd
    "libgpg-error0",  # libgcrypt
)

#: Executables kept from the packages; their libraries follow by DT_NEEDED.
EXECUTABLES: tuple[PurePosixPath, ...] = (PurePosixPath("usr/bin") / PYTHON, PurePosixPath("usr/bin/crun"))

#: Libraries kept although nothing in the base links them: glibc dlopen(3)s
#: libgcc_s for pthread_exit/pthread_cancel unwinding; protobuf's C++ upb
#: extension (added in stage 2, which checks it against the base) links
#: libstdc++.
EXTRA_LIBRARIES: tuple[str, ...] = ("libgcc_s.so.1", "libstdc++.so.6")

#: Top-level entries of the standard library the agent never imports: test
#: suites, GUIs and IDEs, packaging tools, documentation data, and modules
#: whose C parts need libraries we do not ship (sqlite3, curses, dbm, nis).
#: ``unittest`` stays: pyroute2's rtnetlink socket module imports
#: ``unittest.mock`` (and calls ``Mock()``) at import time.
STDLIB_DROP: frozenset[str] = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "turtle.py",
        "ensurepip",
        "venv",
        "lib2to3",
        "pydoc_data",
        "pydoc.py",
        "distutils",
        "_distutils_system_mod.py",
        "sqlite3",
        "curses",
        "dbm",
        "crypt.py",
        "ssl.py",  # its _ssl is left out, see EXTENSION_DROP
        "site-packages",
        "dist-packages",
        "sitecustomize.py",  # a link to /etc/python3.11 (site is not run)
        "EXTERNALLY-MANAGED",
        "LICENSE.txt",
        "__phello__",
        "__hello__.py",
        "antigravity.py",
        "this.py",
        "_aix_support.py",
        "_osx_support.py",
    }
)
#: Glob-style prefixes of further top-level entries to drop.
STDLIB_DROP_PREFIXES: tuple[str, ...] = ("config-3.11-",)

#: C extension modules (lib-dynload, by module name) left out: test modules,
#: and those for the dropped packages above or whose library we do not ship.
#: _ssl and _hashlib are dropped too: the agent speaks no TLS, asyncio imports
#: ssl only if it is there, hashlib falls back to its built-in md5/sha*/blake2,
#: and libcrypto alone would be 4.5 MiB of relocations to process under TCG.
EXTENSION_DROP: frozenset[str] = frozenset(
    {
        "_ctypes_test",
        "_testbuffer",
        "_testcapi",
        "_testclinic",
        "_testimportmultiple",
        "_testinternalcapi",
        "_testmultiphase",
        "_xxtestfuzz",
        "_xxsubinterpreters",
        "xxlimited",
        "xxlimited_35",
        "_curses",
        "_curses_panel",
        "readline",
        "_dbm",
        "_gdbm",
        "_sqlite3",
        "nis",
        "_crypt",
        "ossaudiodev",
        "_ssl",
        "_hashlib",
    }
)

#: Directories the agent mounts on (agent/init.py INIT_MOUNTS) or needs.
SKELETON_DIRS: tuple[str, ...] = ("proc", "sys", "sys/fs/cgroup", "dev", "run", "tmp", "root", "etc", "var")
#: usr-merge: Debian 12 is merged-/usr, and binaries name /lib64/ld-linux-x86-64.so.2.
USR_MERGE: tuple[str, ...] = ("bin", "sbin", "lib", "lib64")
ETC_FILES: Mapping[str, str] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}


@dataclasses.dataclass(frozen=True)
class DeviceNode:
    """A character device node the image must carry itself."""

    path: str
    mode: int
    major: int
    minor: int


#: The kernel opens /dev/console for init's stdin/out/err before anyone can
#: mount devtmpfs (init/main.c console_on_rootfs), so an initramfs without
#: it starts init with no stdio at all. Numbers: devices.txt.
DEVICE_NODES: tuple[DeviceNode, ...] = (
    DeviceNode("dev/console", 0o600, 5, 1),
    DeviceNode("dev/null", 0o666, 1, 3),
)

#: compileall --invalidation-mode unchecked-hash (PEP 552): the importer
#: never stats or reads the source to validate the .pyc.
INVALIDATION_MODE = "unchecked-hash"

#: Stage-2 builds kept besides the one just made (older ones are removed).
KEEP_IMAGES = 4

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init"
#: The repository this script lives in: guest/image/build.py -> src/capsa.
CAPSA_SOURCE = HERE.parents[1] / "src" / "capsa"


class ImageBuildError(buildcache.BuildError):
    """The image cannot be built; the message says why and what to do."""


class Compression(enum.Enum):
    """initramfs compressions our kernel decompresses (CONFIG_RD_*)."""

    NONE = "none"
    GZIP = "gzip"
    LZ4 = "lz4"
    ZSTD = "zstd"


class Format(enum.Enum):
    INITRD = "initrd"
    EROFS = "erofs"


#: Measured fastest to boot under TCG (guest/image/README.md): the kernel
#: copies an uncompressed initramfs instead of decompressing it.
DEFAULT_FORMAT = Format.INITRD
DEFAULT_COMPRESSION = Compression.NONE


# --------------------------------------------------------------------------
# Pure: package resolution, keys.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Deb:
    """One package file as the archive describes it."""

    url: str
    filename: str
    size: int
    sha256: str

    @property
    def package(self) -> str:
        return self.filename.split("_", 1)[0]


_PRINT_URI = re.compile(r"^'(?P<url>[^']+)' (?P<filename>\S+\.deb) (?P<size>\d+) SHA256:(?P<sha256>[0-9a-f]{64})$")


def parse_print_uris(text: str) -> list[Deb]:
    """Parse ``apt-get download --print-uris`` (one ``'URL' FILE SIZE
    SHA256:HEX`` line per package), sorted by file name."""
    debs = []
    for line in text.splitlines():
        match = _PRINT_URI.match(line.strip())
        if match:
            debs.append(Deb(match["url"], match["filename"], int(match["size"]), match["sha256"]))
    return sorted(debs, key=lambda deb: deb.filename)


def _digest(document: object) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def base_key(debs: Sequence[Deb]) -> str:
    """Key of stage 1: the package files and every selection rule."""
    return _digest(
        {
            "recipe": BASE_RECIPE_VERSION,
            "debs": [[deb.filename, deb.sha256] for deb in debs],
            "executables": [str(path) for path in EXECUTABLES],
            "extra_libraries": list(EXTRA_LIBRARIES),
            "stdlib_drop": sorted(STDLIB_DROP),
            "stdlib_drop_prefixes": list(STDLIB_DROP_PREFIXES),
            "extension_drop": sorted(EXTENSION_DROP),
            "skeleton": [list(SKELETON_DIRS), list(USR_MERGE), dict(ETC_FILES)],
            "devices": [dataclasses.astuple(node) for node in DEVICE_NODES],
            "invalidation": INVALIDATION_MODE,
        }
    )


def image_key(
    base: str,
    files: Mapping[str, bytes],
    *,
    image_format: Format,
    compression: Compression,
) -> str:
    """Key of stage 2: the base, the format and the content of every input
    (``files`` maps a name that says what it is to its bytes' digest)."""
    return _digest(
        {
            "recipe": IMAGE_RECIPE_VERSION,
            "base": base,
            "format": image_format.value,
            "compression": compression.value,
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        }
    )


# --------------------------------------------------------------------------
# Pure: what to keep.
# --------------------------------------------------------------------------


def keep_stdlib_entry(relative: PurePosixPath) -> bool:
    """Whether a path under the standard library directory goes into the image."""
    top = relative.parts[0]
    if top in STDLIB_DROP or top.startswith(STDLIB_DROP_PREFIXES):
        return False
    if "__pycache__" in relative.parts:
        return False
    if top == "lib-dynload" and len(relative.parts) == 2:
        return extension_module_name(relative.name) not in EXTENSION_DROP
    return True


def extension_module_name(filename: str) -> str:
    """``_ssl.cpython-311-x86_64-linux-gnu.so`` -> ``_ssl``."""
    return filename.split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class ElfDynamic:
    """What the dynamic linker needs to start an ELF file (gABI ch. 5)."""

    interpreter: str | None
    needed: tuple[str, ...]


_ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5


def is_elf(head: bytes) -> bool:
    return head.startswith(_ELF_MAGIC)


def elf_dynamic(data: bytes) -> ElfDynamic:
    """Read ``PT_INTERP`` and the ``DT_NEEDED`` entries of an ELF64
    little-endian file (System V gABI, "Program Header" and "Dynamic
    Section"). Program headers only: section headers may be stripped.
    ``DT_STRTAB`` is a virtual address, mapped to a file offset through the
    ``PT_LOAD`` segment that contains it."""
    if not is_elf(data) or len(data) < 64:
        raise ImageBuildError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ImageBuildError("not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    interpreter: str | None = None
    for index in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * phentsize
        )
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interpreter = data[p_offset : p_offset + p_filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return ElfDynamic(interpreter, ())
    needed_offsets: list[int] = []
    strtab_vaddr: int | None = None
    offset, size = dynamic
    for entry in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, entry)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed_offsets.append(value)
        elif tag == _DT_STRTAB:
            strtab_vaddr = value
    if strtab_vaddr is None:
        raise ImageBuildError("ELF dynamic section has no DT_STRTAB")
    for vaddr, file_offset, filesz in loads:
        if vaddr <= strtab_vaddr < vaddr + filesz:
            strtab = file_offset + strtab_vaddr - vaddr
            break
    else:
        raise ImageBuildError("ELF DT_STRTAB lies outside every PT_LOAD segment")
    needed = tuple(data[strtab + name : data.index(b"\0", strtab + name)].decode() for name in needed_offsets)
    return ElfDynamic(interpreter, needed)


# --------------------------------------------------------------------------
# Pure: the newc cpio format (kernel Documentation/driver-api/early-userspace/
# buffer-format.rst; cpio(5) "New ASCII Format").
# --------------------------------------------------------------------------

CPIO_MAGIC = b"070701"
CPIO_TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_entry(
    name: str,
    mode: int,
    data: bytes = b"",
    *,
    ino: int,
    nlink: int = 1,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """One newc record: 110-byte header of 13 eight-digit hex fields
    (ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    rdevminor namesize check), the NUL-terminated name, padding to 4,
    the data, padding to 4. Owner root, mtime 0: reproducible images."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = CPIO_MAGIC + b"".join(b"%08X" % field for field in fields)
    return header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))


class CpioWriter:
    """Write a newc archive entry by entry; :meth:`close` adds the trailer.

    Parents must come before their children: the kernel creates each entry
    as it reads it (init/initramfs.c).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._ino = 0
        self.entries = 0

    def _write(
        self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        self.entries += 1
        self._stream.write(cpio_entry(name, mode, data, ino=self._ino, nlink=nlink, rdev=rdev))

    def directory(self, name: str, permissions: int = 0o755) -> None:
        self._write(name, stat.S_IFDIR | permissions, nlink=2)

    def file(self, name: str, data: bytes, permissions: int = 0o644) -> None:
        self._write(name, stat.S_IFREG | permissions, data)

    def symlink(self, name: str, target: str) -> None:
        self._write(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, node: DeviceNode) -> None:
        self._write(node.path, stat.S_IFCHR | node.mode, rdev=(node.major, node.minor))

    def tree(self, root: Path, *, existing: Path | None = None) -> None:
        """Everything under ``root`` (not ``root`` itself), parents first,
        sorted. Permission bits are kept; owners are not. Directories that
        exist under ``existing`` (an archive unpacked before this one) are
        left out: the kernel would merely ignore them (do_name: EEXIST)."""
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            base = Path(directory)
            relative = base.relative_to(root).as_posix()
            for name in sorted([*subdirs, *files]):
                path = base / name
                entry = name if relative == "." else f"{relative}/{name}"
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    self.symlink(entry, os.readlink(path))
                elif stat.S_ISDIR(info.st_mode):
                    if existing is None or not (existing / entry).is_dir():
                        self.directory(entry, stat.S_IMODE(info.st_mode))
                elif stat.S_ISREG(info.st_mode):
                    self.file(entry, path.read_bytes(), stat.S_IMODE(info.st_mode))
                else:
                    raise ImageBuildError(f"{path}: only files, directories and symlinks go into an image")
            # os.walk does not descend into symlinked directories: good.

    def close(self) -> None:
        self._stream.write(cpio_entry(CPIO_TRAILER, 0, ino=0))


def segment_padding(compression: Compression, length: int) -> bytes:
    """Zeros to put after one archive of a concatenated initramfs.

    The kernel's unpacker (init/initramfs.c unpack_to_rootfs) skips NULs
    between archives and wants each uncompressed one 4-byte aligned in the
    whole buffer. A legacy-lz4 stream has no end marker: its decoder
    (lib/decompress_unlz4.c) reads chunk sizes until a zero one, so it
    needs four zero bytes of its own before anything follows.
    """
    extra = 4 if compression is Compression.LZ4 else 0
    return b"\0" * (extra + (-(length + extra) % 4))


# --------------------------------------------------------------------------
# Shell: processes, files, locks.
# --------------------------------------------------------------------------


def resolve_in_root(root: Path, relative: PurePosixPath) -> PurePosixPath | None:
    """Follow symlinks as the guest would, with ``root`` as ``/``; the
    resolved path relative to ``root``, or None if it does not exist."""
    parts = list(relative.parts)
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:  # the kernel's limit (path_resolution(7))
                return None
            target = PurePosixPath(os.readlink(candidate))
            if target.is_absolute():
                resolved = []
                target = target.relative_to("/")
            parts = list(target.parts) + parts
            continue
        if not candidate.exists() and not candidate.is_symlink():
            return None
        resolved.append(part)
    return PurePosixPath(*resolved)


class Layout(buildcache.Layout):
    """The image's artefacts under ``$CAPSA_CACHE_DIR/image``."""

    @property
    def debs(self) -> Path:
        return self.cache / "debs"

    @property
    def wheels(self) -> Path:
        return self.cache / "wheels"

    def base(self, key: str) -> Path:
        return self.cache / f"base-{key}"

    def image(self, key: str) -> Path:
        return self.cache / key

    def installed(self, image_format: Format) -> Path:
        return self.guest / artefact_name(image_format)


def artefact_name(image_format: Format) -> str:
    return "initrd.img" if image_format is Format.INITRD else "rootfs.img"


# --------------------------------------------------------------------------
# Stage 1: the base.
# --------------------------------------------------------------------------


def resolve_packages() -> list[Deb]:
    try:
        printed = buildcache.run(["apt-get", "download", "--print-uris", *PACKAGES]).decode()
    except buildcache.BuildError as exc:
        raise ImageBuildError(f"{exc}\n(run apt-get update first?)") from exc
    debs = parse_print_uris(printed)
    missing = set(PACKAGES) - {deb.package for deb in debs}
    if missing:
        raise ImageBuildError(f"apt-get printed no file for {', '.join(sorted(missing))}")
    return debs


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_packages(layout: Layout, debs: Sequence[Deb], stages: buildreport.Stages) -> list[Path]:
    """The package files, from the cache or fetched and checked against the
    archive's SHA-256 (apt-get checks it too; the cache may be stale)."""
    layout.debs.mkdir(parents=True, exist_ok=True)
    wanted = [deb for deb in debs if not (layout.debs / deb.filename).exists()]
    if wanted:
        size = sum(deb.size for deb in wanted)
        with (
            tempfile.TemporaryDirectory(dir=layout.debs, prefix=".download-") as scratch,
            stages.progress("download") as progress,
        ):
            # The apt sandbox user cannot write into our private directory;
            # we only download, so fetching as root is acceptable.
            specs = [f"{deb.package}={_version_of(deb)}" for deb in wanted]
            argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", *specs]

            def measure() -> None:
                # What apt-get has written so far, against the sizes the
                # archive announced: apt-get itself says nothing until the end.
                fetched = buildcache.tree_bytes(Path(scratch))
                progress.update(min(fetched / size, 1.0), f"{fetched / 2**20:.1f}/{size / 2**20:.1f} MiB")

            buildcache.run_watched(argv, measure, cwd=Path(scratch))
            for deb in wanted:
                fetched = Path(scratch) / deb.filename
                if not fetched.exists():
                    raise ImageBuildError(f"apt-get download did not produce {deb.filename}")
                fetched.rename(layout.debs / deb.filename)
        stages.say(f"download: fetched {len(wanted)} of {len(debs)} packages")
    paths = []
    for deb in debs:
        path = layout.debs / deb.filename
        if _sha256_file(path) != deb.sha256:
            path.unlink()
            raise ImageBuildError(f"{path}: SHA-256 differs from the archive's; removed, run again")
        paths.append(path)
    return paths


def _version_of(deb: Deb) -> str:
    # pool file names are package_version_arch.deb with the epoch's ':'
    # URL-encoded (%3a).
    return deb.filename.split("_")[1].replace("%3a", ":")


def extract_packages(
    debs: Sequence[Path], into: Path, progress: buildreport.Progress | None = None
) -> dict[PurePosixPath, str]:
    """``dpkg-deb -x`` each package, merge /bin /sbin /lib /lib64 into /usr
    (Debian 12 is usr-merged, but its packages still ship some files under
    /lib), and return which package each regular file or link came from."""
    owner: dict[PurePosixPath, str] = {}
    into.mkdir()
    for deb in debs:
        scratch = into.with_name(f"{into.name}.one")
        buildcache.run(["dpkg-deb", "-x", deb, scratch])
        for top in USR_MERGE:
            if (scratch / top).is_dir() and not (scratch / top).is_symlink():
                _merge_tree(scratch / top, scratch / "usr" / top)
        package = deb.name.split("_", 1)[0]
        for path in _walk_files(scratch):
            relative = PurePosixPath(path.relative_to(scratch).as_posix())
            if relative in owner:
                raise ImageBuildError(f"{relative} is in both {owner[relative]} and {package}")
            owner[relative] = package
        _merge_tree(scratch, into)
        if progress is not None:
            progress.advance(package)
    for top in USR_MERGE:
        (into / "usr" / top).mkdir(parents=True, exist_ok=True)
        (into / top).symlink_to(f"usr/{top}")
    return owner


def _merge_tree(source: Path, target: Path) -> None:
    """Move everything in ``source`` into ``target``, then remove ``source``."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink() and destination.is_dir() and not destination.is_symlink():
            _merge_tree(entry, destination)
        elif destination.exists() or destination.is_symlink():
            raise ImageBuildError(f"{destination} exists twice after the usr-merge")
        else:
            entry.rename(destination)
    source.rmdir()


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files and symlinks under ``root``."""
    for directory, subdirs, files in os.walk(root):
        base = Path(directory)
        for name in files:
            yield base / name
        for name in subdirs:
            if (base / name).is_symlink():
                yield base / name


def select_files(tree: Path, owner: Mapping[PurePosixPath, str]) -> list[PurePosixPath]:
    """What the base keeps of the extracted ``tree``: executables, the pruned
    standard library, and the closure of shared libraries they need,
    including every link on the way to each (libfoo.so.1 -> libfoo.so.1.2)."""
    chosen: set[PurePosixPath] = set(EXECUTABLES)
    chosen |= {path for path in owner if path.is_relative_to(STDLIB) and keep_stdlib_entry(path.relative_to(STDLIB))}
    for name in EXTRA_LIBRARIES:
        chosen.add(_find_library(tree, name, "EXTRA_LIBRARIES"))
    return sorted(close_over_libraries(tree, chosen))


def close_over_libraries(
    tree: Path, roots: Iterable[PurePosixPath], provided: Path | None = None
) -> set[PurePosixPath]:
    """``roots`` plus every file and symlink needed to load each ELF among
    them: interpreter and DT_NEEDED, recursively, looked up in ``provided``
    (default: ``tree`` itself), resolving links as the guest would."""
    lookup = provided if provided is not None else tree
    chosen: set[PurePosixPath] = set()
    pending = list(roots)
    while pending:
        path = _real_parent(tree, pending.pop())
        if path in chosen:
            continue
        chosen.add(path)
        full = tree / path
        if full.is_symlink():
            if resolve_in_root(tree, path) is None:
                raise ImageBuildError(f"{path} is a dangling link")
            pending.append(_link_step(tree, path))
            continue
        with open(full, "rb") as file:
            if not is_elf(file.read(4)):
                continue
        try:
            dynamic = elf_dynamic(full.read_bytes())
        except ImageBuildError as exc:
            raise ImageBuildError(f"{path}: {exc}") from exc
        libraries: list[PurePosixPath] = []
        if dynamic.interpreter is not None:
            libraries.append(PurePosixPath(dynamic.interpreter.lstrip("/")))
        libraries += [_find_library(lookup, name, str(path)) for name in dynamic.needed]
        if lookup is tree:
            pending += libraries
        else:
            for library in libraries:
                if resolve_in_root(lookup, library) is None:
                    raise ImageBuildError(f"{path} needs {library}, which is not in the base")
    return chosen


def _link_step(root: Path, link: PurePosixPath) -> PurePosixPath:
    """The path one symlink points at, relative to ``root``."""
    target = PurePosixPath(os.readlink(root / link))
    return PurePosixPath(str(target).lstrip("/")) if target.is_absolute() else link.parent / target


def _real_parent(root: Path, path: PurePosixPath) -> PurePosixPath:
    """``path`` with symlinks in its directory part resolved (lib64/x ->
    usr/lib64/x), so that copying it creates real directories only."""
    parent = resolve_in_root(root, path.parent)
    if parent is None:
        raise ImageBuildError(f"{path}: its directory does not exist")
    return parent / path.name


def _find_library(tree: Path, soname: str, needed_by: str) -> PurePosixPath:
    for directory in LIBRARY_DIRS:
        candidate = directory / soname
        if (tree / candidate).exists():
            return candidate
    raise ImageBuildError(
        f"{needed_by} needs {soname}, which no package in PACKAGES provides: add its package to the list"
    )


def copy_selection(tree: Path, files: Iterable[PurePosixPath], root: Path) -> None:
    for relative in files:
        source = tree / relative
        destination = root / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            destination.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, destination)


def add_skeleton(root: Path) -> None:
    """usr-merge links, mount points and /etc: what a distribution's base
    files would provide (device nodes are added per format)."""
    for top in USR_MERGE:
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        (root / top).symlink_to(f"usr/{top}")
    for directory in SKELETON_DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    for name, content in ETC_FILES.items():
        (root / name).write_text(content)


def guest_python(root: Path) -> list[str]:
    """argv prefix running the image's own interpreter on the host: through
    its ld.so with its libraries, so no chroot is needed and the bytecode is
    made by exactly the Python that will load it."""
    loader = root / MULTIARCH_LIB / "ld-linux-x86-64.so.2"
    return [str(loader), "--library-path", str(root / MULTIARCH_LIB), str(root / "usr/bin" / PYTHON), "-SIB"]


def python_sources(directory: Path) -> int:
    """How many modules :func:`compile_tree` will compile under ``directory``."""
    return sum(1 for path in _walk_files(directory) if path.suffix == ".py" and not path.is_symlink())


#: What compileall prints (without -q) as it starts on each file.
_COMPILING = "Compiling '"


def compile_tree(
    root: Path,
    directory: PurePosixPath,
    *,
    drop_sources: bool,
    base: Path | None = None,
    progress: buildreport.Progress | None = None,
) -> None:
    """compileall ``root/directory`` with unchecked-hash pycs whose recorded
    file names are the guest's (``-s root -p /``).

    With ``drop_sources`` the .pyc files go beside their sources (``-b``,
    the legacy location the sourceless loader reads) and the sources are
    removed; otherwise they go to __pycache__ and the sources stay, so
    tracebacks can quote them. ``progress`` advances by one per file
    compiled (its total from :func:`python_sources`).
    """
    interpreter = guest_python(base if base is not None else root)
    # -u: the worker processes (-j 0) report each file as they start it,
    # not in one flush when they exit.
    argv = [*interpreter, "-u", "-m", "compileall", "-j", "0", "--invalidation-mode", INVALIDATION_MODE]
    argv += ["-s", str(root), "-p", "/"]
    if drop_sources:
        argv.append("-b")

    def count(line: str) -> None:
        # Counted, not matched per line: unbuffered workers write a line
        # and its newline separately, so two can share a line.
        if progress is not None and _COMPILING in line:
            progress.advance(count=line.count(_COMPILING))

    buildcache.run_lines([*argv, str(root / directory)], count)
    if drop_sources:
        for path in _walk_files(root / directory):
            if path.suffix == ".py" and path.with_suffix(".pyc").exists():
                path.unlink()


def build_base(layout: Layout, *, force: bool, stages: buildreport.Stages) -> tuple[str, Path, bool]:
    """Stage 1; return its key, its directory, and whether it was built now."""
    with stages.step("resolve packages"):
        debs = resolve_packages()
    key = base_key(debs)
    final = layout.base(key)
    if (final / "manifest.json").exists() and not force:
        os.utime(final)  # most recently used: pruning goes by mtime
        return key, final, False
    stages.say(f"base: building {final.name} from {len(debs)} packages")
    with stages.step("download"):
        paths = download_packages(layout, debs, stages)
    with buildcache.staging_dir(final) as scratch:
        tree = scratch / "extracted"
        with stages.step("unpack"), stages.progress("unpack", len(paths)) as progress:
            owner = extract_packages(paths, tree, progress)
        with stages.step("select"):
            files = select_files(tree, owner)
            root = scratch / "root"
            copy_selection(tree, files, root)
            add_skeleton(root)
            contributing = {owner[path] for path in files if path in owner}
            idle = sorted({deb.package for deb in debs} - contributing)
            shutil.rmtree(tree)
        stages.say(f"base: extracted and kept {len(files)} files" + (f" (unused: {', '.join(idle)})" if idle else ""))
        if idle:
            raise ImageBuildError(f"packages that contribute nothing to the image: {', '.join(idle)}")
        modules = python_sources(root / STDLIB)
        with stages.step("compile stdlib"), stages.progress("compile", modules) as progress:
            compile_tree(root, STDLIB, drop_sources=True, progress=progress)
        stages.say(f"base: standard library compiled ({modules} modules)")
        manifest = {
            "key": key,
            "recipe": BASE_RECIPE_VERSION,
            "packages": [{"file": deb.filename, "sha256": deb.sha256} for deb in debs],
            "bytes": (size := _tree_bytes(root)),
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        buildcache.publish(scratch, final, fsync=[scratch / "manifest.json"])
    stages.say(f"base: {size / 2**20:.1f} MiB in {final}")
    return key, final, True


def _tree_bytes(root: Path) -> int:
    return sum(path.lstat().st_size for path in _walk_files(root))


def base_segment(base: Path, compression: Compression, stages: buildreport.Stages) -> Path:
    """The base as one (compressed) cpio archive, padded for concatenation;
    made once per compression and kept beside the base."""
    segment = base / f"root.cpio.{compression.value}"
    if segment.exists():
        return segment
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.tree(base / "root")
    for node in DEVICE_NODES:
        writer.device(node)
    writer.close()
    data = compress(buffer.getvalue(), compression, best=True)
    buildcache.write_atomically(segment, data + segment_padding(compression, len(data)))
    stages.say(f"base: {compression.value} cpio segment, {len(data) / 2**20:.1f} MiB")
    return segment


def compress(data: bytes, compression: Compression, *, best: bool) -> bytes:
    """Compress for the kernel's decompressors (lib/decompress_*.c).

    ``best`` spends time once on the cached base; decompression speed in the
    guest does not depend on the level for these formats."""
    if compression is Compression.NONE:
        return data
    if compression is Compression.GZIP:
        return gzip.compress(data, compresslevel=9 if best else 6, mtime=0)
    if compression is Compression.LZ4:
        # -l: the legacy frame format, the only one the kernel's unlz4 reads.
        return buildcache.run(["lz4", "-l", "-9" if best else "-1", "-c"], stdin=data)
    # One frame (no -T: the decoder stops after the first), window <= 8 MiB.
    return buildcache.run(["zstd", "-19" if best else "-3", "-c", "-q"], stdin=data)


# --------------------------------------------------------------------------
# Stage 2: capsa, protobuf, /init.
# --------------------------------------------------------------------------


def capsa_sources(source: Path = CAPSA_SOURCE) -> dict[str, bytes]:
    """The capsa package's Python files, by path relative to its parent."""
    if not (source / "__init__.py").exists():
        raise ImageBuildError(f"{source} is not the capsa package")
    files = {}
    for path in sorted(source.rglob("*.py")):
        if "__pycache__" not in path.parts:
            files[path.relative_to(source.parent).as_posix()] = path.read_bytes()
    return files


def host_protobuf_version() -> str:
    try:
        return importlib.metadata.version("protobuf")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImageBuildError(f"protobuf is not installed for {sys.executable}: the image carries its version") from exc


#: pyroute2 (DESIGN.md 7: netlink through pyroute2) for UpdateInterface and
#: UpdateRoutes, pinned: the host needs none, and a new release is a change
#: to measure (size, import time) before it goes in.  The ``-minimal``
#: distribution is the same ``pyroute2`` package without NDB, IPDB,
#: nftables, DHCP and the other families the agent never uses: 1.1 MiB of
#: sources instead of 1.8.  Pure Python, so one wheel for every platform.
PYROUTE2 = ("pyroute2-minimal", "0.9.7")


def protobuf_wheel(layout: Layout, version: str, stages: buildreport.Stages) -> Path:
    """The manylinux wheel of exactly the host's protobuf, cached."""
    return fetch_wheel(layout, "protobuf", version, "manylinux*x86_64", stages)


def pyroute2_wheel(layout: Layout, stages: buildreport.Stages) -> Path:
    project, version = PYROUTE2
    return fetch_wheel(layout, project, version, "py3-none-any", stages)


def fetch_wheel(layout: Layout, project: str, version: str, tags: str, stages: buildreport.Stages) -> Path:
    """The wheel of ``project==version`` for the guest (CPython 3.11, x86-64 manylinux), cached.

    ``tags`` is a glob over the wheel's tags (PEP 427 file name) that picks
    the one wanted from what pip downloads.
    """
    layout.wheels.mkdir(parents=True, exist_ok=True)
    # PEP 427: the distribution part of a wheel's name has "-" as "_".
    pattern = f"{project.replace('-', '_')}-{version}-*{tags}*.whl"
    found = sorted(layout.wheels.glob(pattern))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=layout.wheels, prefix=".download-") as scratch:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        wanted = ["--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--no-deps"]
        buildcache.run([*pip, *wanted, "--dest", scratch, f"{project}=={version}"])
        wheels = sorted(Path(scratch).glob(pattern))
        if len(wheels) != 1:
            raise ImageBuildError(f"pip download {project}=={version} gave {[w.name for w in wheels]}")
        final = layout.wheels / wheels[0].name
        wheels[0].rename(final)
    stages.say(f"image: downloaded {final.name}")
    return final


def unpack_wheel(wheel: Path, into: Path) -> None:
    """A wheel is a zip of its install tree (PEP 427); only the importable
    part is kept, not the .dist-info metadata nothing in the guest reads."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            top = member.filename.split("/", 1)[0]
            if top.endswith((".dist-info", ".data")) or member.is_dir():
                continue
            target = into / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
            if member.filename.endswith(".so"):
                target.chmod(0o755)


def check_init(init: bytes, base_root: Path) -> None:
    """Refuse an /init the guest could not run: without it the kernel panics
    ("No working init found") long after this build said it succeeded."""
    first = init.partition(b"\n")[0]
    if not first.startswith(b"#!") or not first[2:].split():
        raise ImageBuildError("/init must start with a #! line naming its interpreter")
    interpreter = first[2:].split()[0].decode()
    if resolve_in_root(base_root, PurePosixPath(interpreter.lstrip("/"))) is None:
        raise ImageBuildError(f"/init wants {interpreter}, which the image does not have")
    if PurePosixPath(interpreter).name.startswith("python"):
        try:
            compile(init, "/init", "exec")
        except SyntaxError as exc:
            raise ImageBuildError(f"/init line {exc.lineno}: {exc.msg}") from exc


def module_files(modules: Path) -> dict[str, bytes]:
    """A ``/lib/modules`` tree (``<release>/...``) as relative path -> bytes."""
    if not modules.is_dir():
        raise ImageBuildError(f"--modules {modules}: not a directory")
    return {
        path.relative_to(modules).as_posix(): path.read_bytes() for path in sorted(modules.rglob("*")) if path.is_file()
    }


def build_overlay(
    base: Path,
    overlay: Path,
    *,
    capsa: Mapping[str, bytes],
    wheels: Sequence[Path],
    init: bytes,
    modules: Mapping[str, bytes],
    stages: buildreport.Stages,
) -> None:
    """Lay out and compile what stage 2 adds, in ``overlay`` (an empty dir)."""
    site = overlay / SITE
    for relative, data in capsa.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(data)
    for wheel in wheels:
        unpack_wheel(wheel, site)
    # capsa keeps its sources (tracebacks from the agent quote them); the
    # wheels' packages (protobuf's google/, pyroute2/), like the standard
    # library, are compiled sourceless.
    with stages.progress("compile", python_sources(site)) as progress:
        compile_tree(overlay, SITE / "capsa", drop_sources=False, base=base / "root", progress=progress)
        for package in sorted(entry.name for entry in site.iterdir() if entry.is_dir() and entry.name != "capsa"):
            compile_tree(overlay, SITE / package, drop_sources=True, base=base / "root", progress=progress)
    elves = [
        PurePosixPath(path.relative_to(overlay).as_posix())
        for path in _walk_files(overlay)
        if path.suffix == ".so" and not path.is_symlink()
    ]
    close_over_libraries(overlay, elves, provided=base / "root")
    (overlay / "init").write_bytes(init)
    (overlay / "init").chmod(0o755)
    for relative, data in modules.items():
        target = overlay / MODULES / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def write_initrd(base: Path, overlay: Path, compression: Compression, output: Path, stages: buildreport.Stages) -> None:
    """Cached base segment + the overlay as a second archive (compressed the
    same way, quickly): the kernel unpacks both into one rootfs."""
    segment = base_segment(base, compression, stages)
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.tree(overlay, existing=base / "root")
    writer.close()
    tail = compress(buffer.getvalue(), compression, best=False)
    with open(output, "wb") as out, open(segment, "rb") as head:
        shutil.copyfileobj(head, out, 1 << 20)
        out.write(tail)


#: A virtio-pmem region's size must be a multiple of this: the guest's memory
#: block, so that DIMMs hot-plugged after it stay aligned (capsa.hypervisor.qemu).
#: The padding is a hole: it costs no disk and no page cache.
PMEM_ALIGN = 128 << 20


def write_erofs(base: Path, overlay: Path, output: Path, key: str) -> None:
    """An uncompressed erofs image with 4 KiB blocks, padded (sparse) to
    128 MiB for virtio-pmem.  No file keeps its tail inline with its inode
    (``noinline_data``): erofs maps only plain files with DAX, and every
    file the guest maps so is read from the host's page cache, never
    copied into guest RAM.  Timestamps, owners and UUID are fixed, so the
    same inputs give the same bytes."""
    tree = output.with_name("tree")
    # Hard links into the cached base: mkfs only reads them.
    buildcache.run(["cp", "-a", "--link", base / "root", tree])
    buildcache.run(["cp", "-a", f"{overlay}/.", tree])
    for node in DEVICE_NODES:
        os.mknod(tree / node.path, stat.S_IFCHR | node.mode, os.makedev(node.major, node.minor))
    fs_uuid = str(uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32]))
    buildcache.run(["mkfs.erofs", "--quiet", "--all-root", "-T0", "-x-1", "-Enoinline_data", f"-U{fs_uuid}", output, tree])
    shutil.rmtree(tree)
    size = output.stat().st_size
    os.truncate(output, -(-size // PMEM_ALIGN) * PMEM_ALIGN)


def build_image(
    layout: Layout,
    base_key_: str,
    base: Path,
    *,
    image_format: Format,
    compression: Compression,
    modules: Path | None,
    init_script: Path,
    force: bool,
    stages: buildreport.Stages,
) -> tuple[Path, bool]:
    """Stage 2; return the artefact and whether it was built now."""
    capsa = capsa_sources()
    with stages.step("wheels"):
        wheels = [protobuf_wheel(layout, host_protobuf_version(), stages), pyroute2_wheel(layout, stages)]
    init = init_script.read_bytes()
    check_init(init, base / "root")
    module_tree = module_files(modules) if modules is not None else {}
    inputs = {f"capsa/{name}": data for name, data in capsa.items()}
    inputs |= {f"wheel/{wheel.name}": wheel.read_bytes() for wheel in wheels}
    inputs["init"] = init
    inputs |= {f"modules/{name}": data for name, data in module_tree.items()}
    key = image_key(base_key_, inputs, image_format=image_format, compression=compression)
    final = layout.image(key)
    artefact = final / artefact_name(image_format)
    if artefact.exists() and not force:
        os.utime(final)  # most recently used: pruning goes by mtime
        return artefact, False
    stages.say(f"image: building {key} on base {base.name.removeprefix('base-')}")
    with buildcache.staging_dir(final) as scratch:
        overlay = scratch / "overlay"
        overlay.mkdir()
        with stages.step("overlay"):
            build_overlay(base, overlay, capsa=capsa, wheels=wheels, init=init, modules=module_tree, stages=stages)
        stages.say(f"image: capsa ({len(capsa)} files), {', '.join(w.name for w in wheels)}, compiled")
        output = scratch / artefact.name
        with stages.step(f"write {artefact.name}"):
            if image_format is Format.INITRD:
                write_initrd(base, overlay, compression, output, stages)
            else:
                write_erofs(base, overlay, output, key)
        shutil.rmtree(overlay)
        manifest = {
            "key": key,
            "base": base_key_,
            "format": image_format.value,
            "compression": compression.value if image_format is Format.INITRD else None,
            "wheels": [wheel.name for wheel in wheels],
            "bytes": (size := output.stat().st_size),
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        buildcache.publish(scratch, final, fsync=[output])
    stages.say(f"image: {artefact.name} {size / 2**20:.1f} MiB in {final}")
    return artefact, True


def install(layout: Layout, artefact: Path, image_format: Format) -> Path:
    link = layout.installed(image_format)
    buildcache.point_symlink(link, artefact)
    return link


def remove_leftovers(layout: Layout) -> None:
    """Staging directories and temporary files of a run that was killed
    (SIGKILL skips every cleanup). Only called under the lock, so no live
    run owns them."""
    if not layout.cache.is_dir():
        return
    for directory in (layout.cache, layout.debs, layout.wheels):
        for leftover in directory.glob(".*"):
            if leftover.name.startswith((".tmp-", ".old-", ".download-")) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
    for base in layout.cache.glob("base-*"):
        for leftover in base.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)


def prune_old_builds(layout: Layout, keep: Path) -> None:
    """Remove all but the newest stage-2 builds (and all but the newest base).

    Builds that an installed link points at, in this guest directory or the
    default one, are never removed. Safe for running VMs: QEMU has read an
    initrd into memory and holds a rootfs image open, which unlink(2) does
    not take away.
    """
    pinned = {keep.resolve()}
    for guest in {layout.guest, buildcache.DEFAULT_GUEST_DIR}:
        for image_format in Format:
            link = guest / artefact_name(image_format)
            if link.is_symlink():
                pinned.add(link.resolve().parent)
    images = [p for p in layout.cache.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name) and p.is_dir()]
    bases = [p for p in layout.cache.iterdir() if re.fullmatch(r"base-[0-9a-f]{16}", p.name) and p.is_dir()]
    for group, kept in ((images, KEEP_IMAGES), (bases, 1)):
        group.sort(key=lambda path: path.stat().st_mtime, reverse=True)
        for old in group[kept:]:
            if old.resolve() not in pinned:
                shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--format", choices=[f.value for f in Format], default=DEFAULT_FORMAT.value)
    parser.add_argument(
        "--compression",
        choices=[c.value for c in Compression],
        default=DEFAULT_COMPRESSION.value,
        help="initrd compression (default: %(default)s, measured fastest to boot)",
    )
    parser.add_argument("--modules", type=Path, help="a /lib/modules tree to include (cloud-kernel fallback)")
    parser.add_argument("--init", type=Path, default=INIT_SCRIPT, help="the /init to install (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild both stages even if cached")
    parser.add_argument("--print-path", action="store_true", help="print the resulting image path on stdout")
    args = parser.parse_args(argv)
    image_format = Format(args.format)
    compression = Compression(args.compression)

    if sys.version_info[:2] != (3, 11):
        print("build.py: error: run me with Python 3.11 (the guest's version)", file=sys.stderr)
        return 1
    layout = Layout.from_environment("image")
    stages = buildreport.Stages()
    try:
        with buildcache.locked(layout.lock, stages):
            remove_leftovers(layout)
            key, base, base_built = build_base(layout, force=args.force, stages=stages)
            artefact, image_built = build_image(
                layout,
                key,
                base,
                image_format=image_format,
                compression=compression,
                modules=args.modules,
                init_script=args.init,
                force=args.force,
                stages=stages,
            )
            with stages.step("install"):
                link = install(layout, artefact, image_format)
                prune_old_builds(layout, artefact.parent)
    except buildcache.BuildError as exc:
        stages.clear()
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stages.clear()
        print("build.py: interrupted", file=sys.stderr)
        return 130
    what = f"image {artefact.parent.name} (base {key})"
    if base_built or image_built:
        stages.say(f"install: {link} -> {artefact}")
        print(stages.summary(f"{what} built"), file=stages.stream)
    else:
        stages.say(f"cached: {what}, {link} -> {artefact}")
    if args.print_path:
        print(artefact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
