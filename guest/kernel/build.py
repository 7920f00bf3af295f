#!/usr/bin/env python3
"""Build the capsa guest kernel, or fetch Debian's cloud kernel as a fallback.

Default mode builds a kernel from the distribution's kernel source
(``/usr/src/linux-source-6.1.tar.xz``) with ``make allnoconfig`` plus our
fragment (``capsa.config`` next to this file), verifies that every symbol of
the fragment survived ``olddefconfig``, builds ``vmlinux`` and ``bzImage`` and
stores them in ``$CACHE/kernel/<key>/``, where the key hashes the fragment, the
source package version and :data:`RECIPE_VERSION`. A cached build is reused
until the key changes. The installed symlink
``$CAPSA_GUEST_DIR/vmlinux`` (default ``/var/lib/capsa/guest``) is then
replaced atomically to point at it.

A build takes about ten minutes on two cores, so it shows how far it is
(``buildreport.Stages``: a bar on a terminal, a line now and then in a log):
the share of the source tarball unpacked, then make's progress estimated
from the steps kbuild prints (:class:`MakeEstimate`), against the steps a
fresh build printed last time (``$CACHE/kernel/make-steps-<version>``).
make's whole output goes to ``build.log`` in the object directory. A
cached run says one line; a build ends with the time each step took.

``--cloud`` instead downloads (``apt-get download``, never installs) the
package that ``linux-image-cloud-amd64`` depends on, and caches its
``vmlinuz`` plus the virtio/virtio-fs/9p/vsock modules (with their dependency
closure and a ``modules.dep`` made by ``depmod`` for exactly that set), linked
from ``vmlinuz-cloud`` and ``modules-cloud`` in the guest directory.

This is a stand-alone, standard-library-only script (it runs before the capsa
package exists anywhere), so its one exception type, :class:`KernelBuildError`,
is local rather than part of ``capsa.errors`` (it derives from
``buildcache.BuildError``, which commands that fail raise). Nothing is
installed: build dependencies (build-essential flex bison libelf-dev
libssl-dev bc cpio) are the caller's business. Concurrent runs serialise on a
lock file, and every artefact appears by ``rename(2)`` of a finished staging
directory (``guest/buildcache.py``, shared with the image builder), so a
failed or killed run leaves nothing half-written where readers look.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

# Run as a script: guest/, home of the shared buildcache and buildreport modules, is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import buildcache
import buildreport

#: Bump whenever the way a kernel is built from the same inputs changes
#: (make targets, strip flags, artefact layout): it is part of the cache key.
RECIPE_VERSION = 1

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT = Path(__file__).resolve().with_name("capsa.config")

CLOUD_META_PACKAGE = "linux-image-cloud-amd64"

#: Modules (path prefixes relative to ``lib/modules/<kver>/kernel/``) the
#: cloud kernel needs to reach the agent, the shared rootfs and a random
#: seed; their dependencies (``failover`` for virtio_net, ``netfs`` for 9p)
#: are added by closure. Debian's cloud flavour builds these as modules,
#: where our kernel has them built in; it has no 9p at all (CONFIG_NET_9P is
#: off there), which the manifest records under ``missing``.
CLOUD_MODULE_PREFIXES = (
    "drivers/virtio/",
    "drivers/char/virtio_console.",
    "drivers/char/hw_random/virtio-rng.",
    "drivers/block/virtio_blk.",
    "drivers/net/virtio_net.",
    "fs/fuse/fuse.",
    "fs/fuse/virtiofs.",
    "fs/overlayfs/",
    "fs/9p/",
    "net/9p/9pnet.",
    "net/9p/9pnet_virtio.",
    "net/vmw_vsock/vsock.",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
)

# Xen's ELF note carrying the 32-bit PVH entry point (xen/include/public/
# elfnote.h, XEN_ELFNOTE_PHYS32_ENTRY); QEMU boots an ELF vmlinux directly
# only when this note is present.
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4


class KernelBuildError(buildcache.BuildError):
    """The kernel could not be configured, built, fetched or installed."""


# --------------------------------------------------------------------------
# Pure part: fragments, configs, keys, ELF notes, module dependencies.
# --------------------------------------------------------------------------

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")

#: Symbol -> wanted value; ``None`` means "must not be set".
Fragment = dict[str, str | None]


def parse_fragment(text: str) -> Fragment:
    """Parse a kconfig fragment (Documentation/kbuild/kconfig.rst syntax).

    Stricter than Kconfig itself, which silently lets a later line win:
    duplicate symbols, ``=m`` (the guest has no module loader) and lines that
    are neither a setting nor a comment are errors.
    """
    fragment: Fragment = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        unset = _UNSET_RE.match(line)
        setting = _SET_RE.match(line)
        if unset:
            symbol, value = unset.group(1), None
        elif setting:
            symbol, value = setting.group(1), setting.group(2)
            if value == "m":
                raise KernelBuildError(
                    f"fragment line {lineno}: {symbol}=m, but the guest kernel is built without module support; use =y"
                )
        elif not line or line.startswith("#"):
            continue
        else:
            raise KernelBuildError(f"fragment line {lineno}: cannot parse {raw!r}")
        if symbol in fragment:
            raise KernelBuildError(f"fragment line {lineno}: {symbol} is set twice")
        fragment[symbol] = value
    return fragment


def parse_config(text: str) -> dict[str, str]:
    """Return the symbols a ``.config`` sets (``# ... is not set`` lines are
    omitted, like symbols Kconfig left out altogether)."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        setting = _SET_RE.match(line.strip())
        if setting:
            config[setting.group(1)] = setting.group(2)
    return config


@dataclasses.dataclass(frozen=True)
class UnmetSymbol:
    """A fragment symbol whose final value differs from what was asked."""

    symbol: str
    wanted: str | None
    got: str | None

    def __str__(self) -> str:
        def show(value: str | None) -> str:
            return "not set" if value is None else value

        return f"{self.symbol}: wanted {show(self.wanted)}, got {show(self.got)}"


def unmet_symbols(fragment: Mapping[str, str | None], config: Mapping[str, str]) -> list[UnmetSymbol]:
    """Compare a fragment with the resolved config; Kconfig drops a symbol
    without a word when one of its dependencies is off, so this is the only
    way to notice."""
    return [
        UnmetSymbol(symbol, wanted, config.get(symbol))
        for symbol, wanted in fragment.items()
        if config.get(symbol) != wanted
    ]


def cache_key(fragment: Mapping[str, str | None], source_version: str, recipe_version: int = RECIPE_VERSION) -> str:
    """Name of the cache directory for one build: any change to the inputs
    that can change the kernel gives a different key. The fragment is hashed
    as its parsed settings, so editing a comment does not cost a rebuild."""
    digest = hashlib.sha256()
    for part in (f"recipe={recipe_version}", f"source={source_version}"):
        digest.update(part.encode() + b"\0")
    for symbol in sorted(fragment):
        value = fragment[symbol]
        line = f"# {symbol} is not set" if value is None else f"{symbol}={value}"
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:16]


def pvh_entry(elf: bytes) -> int | None:
    """Return the PVH entry point of an ELF64 little-endian kernel, or None.

    Reads the program headers (ELF-64 Object File Format, "Program header
    table") and the notes in every PT_NOTE segment; each note is
    ``namesz, descsz, type`` (u32 each), then name and descriptor, each padded
    to 4 bytes.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_type != _PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name_start = pos + 12
            desc_start = name_start + (namesz + 3) // 4 * 4
            name = elf[name_start : name_start + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
                (entry,) = struct.unpack_from("<I", elf, desc_start)
                return int(entry)
            pos = desc_start + (descsz + 3) // 4 * 4
    return None


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse depmod's ``modules.dep``: ``path: dep1 dep2`` per line, paths
    relative to ``/lib/modules/<kver>/``."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        module, _, rest = line.partition(":")
        deps[module.strip()] = rest.split()
    return deps


def module_closure(deps: Mapping[str, Sequence[str]], prefixes: Iterable[str]) -> list[str]:
    """Modules under ``kernel/<prefix>`` plus everything they depend on, in an
    order where each module comes after its dependencies (a valid load
    order for ``finit_module``)."""
    wanted = [module for module in sorted(deps) if any(module.startswith("kernel/" + prefix) for prefix in prefixes)]
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(module: str) -> None:
        if module in seen:
            return
        seen.add(module)
        if module not in deps:
            raise KernelBuildError(f"modules.dep names {module} but does not list it")
        for dependency in deps[module]:
            visit(dependency)
        ordered.append(module)

    for module in wanted:
        visit(module)
    return ordered


def unmatched_prefixes(deps: Mapping[str, Sequence[str]], prefixes: Iterable[str]) -> list[str]:
    """Prefixes no module in ``modules.dep`` starts with (features the
    distribution built in, or left out)."""
    return [prefix for prefix in prefixes if not any(module.startswith("kernel/" + prefix) for module in deps)]


#: kbuild's quiet output (``V=0``, the default; scripts/Kbuild.include
#: ``cmd``, Makefile ``quiet_cmd_*``): two spaces, the step's verb padded
#: to eight columns, its target, e.g. ``  CC      fs/namei.o``. Anything
#: else (make's own lines, compiler diagnostics, ``  Kernel: ... is ready``)
#: is not a step.
_KBUILD_STEP_RE = re.compile(r"^  ([A-Z][A-Z0-9_]*(?: \[M\])?) +(\S.*?)\s*$")

#: About the number of steps a fresh build of capsa.config prints (an
#: object directory of 6.1.192 holds 2,088 ``.cmd`` files, one per target
#: kbuild made); the estimate until this machine has recorded a fresh build
#: of its own.
FRESH_BUILD_STEPS = 2100
#: The estimate cannot know that make is about to finish, so it stops short.
MAX_ESTIMATE = 0.99


@dataclasses.dataclass(frozen=True)
class KbuildStep:
    """One step of a kernel build, as kbuild prints it."""

    verb: str
    target: str

    def __str__(self) -> str:
        return f"{self.verb} {self.target}"


def parse_kbuild_step(line: str, directories: Sequence[Path] = ()) -> KbuildStep | None:
    """The step a line of make's output announces, or None. Targets under
    ``directories`` (the object and source trees: objtool's own build
    prints absolute paths) are made relative to them, so that the steps of
    two builds compare whatever their cache directory."""
    match = _KBUILD_STEP_RE.match(line)
    if match is None:
        return None
    target = match[2]
    for directory in directories:
        prefix = f"{directory}/"
        if target.startswith(prefix):
            target = target.removeprefix(prefix)
            break
    return KbuildStep(match[1], target)


class MakeEstimate:
    """How far a kernel build has got, from the steps make has printed.

    ``previous`` is what a fresh build of the same object directory printed,
    in order (empty if none was recorded). make walks the tree in the same
    order every time and an incremental build prints only what it redoes,
    so the furthest point reached in that list measures both kinds of
    build; the number of steps seen so far, against the length of that list
    or else :data:`FRESH_BUILD_STEPS`, measures a fresh build without a
    record. The larger of the two counts. Neither knows when make will end,
    so the estimate stops at :data:`MAX_ESTIMATE`.
    """

    def __init__(self, previous: Sequence[str] = ()) -> None:
        self._position: dict[str, int] = {}
        for index, step in enumerate(previous, start=1):
            self._position.setdefault(step, index)
        self._expected = len(previous) or FRESH_BUILD_STEPS
        self._furthest = 0
        self.steps: list[str] = []

    def add(self, step: KbuildStep) -> None:
        self.steps.append(str(step))
        self._furthest = max(self._furthest, self._position.get(str(step), 0))

    @property
    def fraction(self) -> float:
        return min(max(self._furthest, len(self.steps)) / self._expected, MAX_ESTIMATE)


def cloud_image_package(apt_show: str) -> tuple[str, str]:
    """From ``apt-cache show linux-image-cloud-amd64``, the versioned image
    package it depends on and that version (Debian policy 7.1 relation
    syntax: ``name (= version)``)."""
    for line in apt_show.splitlines():
        if not line.startswith("Depends:"):
            continue
        for relation in line.partition(":")[2].split(","):
            match = re.match(r"\s*(linux-image-[\w.+-]+-cloud-amd64)\s*\(=\s*([^)\s]+)\)", relation)
            if match:
                return match.group(1), match.group(2)
    raise KernelBuildError(f"{CLOUD_META_PACKAGE} does not depend on a versioned cloud image package")


# --------------------------------------------------------------------------
# Shell: processes, files, locks.
# --------------------------------------------------------------------------


def remove_stale_staging(directory: Path, stages: buildreport.Stages) -> None:
    """Delete staging leftovers of runs that were killed outright (SIGKILL
    skips ``finally``). Only call this holding the lock: then no live run
    owns any of them."""
    for stale in [*directory.glob(".tmp-*"), *directory.glob(".old-*")]:
        stages.say(f"cleanup: removing {stale.name} left by an interrupted run")
        shutil.rmtree(stale, ignore_errors=True)


def source_version() -> str:
    """Version of the installed kernel source package (e.g. ``6.1.192-2``);
    falls back to a hash of the tarball when it is not a Debian package."""
    try:
        version = buildcache.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE]).decode().strip()
    except buildcache.BuildError:
        version = ""
    if version:
        return version
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(f"{SOURCE_TARBALL} not found: install {SOURCE_PACKAGE}")
    digest = hashlib.sha256()
    with open(SOURCE_TARBALL, "rb") as tarball:
        for block in iter(lambda: tarball.read(1 << 20), b""):
            digest.update(block)
    return "sha256-" + digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# Our kernel.
# --------------------------------------------------------------------------


class Layout(buildcache.Layout):
    """The kernel's artefacts under ``$CAPSA_CACHE_DIR/kernel``."""

    def source(self, version: str) -> Path:
        return self.cache / f"src-{version}"

    def objects(self, version: str) -> Path:
        # One out-of-tree object directory per source version, reused across
        # fragment changes: kbuild rebuilds only what a config change touches.
        return self.cache / f"obj-{version}"

    def make_steps(self, version: str) -> Path:
        # Beside the object directory, not in it: --force removes that one
        # and then builds afresh, which is when the record helps most.
        return self.cache / f"make-steps-{version}"

    def build(self, key: str) -> Path:
        return self.cache / key


def extract_source(layout: Layout, version: str, stages: buildreport.Stages) -> Path:
    source = layout.source(version)
    if (source / "Makefile").exists():
        return source
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(f"{SOURCE_TARBALL} not found: install {SOURCE_PACKAGE}")
    with (
        stages.step("extract source", f"{SOURCE_TARBALL} to {source}"),
        buildcache.staging_dir(source) as scratch,
        stages.progress("extract") as progress,
    ):
        untar(SOURCE_TARBALL, scratch, progress)
        buildcache.publish(scratch, source)
    return source


def untar(tarball: Path, into: Path, progress: buildreport.Progress) -> None:
    """``tar -xJ`` fed by us, so that the share of the tarball handed over
    says how far it is (it takes about a minute: xz is single-threaded)."""
    size = tarball.stat().st_size
    argv = ["tar", "-xJ", "-C", str(into), "--strip-components=1"]
    with open(tarball, "rb") as source, tempfile.TemporaryFile() as errors:
        # Unbuffered, so that nothing is left to flush into a closed pipe.
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=errors, bufsize=0) as tar:
            assert tar.stdin is not None
            fed = 0
            try:
                for block in iter(lambda: source.read(1 << 20), b""):
                    view = memoryview(block)
                    while view:
                        view = view[tar.stdin.write(view) :]
                    fed += len(block)
                    progress.update(fed / size, f"{fed / 2**20:.0f}/{size / 2**20:.0f} MiB")
                tar.stdin.close()
            except BrokenPipeError:
                pass  # tar gave up; its exit status and stderr say why
        if tar.returncode != 0:
            errors.seek(0)
            detail = errors.read().decode(errors="replace").strip()[-3000:]
            raise KernelBuildError(f"tar -xJf {tarball} exited with {tar.returncode}\n{detail}".rstrip())


def kbuild_env() -> dict[str, str]:
    """Environment for make: fixed build identity so equal inputs give equal
    kernels (Documentation/kbuild/reproducible-builds.rst)."""
    env = dict(os.environ)
    env.update(
        KBUILD_BUILD_USER="capsa",
        KBUILD_BUILD_HOST="capsa",
        KBUILD_BUILD_TIMESTAMP="1970-01-01",
        LC_ALL="C",
    )
    return env


def make(
    source: Path,
    objects: Path,
    targets: Sequence[str],
    log: IO[str],
    *,
    jobs: int = 1,
    on_line: Callable[[str], None] | None = None,
    **variables: str,
) -> None:
    """Run kbuild out of tree (``O=``), so the extracted source stays pristine
    and can serve several object directories. All its output goes to
    ``log``, each line also to ``on_line``."""
    argv = [
        "make", "-C", str(source), f"O={objects}", f"-j{jobs}",
        *[f"{name}={value}" for name, value in variables.items()], *targets,
    ]  # fmt: skip
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()

    def record(line: str) -> None:
        log.write(line)
        if on_line is not None:
            on_line(line)

    try:
        buildcache.run_lines(argv, record, env=kbuild_env())
    except buildcache.BuildError as exc:
        raise KernelBuildError(f"make {' '.join(targets)} failed: {exc}\n(all of its output: {log.name})") from exc
    finally:
        log.flush()


def configure(source: Path, objects: Path, fragment_path: Path, log: IO[str]) -> dict[str, str]:
    """allnoconfig + fragment, then olddefconfig; fail on any dropped symbol.

    KCONFIG_ALLCONFIG makes allnoconfig start from the fragment's values
    instead of "no" (Documentation/kbuild/kconfig.rst); olddefconfig then
    settles every remaining symbol to its default.
    """
    fragment = parse_fragment(fragment_path.read_text())
    make(source, objects, ["allnoconfig"], log, KCONFIG_ALLCONFIG=str(fragment_path))
    make(source, objects, ["olddefconfig"], log)
    config = parse_config((objects / ".config").read_text())
    unmet = unmet_symbols(fragment, config)
    if unmet:
        lines = "\n  ".join(str(item) for item in unmet)
        raise KernelBuildError(f"{len(unmet)} fragment symbol(s) did not end up as asked:\n  {lines}")
    return config


def make_kernel(
    layout: Layout, version: str, source: Path, objects: Path, log: IO[str], *, jobs: int, fresh: bool,
    stages: buildreport.Stages,
) -> None:  # fmt: skip
    """``make vmlinux bzImage`` with its progress estimated (:class:`MakeEstimate`);
    a fresh build's steps are recorded for the next estimate."""
    record = layout.make_steps(version)
    previous = record.read_text().splitlines() if record.exists() else []
    estimate = MakeEstimate(previous)
    trees = (objects, source)

    with stages.progress("make") as progress:

        def follow(line: str) -> None:
            step = parse_kbuild_step(line, trees)
            if step is not None:
                estimate.add(step)
                progress.update(estimate.fraction, str(step))

        make(source, objects, ["vmlinux", "bzImage"], log, jobs=jobs, on_line=follow)
    if fresh:
        buildcache.write_atomically(record, "".join(f"{step}\n" for step in estimate.steps).encode())


def build_kernel(
    layout: Layout, fragment_path: Path, *, force: bool, jobs: int, stages: buildreport.Stages
) -> tuple[Path, bool]:
    """Build (or reuse) our kernel; return the cache directory holding it,
    and whether it was built now."""
    fragment_bytes = fragment_path.read_bytes()
    fragment = parse_fragment(fragment_bytes.decode())  # a malformed fragment fails before any work
    version = source_version()
    key = cache_key(fragment, version)
    final = layout.build(key)
    if (final / "vmlinux").exists() and not force:
        return final, False
    stages.say(f"building {key}: linux-source {version}, recipe {RECIPE_VERSION}, {fragment_path}")

    source = extract_source(layout, version, stages)
    objects = layout.objects(version)
    if force and objects.exists():
        stages.say(f"clean: removing {objects}")
        shutil.rmtree(objects)
    fresh = not objects.exists() or not any(objects.iterdir())
    objects.mkdir(parents=True, exist_ok=True)
    log_path = objects / "build.log"
    with open(log_path, "w") as log:
        with stages.step("configure", "allnoconfig + fragment, olddefconfig, verify every symbol"):
            configure(source, objects, fragment_path, log)
        started = time.monotonic()
        with stages.step("make", f"vmlinux bzImage, -j{jobs}{'' if fresh else ', incremental'} (log {log_path})"):
            make_kernel(layout, version, source, objects, log, jobs=jobs, fresh=fresh, stages=stages)
        build_seconds = time.monotonic() - started

    with stages.step("store", f"stripping vmlinux into {final}"), buildcache.staging_dir(final) as scratch:
        buildcache.run(["strip", "--strip-all", "-o", scratch / "vmlinux", objects / "vmlinux"])
        entry = pvh_entry((scratch / "vmlinux").read_bytes())
        if entry is None:
            raise KernelBuildError("the built vmlinux has no PVH entry note (is CONFIG_PVH on?)")
        shutil.copy2(objects / "arch/x86/boot/bzImage", scratch / "bzImage")
        shutil.copy2(objects / ".config", scratch / "config")
        shutil.copy2(objects / "System.map", scratch / "System.map")
        release = (objects / "include/config/kernel.release").read_text().strip()
        vmlinux_bytes = (scratch / "vmlinux").stat().st_size
        bzimage_bytes = (scratch / "bzImage").stat().st_size
        manifest = {
            "key": key,
            "kernel_release": release,
            "source_package": SOURCE_PACKAGE,
            "source_version": version,
            "recipe_version": RECIPE_VERSION,
            "fragment_sha256": hashlib.sha256(fragment_bytes).hexdigest(),
            "pvh_entry": hex(entry),
            "build_seconds": round(build_seconds, 1),
            "vmlinux_bytes": vmlinux_bytes,
            "bzImage_bytes": bzimage_bytes,
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        buildcache.publish(scratch, final)
    stages.say(f"built {release}: vmlinux {vmlinux_bytes / 2**20:.1f} MiB, bzImage {bzimage_bytes / 2**20:.1f} MiB")
    return final, True


def kernel_release(build: Path) -> str:
    """The release a cached build recorded, for the one line a cached run says."""
    try:
        manifest = json.loads((build / "manifest.json").read_text())
    except (OSError, ValueError):
        return "unknown release"
    return str(manifest.get("kernel_release", "unknown release"))


def install_kernel(layout: Layout, build: Path) -> Path:
    link = layout.guest / "vmlinux"
    buildcache.point_symlink(link, build / "vmlinux")
    buildcache.point_symlink(layout.guest / "bzImage", build / "bzImage")
    return link


# --------------------------------------------------------------------------
# Debian's cloud kernel, the fallback.
# --------------------------------------------------------------------------


def fetch_cloud_kernel(layout: Layout, *, force: bool, stages: buildreport.Stages) -> tuple[Path, bool]:
    """Download and unpack the cloud kernel; return its cache directory,
    holding ``vmlinuz`` and ``modules/<kver>/`` (a ``/lib/modules`` tree),
    and whether it was fetched now."""
    with stages.step("resolve"):
        try:
            shown = buildcache.run(["apt-cache", "show", "--no-all-versions", CLOUD_META_PACKAGE]).decode()
        except buildcache.BuildError as exc:
            raise KernelBuildError(f"{exc}\n(run apt-get update first?)") from exc
        package, version = cloud_image_package(shown)
    final = layout.cache / f"cloud-{package}_{version}-r{RECIPE_VERSION}"
    if (final / "vmlinuz").exists() and not force:
        return final, False

    with buildcache.staging_dir(final) as scratch:
        download = scratch / "download"
        download.mkdir()
        with stages.step("download", f"apt-get download {package}={version}"):
            # The apt sandbox user cannot write into our private staging dir; we
            # only download, so fetching as root is acceptable.
            argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{package}={version}"]
            buildcache.run(argv, cwd=download)
        (deb,) = download.glob("*.deb")
        with stages.step("extract", deb.name):
            unpacked = scratch / "unpacked"
            kernel_release = _extract_kernel_package(deb, unpacked)
        with stages.step("modules", "dependency closure, depmod"):
            chosen, missing = _select_cloud_modules(package, unpacked, scratch, kernel_release, stages)
        (scratch / "lib/modules").rename(scratch / "modules")
        (scratch / "lib").rmdir()
        (unpacked / "boot" / f"vmlinuz-{kernel_release}").rename(scratch / "vmlinuz")
        manifest = {
            "package": package,
            "version": version,
            "kernel_release": kernel_release,
            "recipe_version": RECIPE_VERSION,
            "modules": chosen,
            "missing": missing,
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(download)
        shutil.rmtree(unpacked)
        buildcache.publish(scratch, final)
    stages.say(f"fetched {kernel_release}: {len(chosen)} modules")
    return final, True


def _select_cloud_modules(
    package: str, unpacked: Path, scratch: Path, kernel_release: str, stages: buildreport.Stages
) -> tuple[list[str], list[str]]:
    """Copy the modules we want, and what they need, from the unpacked
    package to ``scratch/lib/modules/<kver>``; return them and the prefixes
    that matched nothing."""
    all_modules = unpacked / "lib/modules" / kernel_release
    buildcache.run(["depmod", "-b", unpacked, kernel_release])
    available = parse_modules_dep((all_modules / "modules.dep").read_text())
    chosen = module_closure(available, CLOUD_MODULE_PREFIXES)
    missing = unmatched_prefixes(available, CLOUD_MODULE_PREFIXES)
    if not any(module.startswith("kernel/drivers/virtio/") for module in chosen):
        raise KernelBuildError(f"{package} has no virtio modules")
    if missing:
        stages.say(f"modules: not built as modules in {package}: {', '.join(missing)}")
    # depmod -b wants <base>/lib/modules/<kver>; the published tree is
    # flattened to modules/<kver> once depmod has run.
    modules = scratch / "lib/modules" / kernel_release
    for module in chosen:
        (modules / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(all_modules / module, modules / module)
    for kept in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (all_modules / kept).exists():
            shutil.copy2(all_modules / kept, modules / kept)
    # depmod again on just what we ship, so modules.dep (and its .bin /
    # alias indexes) name no module that is missing from the tree.
    buildcache.run(["depmod", "-b", scratch, kernel_release])
    (modules / "capsa-load-order").write_text("".join(f"{module}\n" for module in chosen))
    return chosen, missing


def _extract_kernel_package(deb: Path, into: Path) -> str:
    """Unpack ``boot/vmlinuz-*`` and ``lib/modules/`` from a kernel .deb
    (deb(5): an ar archive whose data member dpkg-deb turns into a tar);
    return the kernel release."""
    into.mkdir()
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as dpkg:
        assert dpkg.stdout is not None
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name.startswith("boot/vmlinuz-") or name.startswith("lib/modules/"):
                    member.name = name
                    tar.extract(member, into, filter="data")
    if dpkg.returncode != 0:
        raise KernelBuildError(f"dpkg-deb --fsys-tarfile {deb} exited with {dpkg.returncode}")
    kernels = sorted((into / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise KernelBuildError(f"{deb.name} holds {len(kernels)} vmlinuz files, expected 1")
    return kernels[0].name.removeprefix("vmlinuz-")


def install_cloud_kernel(layout: Layout, fetched: Path) -> Path:
    link = layout.guest / "vmlinuz-cloud"
    buildcache.point_symlink(link, fetched / "vmlinuz")
    buildcache.point_symlink(layout.guest / "modules-cloud", fetched / "modules")
    return link


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--cloud", action="store_true", help="fetch Debian's cloud kernel instead of building ours")
    parser.add_argument("--force", action="store_true", help="rebuild (or re-fetch) even if cached")
    parser.add_argument("--print-path", action="store_true", help="print the resulting kernel path on stdout")
    parser.add_argument("--fragment", type=Path, default=FRAGMENT, help=f"config fragment (default: {FRAGMENT})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="make -j (default: all CPUs)")
    args = parser.parse_args(argv)

    layout = Layout.from_environment("kernel")
    stages = buildreport.Stages()
    try:
        with buildcache.locked(layout.lock, stages):
            remove_stale_staging(layout.cache, stages)
            if args.cloud:
                result, built = fetch_cloud_kernel(layout, force=args.force, stages=stages)
                with stages.step("install"):
                    link = install_cloud_kernel(layout, result)
                path = result / "vmlinuz"
                what = f"cloud kernel {result.name.removeprefix('cloud-')}"
            else:
                fragment = args.fragment.resolve()
                result, built = build_kernel(layout, fragment, force=args.force, jobs=args.jobs, stages=stages)
                with stages.step("install"):
                    link = install_kernel(layout, result)
                path = result / "vmlinux"
                what = f"kernel {kernel_release(result)} ({result.name})"
    except buildcache.BuildError as exc:
        stages.clear()
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stages.clear()
        print("build.py: interrupted", file=sys.stderr)
        return 130
    if built:
        stages.say(f"install: {link} -> {path}")
        print(stages.summary(f"{what} built"), file=stages.stream)
    else:
        stages.say(f"cached: {what}, {link} -> {path}")
    if args.print_path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
