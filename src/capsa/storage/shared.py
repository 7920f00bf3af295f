"""The host side of a sandbox's shared directory: bind mounts in a mount namespace of the proxy's own.

A sandbox shares two directories with virtio-fs, each exported by a
virtiofsd of its own: ``<root>/<id>/shared/`` (container rootfs) and
``<root>/<id>/volumes/`` (the sources of host bind mounts, served without a
guest metadata cache); with 9p, QEMU's 9p server exports ``shared/`` alone.
:func:`capsa.runtime.mounts.plan_mounts` says which host paths go into
which; a :class:`SharedDir` per directory makes those bind mounts, and
everything below (the slave namespace, staging) holds for both alike.

They are made in a mount namespace of the proxy's own
(:func:`enter_mount_namespace`), so no host process sees them and they
vanish with the proxy and its virtiofsd, however those end: nothing to
clean up on the host after a crash.  That namespace is a *slave* of the
host's (sharedsubtree.rst: propagation flows from master to slave only):
nothing mounted here reaches the host, while mounts the host makes later
under a bind source (Kubernetes' HostToContainer, ``rslave``) reach the
proxy's copy of it, and a bind of a slave mount is a slave of the same
master, so they reach the bind in the shared directory as well.  A host
umount propagates the same way, so a volume the host unmounts is not kept
alive by our copy of the host's mounts.

Binds added after virtiofsd started (every container: the VM boots before
its first container is created) must still reach it.  virtiofsd copies our
namespace (unshare(CLONE_NEWNS)) and then makes it a slave (Debian's C
virtiofsd: ``mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL)``, then an
rbind of the shared dir onto itself and ``pivot_root`` into it; see
tests/integration/test_shared_dir.py, which checks it), so the shared
directory is its own mount and MS_SHARED: mounts made under it here
propagate into virtiofsd's copy (kernel Documentation/filesystems/
sharedsubtree.rst), and so do the host's later mounts under a slave bind.

Per-mount state does not propagate: a bind is copied into virtiofsd's
namespace the moment it is made, with the flags and propagation it has
then.  So every bind is first *staged* (:meth:`SharedDir._bind`): made at
a scratch mount point outside the shared dir, given its propagation (a
private bind is cut off from the host here, before virtiofsd gets a copy)
and its read-only flag, and only then bound into the shared dir.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from capsa.agent import libc
from capsa.errors import StorageError
from capsa.runtime.mounts import HostBind

# statvfs(3) f_flag bits that bind remounts must repeat, and the mount(2)
# flag each one stands for (a remount sets the per-mount flags it is given
# and clears the others; runc keeps them the same way).
_KEPT_FLAGS = (
    (os.ST_NOSUID, libc.MS_NOSUID),
    (os.ST_NODEV, libc.MS_NODEV),
    (os.ST_NOEXEC, libc.MS_NOEXEC),
    (os.ST_NOATIME, libc.MS_NOATIME),
    (os.ST_NODIRATIME, libc.MS_NODIRATIME),
    (os.ST_RELATIME, libc.MS_RELATIME),
)

# Scratch mount points next to the shared dir (see SharedDir._stage).
_STAGING_PREFIX = ".bind-"


def enter_mount_namespace() -> None:
    """Move this process into a new mount namespace that is a slave of the host's (see the module docstring).

    unshare(2) with CLONE_NEWNS, then every mount made a slave (MS_REC |
    MS_SLAVE on /): a host whose / is shared (systemd's default) would
    otherwise see our binds appear in its own namespace, while MS_PRIVATE
    would also cut off the host's later mounts under a bind source.  Host
    mounts that were private stay private.  Call it before the process
    starts threads: CLONE_NEWNS implies CLONE_FS, which fails with EINVAL
    in a process whose threads share its filesystem info.
    """
    try:
        libc.unshare(libc.CLONE_NEWNS)
    except OSError as exc:
        raise StorageError(f"cannot enter a mount namespace of our own: {os.strerror(exc.errno or 0)}") from exc
    try:
        libc.mount("none", "/", "", libc.MS_REC | libc.MS_SLAVE)
    except OSError as exc:
        raise StorageError(f"cannot make / a slave in the new mount namespace: {os.strerror(exc.errno or 0)}") from exc


# mount(2) propagation flags for HostBind.propagation.
_PROPAGATION_FLAGS = {
    "rslave": libc.MS_SLAVE | libc.MS_REC,
    "slave": libc.MS_SLAVE,
    "rprivate": libc.MS_PRIVATE | libc.MS_REC,
    "private": libc.MS_PRIVATE,
}


class SharedDir:
    """The directory a sandbox shares with its guest, and the binds made in it.

    Meant for the proxy, in its own mount namespace: :meth:`create`
    once, :meth:`apply` per container (the plan's binds), :meth:`release`
    when a container goes, :meth:`destroy` at the end.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._applied: list[HostBind] = []
        self._mounted_self = False

    @property
    def applied(self) -> tuple[HostBind, ...]:
        return tuple(self._applied)

    def create(self) -> None:
        """Make the directory a mount of its own, MS_SHARED (see the module docstring)."""
        try:
            self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise _error("cannot create", self.path, exc) from exc
        try:
            libc.mount(str(self.path), str(self.path), "", libc.MS_BIND)
        except OSError as exc:
            raise _error("cannot bind-mount", self.path, exc) from exc
        self._mounted_self = True
        try:
            libc.mount("none", str(self.path), "", libc.MS_SHARED)
        except OSError as exc:
            self.destroy()
            raise _error("cannot make shared", self.path, exc) from exc

    def apply(self, binds: Sequence[HostBind]) -> None:
        """Make every bind (all or none: a failure undoes this call's binds); StorageError names the path."""
        done: list[HostBind] = []
        try:
            for bind in binds:
                self._bind(bind)
                done.append(bind)
        except BaseException:
            self._unbind(done)
            raise
        self._applied.extend(done)

    def release(self, binds: Sequence[HostBind]) -> None:
        """Undo binds made by :meth:`apply` (a container left the sandbox); errors are StorageError."""
        failed = self._unbind(binds)
        released = {bind.target for bind in binds}
        self._applied = [bind for bind in self._applied if bind.target not in released]
        if failed:
            raise StorageError(f"cannot unmount {', '.join(failed)}")

    def destroy(self) -> None:
        """Undo every bind and the directory's own mount; remove what :meth:`create` and :meth:`apply` made."""
        failed = self._unbind(list(self._applied))
        self._applied = []
        if self._mounted_self:
            try:
                # MNT_DETACH takes whatever is still mounted below along.
                libc.umount(str(self.path), libc.MNT_DETACH)
                self._mounted_self = False
            except OSError as exc:
                failed.append(f"{self.path} ({os.strerror(exc.errno or 0)})")
        if not failed:
            with contextlib.suppress(OSError):
                self.path.rmdir()
        if failed:
            raise StorageError(f"cannot unmount {', '.join(failed)}")

    # --- one bind ------------------------------------------------------------

    def _target(self, bind: HostBind) -> Path:
        parts = bind.target.split("/")
        if bind.target.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise StorageError(f"bind target {bind.target!r} must be a plain relative path inside {self.path}")
        return self.path.joinpath(*parts)

    def _bind(self, bind: HostBind) -> None:
        target = self._target(bind)
        propagation = _PROPAGATION_FLAGS.get(bind.propagation)
        if propagation is None:
            raise StorageError(f"unknown propagation {bind.propagation!r} for {bind.source}")
        try:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _make_mount_point(target, bind.directory)
        except OSError as exc:
            raise _error("cannot create mount point", target, exc) from exc
        try:
            staging = self._stage(bind, target, propagation)
        except BaseException:
            _remove_mount_point(target, self.path)
            raise
        try:
            # MS_REC always: the staged tree is exactly what the spec asked
            # for (bind or rbind), its submounts included.
            libc.mount(str(staging), str(target), "", libc.MS_BIND | libc.MS_REC)
        except OSError as exc:
            _remove_mount_point(target, self.path)
            raise StorageError(f"cannot bind {bind.source} at {target}: {os.strerror(exc.errno or 0)}") from exc
        finally:
            _unstage(staging)

    def _stage(self, bind: HostBind, target: Path, propagation: int) -> Path:
        """Bind ``bind.source`` at a scratch mount point next to the shared dir, with its propagation and flags.

        Outside the shared dir, so nothing of this reaches virtiofsd until
        the finished mount is bound into it (see the module docstring).
        The caller binds the result and then calls :func:`_unstage`.
        """
        try:
            if bind.directory:
                staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.path.parent))
            else:
                fd, name = tempfile.mkstemp(prefix=_STAGING_PREFIX, dir=self.path.parent)
                os.close(fd)
                staging = Path(name)
        except OSError as exc:
            raise _error("cannot create a staging mount point in", self.path.parent, exc) from exc
        flags = libc.MS_BIND | (libc.MS_REC if bind.recursive else 0)
        try:
            libc.mount(str(bind.source), str(staging), "", flags)
        except OSError as exc:
            _remove_staging(staging)
            raise StorageError(f"cannot bind {bind.source} at {target}: {os.strerror(exc.errno or 0)}") from exc
        try:
            # A private bind leaves the host's peer group here, before any
            # copy of it exists; a slave one stays (or becomes) a slave.
            libc.mount("none", str(staging), "", propagation)
        except OSError as exc:
            _unstage(staging)
            raise StorageError(f"cannot make {bind.source} {bind.propagation}: {os.strerror(exc.errno or 0)}") from exc
        if not bind.readonly:
            return staging
        try:
            # A bind takes the source's flags; making it read-only is a second
            # call (mount(2) "Creating a bind mount"), on this mount only, as
            # runc does for "ro" (recursive read-only is runc's "rro").  The
            # bind into the shared dir, and virtiofsd's copy of that, inherit it.
            kept = os.statvfs(staging).f_flag
            remount = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY
            remount |= sum(flag for st_flag, flag in _KEPT_FLAGS if kept & st_flag)
            libc.mount("none", str(staging), "", remount)
        except OSError as exc:
            _unstage(staging)
            raise StorageError(f"cannot make {bind.source} read-only: {os.strerror(exc.errno or 0)}") from exc
        return staging

    def _unbind(self, binds: Sequence[HostBind]) -> list[str]:
        """Unmount binds in reverse order and remove their mount points; return what failed."""
        failed: list[str] = []
        for bind in reversed(binds):
            target = self._target(bind)
            try:
                libc.umount(str(target), libc.MNT_DETACH)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not mounted (any more)
                    failed.append(f"{target} ({os.strerror(exc.errno or 0)})")
                    continue
            _remove_mount_point(target, self.path)
        return failed


def _make_mount_point(path: Path, directory: bool) -> None:
    if directory:
        path.mkdir(mode=0o755, exist_ok=True)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _unstage(staging: Path) -> None:
    """Detach a staging mount (the bind made from it stays) and remove its mount point."""
    with contextlib.suppress(OSError):
        libc.umount(str(staging), libc.MNT_DETACH)
    _remove_staging(staging)


def _remove_staging(staging: Path) -> None:
    with contextlib.suppress(OSError):
        if staging.is_dir() and not staging.is_symlink():
            staging.rmdir()
        else:
            staging.unlink()


def _remove_mount_point(target: Path, top: Path) -> None:
    """Remove an empty mount point and the empty directories above it, up to ``top``.

    Never recursive: rmdir and unlink of an empty file only, so a bind that
    is somehow still mounted (rmdir/unlink then fail with EBUSY) or a
    directory with content is left alone rather than emptied.
    """
    with contextlib.suppress(OSError):
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        elif target.stat().st_size == 0:
            target.unlink()
    parent = target.parent
    while parent != top and top in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def _error(what: str, path: Path, exc: OSError) -> StorageError:
    return StorageError(f"{what} {path}: {os.strerror(exc.errno or 0)}")
