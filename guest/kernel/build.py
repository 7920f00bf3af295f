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
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

# Run as a script: guest/, home of the shared buildcache module, is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import buildcache

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


def remove_stale_staging(directory: Path, stages: buildcache.Stages) -> None:
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

    def build(self, key: str) -> Path:
        return self.cache / key


def extract_source(layout: Layout, version: str, stages: buildcache.Stages) -> Path:
    source = layout.source(version)
    if (source / "Makefile").exists():
        stages.say(f"source: reusing {source}")
        return source
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(f"{SOURCE_TARBALL} not found: install {SOURCE_PACKAGE}")
    stages.say(f"source: extracting {SOURCE_TARBALL} to {source}")
    with buildcache.staging_dir(source) as scratch:
        buildcache.run(["tar", "-xJf", SOURCE_TARBALL, "-C", scratch, "--strip-components=1"])
        buildcache.publish(scratch, source)
    return source


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


def make(source: Path, objects: Path, targets: Sequence[str], log: IO[str], *, jobs: int = 1, **variables: str) -> None:
    """Run kbuild out of tree (``O=``), so the extracted source stays pristine
    and can serve several object directories."""
    argv = [
        "make", "-C", str(source), f"O={objects}", f"-j{jobs}",
        *[f"{name}={value}" for name, value in variables.items()], *targets,
    ]  # fmt: skip
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=kbuild_env(), check=False)
    if done.returncode != 0:
        raise KernelBuildError(f"make {' '.join(targets)} failed (exit {done.returncode}); see {log.name}")


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


def build_kernel(layout: Layout, fragment_path: Path, *, force: bool, jobs: int, stages: buildcache.Stages) -> Path:
    """Build (or reuse) our kernel; return the cache directory holding it."""
    fragment_bytes = fragment_path.read_bytes()
    fragment = parse_fragment(fragment_bytes.decode())  # a malformed fragment fails before any work
    version = source_version()
    key = cache_key(fragment, version)
    final = layout.build(key)
    stages.say(f"key {key}: linux-source {version}, recipe {RECIPE_VERSION}, {fragment_path}")
    if (final / "vmlinux").exists() and not force:
        stages.say(f"cached: {final}")
        return final

    source = extract_source(layout, version, stages)
    objects = layout.objects(version)
    if force and objects.exists():
        stages.say(f"clean: removing {objects}")
        shutil.rmtree(objects)
    objects.mkdir(parents=True, exist_ok=True)
    log_path = objects / "build.log"
    with open(log_path, "w") as log:
        stages.say("configure: allnoconfig + fragment, olddefconfig, verify every symbol")
        configure(source, objects, fragment_path, log)
        stages.say(f"make: vmlinux bzImage, -j{jobs} (log {log_path})")
        started = time.monotonic()
        make(source, objects, ["vmlinux", "bzImage"], log, jobs=jobs)
        build_seconds = time.monotonic() - started

    stages.say(f"store: stripping vmlinux into {final}")
    with buildcache.staging_dir(final) as scratch:
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
    stages.say(
        f"built {release} in {build_seconds:.0f}s: vmlinux {vmlinux_bytes / 2**20:.1f} MiB, "
        f"bzImage {bzimage_bytes / 2**20:.1f} MiB"
    )
    return final


def install_kernel(layout: Layout, build: Path, stages: buildcache.Stages) -> Path:
    link = layout.guest / "vmlinux"
    buildcache.point_symlink(link, build / "vmlinux")
    buildcache.point_symlink(layout.guest / "bzImage", build / "bzImage")
    stages.say(f"install: {link} -> {build / 'vmlinux'}")
    return link


# --------------------------------------------------------------------------
# Debian's cloud kernel, the fallback.
# --------------------------------------------------------------------------


def fetch_cloud_kernel(layout: Layout, *, force: bool, stages: buildcache.Stages) -> Path:
    """Download and unpack the cloud kernel; return its cache directory,
    holding ``vmlinuz`` and ``modules/<kver>/`` (a ``/lib/modules`` tree)."""
    stages.say(f"resolve: {CLOUD_META_PACKAGE}")
    try:
        shown = buildcache.run(["apt-cache", "show", "--no-all-versions", CLOUD_META_PACKAGE]).decode()
    except buildcache.BuildError as exc:
        raise KernelBuildError(f"{exc}\n(run apt-get update first?)") from exc
    package, version = cloud_image_package(shown)
    final = layout.cache / f"cloud-{package}_{version}-r{RECIPE_VERSION}"
    if (final / "vmlinuz").exists() and not force:
        stages.say(f"cached: {final}")
        return final

    with buildcache.staging_dir(final) as scratch:
        download = scratch / "download"
        download.mkdir()
        stages.say(f"download: apt-get download {package}={version}")
        # The apt sandbox user cannot write into our private staging dir; we
        # only download, so fetching as root is acceptable.
        buildcache.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{package}={version}"], cwd=download)
        (deb,) = download.glob("*.deb")
        stages.say(f"extract: {deb.name}")
        unpacked = scratch / "unpacked"
        kernel_release = _extract_kernel_package(deb, unpacked)

        stages.say("modules: dependency closure, depmod")
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
    return final


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


def install_cloud_kernel(layout: Layout, fetched: Path, stages: buildcache.Stages) -> Path:
    link = layout.guest / "vmlinuz-cloud"
    buildcache.point_symlink(link, fetched / "vmlinuz")
    buildcache.point_symlink(layout.guest / "modules-cloud", fetched / "modules")
    stages.say(f"install: {link} -> {fetched / 'vmlinuz'}, modules-cloud -> {fetched / 'modules'}")
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
    stages = buildcache.Stages()
    try:
        with buildcache.locked(layout.lock, stages):
            remove_stale_staging(layout.cache, stages)
            if args.cloud:
                result = fetch_cloud_kernel(layout, force=args.force, stages=stages)
                install_cloud_kernel(layout, result, stages)
                path = result / "vmlinuz"
            else:
                result = build_kernel(layout, args.fragment.resolve(), force=args.force, jobs=args.jobs, stages=stages)
                install_kernel(layout, result, stages)
                path = result / "vmlinux"
    except buildcache.BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build.py: interrupted", file=sys.stderr)
        return 130
    stages.say("done")
    if args.print_path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
