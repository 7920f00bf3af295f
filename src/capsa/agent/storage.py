"""Mounting the filesystems the host shares with the guest (agent.proto Storage).

``mount_request`` turns a Storage message into the arguments of mount(2)
(pure, tested as data); ``mount``/``unmount`` are the thin shell.  Drivers:

- ``virtiofs``: ``source`` is the virtio-fs tag (virtio spec 1.2, 5.11 "File
  System Device", ``tag``); fstype ``virtiofs``.
- ``9p``: ``source`` is the 9p mount_tag; the virtio transport of
  Documentation/filesystems/9p.rst with 9P2000.L and a large msize (the
  default 8 KiB makes every read a round trip).
- ``blk``: ``source`` is a block device, ``fstype`` names its filesystem.
- ``local``: a guest-local filesystem (``fstype``, default tmpfs).

A ``subpath`` names a directory inside a share that the sandbox mounts
once (Kata's shared-directory model, see :mod:`capsa.runtime.mounts`):
:func:`share_subpath` checks it stays inside the share, and
:func:`bind_request` binds it where the container needs it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from dataclasses import dataclass

from capsa.agent import libc
from capsa.errors import InvalidArgument, StorageError
from capsa.protocols import agent_pb2 as pb

NINE_P_OPTIONS = ("trans=virtio", "version=9p2000.L", "msize=512000")

# mount(8) option words that are mount(2) flags rather than filesystem data.
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (libc.MS_RDONLY, True),
    "rw": (libc.MS_RDONLY, False),
    "nosuid": (libc.MS_NOSUID, True),
    "suid": (libc.MS_NOSUID, False),
    "nodev": (libc.MS_NODEV, True),
    "dev": (libc.MS_NODEV, False),
    "noexec": (libc.MS_NOEXEC, True),
    "exec": (libc.MS_NOEXEC, False),
    "sync": (libc.MS_SYNCHRONOUS, True),
    "async": (libc.MS_SYNCHRONOUS, False),
    "dirsync": (libc.MS_DIRSYNC, True),
    "noatime": (libc.MS_NOATIME, True),
    "atime": (libc.MS_NOATIME, False),
    "nodiratime": (libc.MS_NODIRATIME, True),
    "diratime": (libc.MS_NODIRATIME, False),
    "relatime": (libc.MS_RELATIME, True),
    "norelatime": (libc.MS_RELATIME, False),
    "strictatime": (libc.MS_STRICTATIME, True),
    "bind": (libc.MS_BIND, True),
    "rbind": (libc.MS_BIND | libc.MS_REC, True),
    "defaults": (0, True),
}


@dataclass(frozen=True)
class MountRequest:
    """The arguments of one mount(2) call."""

    source: str
    target: str
    fstype: str
    flags: int = 0
    data: str = ""


def split_options(options: list[str] | tuple[str, ...]) -> tuple[int, str]:
    """mount(8)-style option words -> (mount(2) flags, filesystem data string)."""
    flags = 0
    data: list[str] = []
    for option in options:
        for word in option.split(","):
            word = word.strip()
            if not word:
                continue
            known = _FLAG_OPTIONS.get(word)
            if known is None:
                data.append(word)
            elif known[1]:
                flags |= known[0]
            else:
                flags &= ~known[0]
    return flags, ",".join(data)


def mount_request(storage: pb.Storage, default_target: str = "") -> MountRequest:
    """What to mount for ``storage``, at its mount_point or ``default_target``."""
    target = storage.mount_point or default_target
    if not target or not os.path.isabs(target):
        raise InvalidArgument(f"storage {storage.source!r} needs an absolute mount_point, got {target!r}")
    if not storage.source and storage.driver != "local":
        raise InvalidArgument(f"storage at {target} has no source")
    flags, data = split_options(list(storage.options))
    driver = storage.driver
    if driver == "virtiofs":
        return MountRequest(storage.source, target, "virtiofs", flags, data)
    if driver == "9p":
        extra = [word for word in data.split(",") if word]
        given = {word.split("=", 1)[0] for word in extra}
        defaults = [word for word in NINE_P_OPTIONS if word.split("=", 1)[0] not in given]
        return MountRequest(storage.source, target, "9p", flags, ",".join([*defaults, *extra]))
    if driver == "blk":
        if not storage.fstype:
            raise InvalidArgument(f"block storage {storage.source} needs an fstype")
        return MountRequest(storage.source, target, storage.fstype, flags, data)
    if driver == "local":
        fstype = storage.fstype or "tmpfs"
        return MountRequest(storage.source or fstype, target, fstype, flags, data)
    raise InvalidArgument(f"unknown storage driver {driver!r} (virtiofs, 9p, blk, local)")


def share_subpath(share_point: str, subpath: str) -> str:
    """The guest path of ``subpath`` inside the share mounted at ``share_point``.

    The host names a directory of its shared dir ("<cid>/rootfs"); it must
    be relative and must not climb out with ``..``, or a request could bind
    any guest directory as a container's rootfs.
    """
    if not subpath or subpath.startswith("/"):
        raise InvalidArgument(f"storage subpath must be a relative path, got {subpath!r}")
    parts = [part for part in subpath.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidArgument(f"storage subpath {subpath!r} must name a directory inside the share")
    return posixpath.join(share_point, *parts)


def bind_request(source: str, target: str) -> MountRequest:
    """A plain bind mount (mount(2) MS_BIND) of ``source`` at ``target``."""
    return MountRequest(source, target, "", libc.MS_BIND)


def mount(request: MountRequest) -> None:
    """Create the target directory and mount; StorageError names what failed."""
    try:
        os.makedirs(request.target, exist_ok=True)
        libc.mount(request.source, request.target, request.fstype, request.flags, request.data)
    except OSError as exc:
        what = f"{request.fstype} {request.source!r}" if request.fstype else f"bind of {request.source}"
        raise StorageError(f"cannot mount {what} at {request.target}: {os.strerror(exc.errno or 0)}") from exc


def unmount(target: str) -> None:
    """Unmount ``target``; a busy mount is detached (MNT_DETACH) instead."""
    try:
        libc.umount(target)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a mount point (any more)
            return
        if exc.errno != errno.EBUSY:
            raise StorageError(f"cannot unmount {target}: {os.strerror(exc.errno or 0)}") from exc
        with contextlib.suppress(OSError):
            libc.umount(target, libc.MNT_DETACH)
