"""VM templating: boot a VM once, save it, and start sandboxes by restoring it.

A cold sandbox boots the guest kernel and imports the agent (Python,
asyncio, protobuf) every time; under TCG that is most of its start-up.  A
*template* is a VM saved right after its agent first answered ``Check``:
restoring it costs reading the saved memory back, not booting.  Kata
Containers calls the same idea "VM templating" (its VM factory).

What must match between the saved VM and a restored clone is everything QEMU
checks while loading device state plus everything the guest has already
acted on: the QEMU binary, kernel and image files, machine type,
accelerator, vCPUs, memory, kernel command line and device layout.
:func:`template_key` hashes all of it into the template's directory name,
so a changed setting or rebuilt image simply misses the cache.

Two kinds of device cannot be in the saved VM:

* vhost-user-fs (virtio-fs) is unmigratable in QEMU 7.2 and its socket is per
  container: the clone gets it hot-plugged on a free PCIe root port after
  the restore (:meth:`QemuHypervisor.plug_virtiofs`).
* vhost-vsock carries the guest CID in device state, so a clone could not
  get a CID of its own: templated VMs use the virtio-serial agent channel
  (chardev backends are not migrated, so each clone has its own socket).

A 9p device stays in both: QEMU only blocks migration while the guest has it
mounted, and the template never mounts it; its ``-fsdev`` (the host
directory) is host-side configuration, so each clone points it at its own
rootfs.

What clones share.  Every clone resumes with the template's memory: the
guest kernel's KASLR offset and other boot-time secrets (stack canaries of
tasks that existed at the save, hash seeds), the agent's Python hash seed
and ``random`` state, and the kernel CRNG state.  The host sends fresh
entropy with ``CreateSandbox`` and the agent reseeds the CRNG from it
(:mod:`capsa.agent.clone`) and sets the wall clock; everything else stays
shared.  ``/proc/sys/kernel/random/boot_id`` is made on first read, after
the reseed, so it differs per clone.  What cannot be made unique is
bounded instead (:class:`TemplateLimits`, ``[hypervisor]
template_max_clones`` and ``template_max_age``): a template serves so many
sandboxes for so long, then the next sandbox makes a new *generation* of
it, booted cold, so with a layout and secrets of its own.

What the template loads for its clones.  The template VM's kernel command
line carries ``capsa.template=1`` (:data:`TEMPLATE_PARAM`, so it is part of
the key): its agent imports, before it first serves, what it would
otherwise import on first use in every clone: pyroute2 and the network
modules, about half a second of guest time under TCG for each pod that
gets a NIC (:func:`capsa.agent.netlink.preload`).  A cold boot does not
carry the flag and imports them only when a NIC is configured.  After the
save every zero block of the RAM file becomes a hole
(:func:`punch_zero_pages`), so each clone copies only what the guest holds;
under KVM the template's guest zeroes what it frees (``init_on_free=1``,
:data:`ZERO_FREED_PAGES`), which leaves 89 MiB of 1 GiB to copy rather
than 112 MiB (docs/performance.md).

The layout: ``<root>/<key>/<generation>/`` holds one generation:
``memory`` (the guest RAM, a sparse file the template VM ran on),
``state`` (the migration stream of its devices, ``x-ignore-shared``
leaving the RAM out), ``clones`` (one byte per sandbox it served) and
``template.json`` (what was hashed, when it booted; for people and for
its age).  A generation is made in ``<root>/<key>.new/``, under an
exclusive ``flock`` on ``<root>/<key>.lock``, and published by renaming
it into place and then the symlink ``<root>/<key>/current`` to name it.
Generation names are random and never reused, so a path to one always
means the same files.  A sandbox restoring from a generation holds a
shared ``flock`` on its directory (a *lease*, :meth:`TemplateStore.checkout`)
from choosing it until its state is loaded; a generation that is no longer
current is removed by whoever can lock it exclusively: its maker's
successor, the last lease's holder, or :meth:`TemplateStore.prune`.  A
running clone needs none of it (its RAM is its own copy), so retiring a
template never touches a running sandbox.

Every setting or image change makes a new template of about 120 MiB, so
the store keeps only the :data:`KEEP_TEMPLATES` used last: each use touches
``<root>/<key>/``, and making a template prunes the rest
(:meth:`TemplateStore.prune`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from capsa.dirs import ensure_dir
from capsa.errors import HypervisorError
from capsa.hypervisor.base import NinePShare, SerialChannel, VirtioFsShare, VMConfig
from capsa.hypervisor.jail import Confinement
from capsa.hypervisor.qemu import QemuHypervisor, qemu_argv

log = logging.getLogger("capsa.hypervisor.template")

#: Bump when the templated hardware changes in a way :func:`qemu_argv` does
#: not show (e.g. what the guest is asked to do before the save), or the
#: store's layout does (2: generations).
LAYOUT_VERSION = 2

#: On the template VM's kernel command line (and so in its key): the agent
#: preloads for the clones (capsa.agent.options).
TEMPLATE_PARAM = "capsa.template=1"
#: Under KVM the template's guest also zeroes every page it frees (the
#: freed initrd, boot allocations, all free memory at boot), so that the
#: saved RAM file holds zeros wherever the guest holds nothing and
#: :func:`punch_zero_pages` makes those holes: each clone copies, and keeps
#: in /dev/shm, only what the guest uses (89 MiB of 1 GiB instead of 112).
#: Under TCG zeroing 1 GiB at boot makes the template 11 s slower to make
#: (19.5 s instead of 8.4 s, measured), so there it is left out.
ZERO_FREED_PAGES = "init_on_free=1"
#: fallocate(2) mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE.
_PUNCH_HOLE = 0x02 | 0x01
_ZERO_BLOCK = 64 << 10

STATE_FILE = "state"
MEMORY_FILE = "memory"
META_FILE = "template.json"
#: One byte per sandbox a generation served (see :func:`_count_clone`).
CLONES_FILE = "clones"
#: In a template's key directory: a symlink naming the generation that serves.
CURRENT_LINK = "current"
#: Generations are named by this many random hex digits, never reused.
GENERATION_HEX = 16

#: How many templates the store keeps, by last use: one per configuration in
#: use (plain, 9p, a pod's size...) with room for a few more.
KEEP_TEMPLATES = 12
#: A ``<key>.new`` work directory this old is left from a maker that died.
STALE_WORK_SECONDS = 3600

# Placeholder that makes the key independent of per-sandbox paths.
_KEY_RUN_DIR = Path("/capsa-template")

#: After the agent reopened its port with a host connected, no further port
#: event for this long means it is blocked reading a fresh session (its
#: reopen back-off is at most 0.1 s, capsa.agent.channel.REOPEN_DELAY_MAX).
PORT_QUIET_SECONDS = 0.15


class AgentSession(Protocol):
    """A connection to the agent that answered ``Check``."""

    async def aclose(self) -> None: ...


#: Connects to the agent channel at a socket path and waits for ``Check``.
CheckAgent = Callable[[Path], Awaitable[AgentSession]]


class TemplateError(HypervisorError):
    """A template could not be made, found or restored; callers boot cold instead."""


@dataclass(frozen=True)
class FileIdentity:
    """A file as the template saw it: same path, target, size and mtime means same file.

    ``target`` is where the path's symlinks lead: the installed guest files
    are links into the image builder's cache, whose directory names are
    content hashes, so a link moved to another build changes the key even
    if size and mtime happened to match.
    """

    path: str
    size: int
    mtime_ns: int
    target: str = ""


def file_identity(path: Path) -> FileIdentity:
    try:
        st = path.stat()
        target = os.path.realpath(path, strict=True)
    except OSError as exc:
        raise TemplateError(f"{path}: {exc.strerror}") from exc
    return FileIdentity(str(path), st.st_size, st.st_mtime_ns, target)


def template_vm(vm: VMConfig, run_dir: Path, share_dir: Path, memory_file: Path) -> VMConfig:
    """The VM a template boots: ``vm``'s hardware minus what differs per sandbox.

    virtio-fs shares are dropped (plugged after restore); 9p shares point
    at ``share_dir``, which the template never mounts; the guest RAM is
    ``memory_file``.
    """
    shares = tuple(replace(share, host_path=share_dir) for share in vm.shares if isinstance(share, NinePShare))
    return replace(
        vm,
        name="template",
        run_dir=run_dir,
        log_dir=None,
        agent_channel=SerialChannel(run_dir / "agent.sock"),
        shares=shares,
        kernel_params=_template_params(vm),
        templated=True,
        incoming=False,
        memory_file=memory_file,
    )


def clone_vm(vm: VMConfig, memory_file: Path) -> VMConfig:
    """The VM restored from a template: ``vm`` without virtio-fs shares,
    running on ``memory_file`` (a copy of the template's memory), waiting for the state.

    Its kernel command line is the template's, which is what its guest booted
    with (QEMU does not compare them: the guest read it long before the save).
    """
    shares = tuple(share for share in vm.shares if not isinstance(share, VirtioFsShare))
    return replace(
        vm,
        shares=shares,
        kernel_params=_template_params(vm),
        templated=True,
        incoming=True,
        memory_file=memory_file,
    )


def _template_params(vm: VMConfig) -> tuple[str, ...]:
    wanted = (TEMPLATE_PARAM, ZERO_FREED_PAGES) if vm.accelerator == "kvm" else (TEMPLATE_PARAM,)
    return (*vm.kernel_params, *(p for p in wanted if p not in vm.kernel_params))


def punch_zero_pages(path: Path) -> int:
    """Make every all-zero 64 KiB block of ``path`` a hole; return the bytes punched.

    Run once on a template's RAM file after the save: a clone's copy
    (:func:`copy_memory`) skips holes, so zeros are neither copied nor kept.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    zero = bytes(_ZERO_BLOCK)
    punched = 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, data, os.SEEK_HOLE)
            position = data - data % _ZERO_BLOCK
            while position < end:
                block = os.pread(fd, _ZERO_BLOCK, position)
                if block == zero[: len(block)] and len(block) == _ZERO_BLOCK:
                    result = libc.fallocate(
                        fd, _PUNCH_HOLE, ctypes.c_long(position), ctypes.c_long(_ZERO_BLOCK)
                    )
                    if result != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}", str(path))
                    punched += _ZERO_BLOCK
                position += _ZERO_BLOCK
            offset = end
    finally:
        os.close(fd)
    return punched


def copy_memory(template_dir: Path, destination: Path) -> None:
    """Copy the template's guest RAM file to ``destination``, holes kept as holes.

    The RAM file is as large as the guest's memory but holds data only where
    the template wrote (a few hundred MiB of 1 GiB at most): SEEK_DATA /
    SEEK_HOLE (lseek(2)) find those ranges and sendfile(2) copies them in
    the kernel.  The copy must be the clone's own: the clone writes to
    its RAM, and virtiofsd maps the same file, so a private (copy-on-write)
    mapping of the template's file would not do.
    """
    source = template_dir / MEMORY_FILE
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TemplateError(f"{source}: {exc.strerror}") from exc
    try:
        dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        os.close(src)
        raise TemplateError(f"{destination}: {exc.strerror}") from exc
    try:
        size = os.fstat(src).st_size
        os.ftruncate(dst, size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            hole = os.lseek(src, data, os.SEEK_HOLE)
            position = os.lseek(dst, data, os.SEEK_SET)
            while position < hole:
                # sendfile(2), not copy_file_range(2): the template sits on
                # disk and the copy on tmpfs, which the latter refuses (EXDEV).
                copied = os.sendfile(dst, src, position, hole - position)
                if copied == 0:
                    raise TemplateError(f"{source} ended early at {position} bytes")
                position += copied
            offset = hole
    except OSError as exc:
        raise TemplateError(f"cannot copy {source} to {destination}: {exc.strerror}") from exc
    finally:
        os.close(src)
        os.close(dst)


def plugged_shares(vm: VMConfig) -> tuple[VirtioFsShare, ...]:
    """The shares a clone of ``vm`` gets hot-plugged after the restore."""
    return tuple(share for share in vm.shares if isinstance(share, VirtioFsShare))


def template_key(vm: VMConfig, files: tuple[FileIdentity, ...]) -> str:
    """The cache key of ``vm``'s template; pure.

    Hashes the template's QEMU command line built with placeholder paths
    (so it covers machine, accelerator, vCPUs, memory, kernel command line
    and device layout, but not the sandbox's name or directories) and the
    identity of the files that went into the saved memory: QEMU, the kernel,
    the initrd.
    """
    canonical = template_vm(vm, _KEY_RUN_DIR, _KEY_RUN_DIR / "share", _KEY_RUN_DIR / MEMORY_FILE)
    image_bytes = next((f.size for f in files if vm.rootfs_image is not None and f.path == str(vm.rootfs_image)), None)
    argv = qemu_argv(canonical, qmp_fd=3, rootfs_image_bytes=image_bytes)
    document = {
        "layout": LAYOUT_VERSION,
        "argv": argv,
        "files": [[f.path, f.size, f.mtime_ns, f.target] for f in files],
    }
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    return digest[:24]


def vm_files(vm: VMConfig) -> tuple[FileIdentity, ...]:
    """Identities of the files a template of ``vm`` depends on (reads the file system)."""
    paths = [vm.hypervisor_path, vm.kernel]
    # The image is mapped, not copied, into a clone, but the guest's kernel
    # saved what it read of it (the root's superblock and inodes): a clone
    # must find the same bytes there.
    paths += [path for path in (vm.initrd, vm.rootfs_image) if path is not None]
    if vm.firmware is not None:
        paths.append(vm.firmware)
    return tuple(file_identity(path) for path in paths)


def unsupported(vm: VMConfig) -> str | None:
    """Why ``vm`` cannot start from a template, or None if it can."""
    if vm.machine_type != "q35":
        return "machine type is not q35 (no PCIe hot-plug for the rootfs share)"
    if not isinstance(vm.agent_channel, SerialChannel):
        return "the agent channel is vsock (the guest CID is saved device state)"
    return None


@dataclass(frozen=True)
class TemplateLimits:
    """How long one template (one KASLR layout, one set of boot-time secrets) may serve.

    ``max_clones``: sandboxes restored from it, its maker's included;
    ``max_age``: seconds since its VM booted.  0: no bound.
    """

    max_clones: int = 0
    max_age: float = 0.0


#: A template made this far in the future was made before the clock went
#: back; it retires (its age cannot be told).  NTP's small steps are forgiven.
CLOCK_SLACK_SECONDS = 60.0


def retire_reason(limits: TemplateLimits, clone: int, age: float) -> str | None:
    """Why a template may not serve its ``clone``-th sandbox (its maker's is the
    1st) at ``age`` seconds since it booted, or None if it may; pure."""
    if age < -CLOCK_SLACK_SECONDS:
        return f"it was made {-age:.0f} s in the future (the clock went back)"
    if limits.max_age and age >= limits.max_age:
        return f"it is {age:.0f} s old, the bound is {limits.max_age:g} s"
    if limits.max_clones and clone > limits.max_clones:
        return f"it has served {clone - 1} sandboxes, the bound is {limits.max_clones}"
    return None


#: How far into its bounds a template is when its successor starts being
#: made in the background (:func:`refresh_due`), so that the sandbox that
#: reaches a bound finds the next generation ready instead of making it.
REFRESH_AT = 0.9


def refresh_due(limits: TemplateLimits, clone: int, age: float) -> bool:
    """Whether a template serving its ``clone``-th sandbox at ``age`` seconds should be
    replaced in the background now (:data:`REFRESH_AT` of a bound); pure."""
    if limits.max_clones and clone >= max(1, int(limits.max_clones * REFRESH_AT)):
        return True
    return bool(limits.max_age and age >= limits.max_age * REFRESH_AT)


def _is_generation(name: str) -> bool:
    return len(name) == GENERATION_HEX and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class _Lease:
    """A shared flock on a generation's directory: it is not removed while held."""

    directory: Path
    fd: int


class TemplateStore:
    """Saved templates under one directory (see the module docstring for the layout)."""

    def __init__(self, root: Path, limits: TemplateLimits | None = None) -> None:
        self.root = root
        self.limits = limits or TemplateLimits()
        #: Whether the last :meth:`checkout` made the template it gave (for the runtime counters).
        self.made = False
        #: Set by :meth:`checkout`: the generation it gave is near a bound,
        #: and :meth:`refresh` should make its successor in the background.
        self.refresh_due = False

    @contextlib.asynccontextmanager
    async def checkout(self, key: str, make: Callable[[], Awaitable[Path]], lock_timeout: float) -> AsyncIterator[Path]:
        """The generation of template ``key`` to restore one sandbox from.

        The current generation if it may serve one more sandbox
        (:func:`retire_reason`), else one ``make()`` makes (:meth:`create`,
        under the key's lock; so does a concurrent sandbox that finds the
        template retired, and then takes the one made).  It is leased until
        the block ends, so no other process removes it while this one copies
        its RAM and loads its state; a retired generation goes when its last
        lease does.
        """
        lease = self._take(key)
        made = False
        if lease is None:
            async with self.locked(key, lock_timeout):
                lease = self._take(key)
                if lease is None:
                    log.info("making VM template %s in %s", key, self.root)
                    # Its maker's sandbox was counted when it was published.
                    lease = self._hold(await make())
                    if lease is None:
                        raise TemplateError(f"template {key} went away as it was made")
                    made = True
                    # Its maker's sandbox is its first clone, of a template just booted.
                    self.refresh_due = refresh_due(self.limits, 1, 0.0)
        self.made = made
        try:
            if made:
                for old in await asyncio.to_thread(self.prune):
                    log.info("removed VM template %s, used least lately", old)
            yield lease.directory
        finally:
            self._release(lease)

    def _take(self, key: str) -> _Lease | None:
        """Lease the current generation of ``key`` for one more sandbox, counted; None if there is none fit."""
        key_dir = self.root / key
        try:
            name = os.readlink(key_dir / CURRENT_LINK)
        except OSError:
            return None
        if not _is_generation(name):
            return None
        lease = self._hold(key_dir / name)
        if lease is None:
            return None
        reason = self._unfit(lease.directory, key)
        if reason is not None:
            log.info("VM template %s/%s retires: %s", key, name, reason)
            self._release(lease)
            return None
        # The time of last use, which prune goes by (a read-only store just keeps all).
        with contextlib.suppress(OSError):
            os.utime(key_dir)
        with contextlib.suppress(OSError):
            if self.root.stat().st_mode & 0o077:
                # Made before templates were kept root's alone, or under a lax umask.
                os.chmod(self.root, 0o700)
        return lease

    def _unfit(self, directory: Path, key: str) -> str | None:
        """Why ``directory`` may not serve one more sandbox; counts the sandbox if it may."""
        try:
            meta = json.loads((directory / META_FILE).read_text())
            if (
                meta.get("key") != key
                or (directory / STATE_FILE).stat().st_size != meta.get("state_bytes")
                or (directory / MEMORY_FILE).stat().st_size != meta.get("memory_bytes")
            ):
                return "it is incomplete"
            created = float(meta["created"])
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return "it is incomplete"
        age = time.time() - created
        reason = retire_reason(self.limits, 1, age)
        if reason is not None:
            return reason
        try:
            clone = _count_clone(directory / CLONES_FILE)
        except OSError as exc:
            return f"its clones cannot be counted ({exc.strerror})"
        reason = retire_reason(self.limits, clone, age)
        self.refresh_due = reason is None and refresh_due(self.limits, clone, age)
        return reason

    @staticmethod
    def _hold(directory: Path) -> _Lease | None:
        # A shared lock fails only while a remover holds it exclusively.
        fd = _locked_directory(directory, fcntl.LOCK_SH)
        return _Lease(directory, fd) if fd is not None else None

    def _release(self, lease: _Lease) -> None:
        """End a lease; the last lease of a retired generation removes it."""
        try:
            if self._retired(lease.directory):
                # Turns the shared lock exclusive, or fails while another
                # sandbox still holds it (which removes it in its turn).
                with contextlib.suppress(OSError):
                    fcntl.flock(lease.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _same_directory(lease.fd, lease.directory):
                        shutil.rmtree(lease.directory, ignore_errors=True)
        finally:
            os.close(lease.fd)

    @staticmethod
    def _retired(directory: Path) -> bool:
        """No longer served: another generation is current, or it was discarded.

        Never true of a generation about to become current: only published
        generations are ever leased, and a superseded name never comes back.
        """
        try:
            current = os.readlink(directory.parent / CURRENT_LINK)
        except OSError:
            return True
        return current != directory.name or not (directory / META_FILE).exists()

    async def refresh(self, key: str, generation: str, make: Callable[[], Awaitable[Path]]) -> Path | None:
        """Make the successor of ``generation``, if still current, of template ``key``; its directory.

        In the background (hypervisor/refresh.py), after a checkout found its
        generation near a bound (:attr:`refresh_due`): None, doing nothing,
        when another process holds the key's lock (it is making one) or a
        newer generation is current already.  Publishing switches
        ``current``; the old generation goes with its last lease.
        """
        async with self.locked(key, 0):
            try:
                if os.readlink(self.root / key / CURRENT_LINK) != generation:
                    return None
            except OSError:
                return None
            log.info("VM template %s/%s is near its bounds: making its successor", key, generation)
            made = await make()
        for old in await asyncio.to_thread(self.prune):
            log.info("removed VM template %s, used least lately", old)
        return made

    def discard(self, generation: Path) -> None:
        """Serve nothing more from ``generation`` (it does not restore); it goes with its last lease."""
        with contextlib.suppress(OSError):
            (generation / META_FILE).unlink()

    def publish(
        self, key: str, work: Path, meta: dict[str, object], created: float, for_sandbox: bool = True
    ) -> Path:
        """Make the finished template in ``work`` the current generation of ``key``; its directory.

        Call with the key's lock held.  Its maker's sandbox (``for_sandbox``;
        not a background refresh's) is its first clone; the generations it
        retires go now, or with their last lease.
        """
        (work / CLONES_FILE).write_bytes(b"c" if for_sandbox else b"")
        document = {
            **meta,
            "key": key,
            "created": created,
            "state_bytes": (work / STATE_FILE).stat().st_size,
            "memory_bytes": (work / MEMORY_FILE).stat().st_size,
        }
        (work / META_FILE).write_text(json.dumps(document, indent=1))
        key_dir = self.root / key
        ensure_dir(key_dir, 0o700)
        generation = secrets.token_hex(GENERATION_HEX // 2)
        os.rename(work, key_dir / generation)
        link = key_dir / f".{CURRENT_LINK}-{generation}"
        os.symlink(generation, link)
        os.rename(link, key_dir / CURRENT_LINK)
        self._remove_retired(key)
        return key_dir / generation

    def _remove_retired(self, key: str) -> None:
        """Remove ``key``'s generations that are not current and not leased (with the key's lock held)."""
        key_dir = self.root / key
        try:
            entries = list(os.scandir(key_dir))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(f".{CURRENT_LINK}-"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # a link its maker did not get to rename
            elif _is_generation(entry.name) and self._retired(Path(entry.path)):
                self._remove_unleased(Path(entry.path))

    @staticmethod
    def _remove_unleased(directory: Path) -> bool:
        fd = _locked_directory(directory, fcntl.LOCK_EX)
        if fd is None:
            return False
        try:
            shutil.rmtree(directory, ignore_errors=True)
            return True
        finally:
            os.close(fd)

    def prune(self, keep: int = KEEP_TEMPLATES) -> list[str]:
        """Remove all but the ``keep`` templates used last, retired generations no
        sandbox leases, and dead makers' work; the keys removed.

        A template being made or restored right now is not at risk: making
        holds its key's lock and restoring a lease on its generation, and
        prune removes nothing it cannot lock first.
        """
        used: list[tuple[float, str]] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            if entry.name.endswith(".new") and entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_WORK_SECONDS:
                        shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    used.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
        removed = []
        ranked = sorted(used, reverse=True)
        for _, key in ranked[keep:]:
            if self._with_key_lock(key, self._remove_key):
                removed.append(key)
        for _, key in ranked[:keep]:
            self._with_key_lock(key, self._remove_retired)
        return removed

    def _with_key_lock(self, key: str, action: Callable[[str], object]) -> bool:
        """Run ``action(key)`` if the key's lock is free (nobody is making it); whether it returned true."""
        try:
            fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            return bool(action(key))
        finally:
            os.close(fd)

    def _remove_key(self, key: str) -> bool:
        """Remove every generation of ``key`` unless one is leased (with the key's lock held)."""
        key_dir = self.root / key
        held: list[int] = []
        try:
            for entry in os.scandir(key_dir):
                if entry.is_dir(follow_symlinks=False):
                    fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    held.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a sandbox is being restored from it
        else:
            shutil.rmtree(key_dir, ignore_errors=True)
            return True
        finally:
            for fd in held:
                os.close(fd)

    @contextlib.asynccontextmanager
    async def locked(self, key: str, timeout: float) -> AsyncIterator[None]:
        """Hold the exclusive lock of template ``key`` (another process may be making it)."""
        try:
            # Root's alone: a template is what every later VM starts from.
            ensure_dir(self.root, 0o700)
            fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TemplateError(f"cannot lock template {key} in {self.root}: {exc.strerror}") from exc
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    # Non-blocking and polled: a cancelled waiter leaves no
                    # thread behind holding a lock nobody releases.
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise TemplateError(f"cannot lock template {key}: {exc.strerror}") from exc
                if time.monotonic() > deadline:
                    raise TemplateError(f"template {key} is locked by another process for over {timeout:.0f} s")
                await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)

    async def create(
        self,
        key: str,
        vm: VMConfig,
        check_agent: CheckAgent,
        timeout: float,
        confinement: Confinement | None = None,
        for_sandbox: bool = True,
    ) -> Path:
        """Boot a new generation of template ``key`` from ``vm``, save and publish it; its directory.

        Call with the lock held.  ``check_agent(socket_path)`` connects to the
        agent channel and waits for ``Check``.  ``for_sandbox``: a sandbox
        waits to be restored from it, its first clone (not so for a refresh).
        """
        work = self.root / f"{key}.new"
        shutil.rmtree(work, ignore_errors=True)
        # The VM's sockets and logs go to a short directory of their own:
        # unix socket paths are limited to 107 bytes, the cache path is not.
        run_dir = Path(tempfile.mkdtemp(prefix="capsa-template-"))
        try:
            ensure_dir(work, 0o700)
            (run_dir / "share").mkdir()
            template = template_vm(vm, run_dir, run_dir / "share", work / MEMORY_FILE)
            hypervisor = QemuHypervisor(template, die_with_parent=True, confinement=confinement)
            # Its age counts from the boot: that is when its layout and secrets were drawn.
            booted = time.time()
            try:
                await asyncio.wait_for(self._boot_and_save(hypervisor, check_agent, work / STATE_FILE), timeout)
            except TimeoutError as exc:
                raise TemplateError(f"making the template took over {timeout:.0f} s") from exc
            finally:
                await hypervisor.stop()
            punched = await asyncio.to_thread(punch_zero_pages, work / MEMORY_FILE)
            log.info("template %s: %d MiB of zeroed guest RAM left out of the RAM file", key, punched >> 20)
            argv = qemu_argv(template, qmp_fd=3, rootfs_image_bytes=hypervisor.rootfs_image_bytes())
            return self.publish(key, work, {"argv": argv}, booted, for_sandbox)
        except OSError as exc:
            raise TemplateError(f"cannot save template {key} in {self.root}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)

    @staticmethod
    async def _boot_and_save(hypervisor: QemuHypervisor, check_agent: CheckAgent, state: Path) -> None:
        channel = hypervisor.config.agent_channel
        assert isinstance(channel, SerialChannel)
        await hypervisor.start()
        idle: socket.socket | None = None
        session = await check_agent(channel.socket_path)
        try:
            # Listen only now: while the agent serves a connected host its
            # port stays open, so every event from here on is about the
            # disconnect below, none about the boot.
            async with hypervisor.agent_port_events() as events:

                def port_event() -> Awaitable[bool]:
                    return hypervisor.agent_port_change(events)

                await session.aclose()
                # The agent saw its host leave once it closed the port.  The
                # clone's host must find it in a fresh session (its ttrpc
                # stream ids start over), with a host connected (so the read
                # blocks instead of cycling open/EOF/close): connect an idle
                # host, wait for the reopen, then for silence.
                while await port_event():
                    pass
                idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.connect(str(channel.socket_path))
                is_open = False
                while True:
                    try:
                        is_open = await asyncio.wait_for(port_event(), PORT_QUIET_SECONDS)
                    except TimeoutError:
                        if is_open:
                            break
            await hypervisor.save_state(state)
        finally:
            await session.aclose()
            if idle is not None:
                idle.close()


def _locked_directory(directory: Path, mode: int) -> int | None:
    """``directory`` open and flock'ed with ``mode`` (without waiting), still named so; None if not."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        if _same_directory(fd, directory):
            return fd  # not removed between the open and the lock
    except OSError:
        pass
    os.close(fd)
    return None


def _same_directory(fd: int, directory: Path) -> bool:
    """Whether ``directory`` still names the directory open as ``fd``."""
    try:
        named, opened = os.stat(directory, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _count_clone(path: Path) -> int:
    """Count one more clone in ``path``; which one it is (1 for the first).

    One byte appended per clone: O_APPEND writes land one after another
    (write(2)), and the file offset after ours is our place in the order,
    however many processes count at once, with no lock.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        if os.write(fd, b"c") != 1:
            raise OSError(errno.EIO, "short write", str(path))
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def default_store(limits: TemplateLimits | None = None) -> TemplateStore:
    from capsa.config import cache_dir

    return TemplateStore(cache_dir() / "templates", limits)
