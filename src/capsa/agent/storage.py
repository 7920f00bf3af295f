"""Mounting the filesystems the host shares with the guest (agent.proto Storage).

``mount_request`` turns a Storage message into the arguments of mount(2)
(pure, tested as data); ``mount``/``unmount`` are the thin shell.  Drivers:

- ``virtiofs``: ``source`` is the virtio-fs tag (virtio spec 1.2, 5.11 "File
  System Device", ``tag``); fstype ``virtiofs``.
- ``9p``: ``source`` is the 9p mount_tag; the virtio transport of
  Documentation/filesystems/9p.rst with 9P2000.L and a large msize (the
  default 8 KiB makes every read a round trip).
- ``blk``: ``source`` is a virtio-blk serial (the host hot-plugged the disk
  with it, :class:`capsa.runtime.mounts.BlockVolume`) or a guest device path.
  :func:`resolve` finds the disk whose ``/sys/block/*/serial`` matches,
  waiting for the hot-plug to reach the guest: the kernel names disks
  ``vda``, ``vdb``... in probe order, which no host can predict.  An empty
  ``fstype`` is read from the superblock (:func:`probe_fstype`).
- ``local``: a guest-local filesystem (``fstype``, default tmpfs).

A block device of the spec's linux.devices arrives as a raw disk too; the
host names its serial in an annotation, and :func:`with_guest_devices`
gives the device entry (and the cgroup rules that name it) the guest
disk's major:minor, so crun makes a node of the right device.

A ``subpath`` names a directory inside a share that the sandbox mounts
once (Kata's shared-directory model, see :mod:`capsa.runtime.mounts`):
:func:`share_subpath` checks it stays inside the share, and
:func:`bind_request` binds it where the container needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from capsa.agent import libc
from capsa.errors import InvalidArgument, StorageError
from capsa.protocols import agent_pb2 as pb

NINE_P_OPTIONS = ("trans=virtio", "version=9p2000.L", "msize=512000")

SYS_BLOCK = "/sys/block"
#: Annotation prefix naming the serial of a linux.devices block device
#: (``<prefix><container path>`` = serial), written by the host's
#: :mod:`capsa.runtime.mounts`, which holds the same value.  Not imported
#: from there: that module brings pathlib, hashlib and urllib into every
#: agent start (a quarter of a second of guest time under TCG).
BLOCK_DEVICE_ANNOTATION = "io.capsa.block-device:"
#: How long a hot-plugged disk may take to appear in the guest (PCIe/ACPI
#: hot-plug, then the virtio-blk probe; well under a second under TCG).
BLOCK_DEVICE_TIMEOUT = 20.0

# Superblock magics (offset, bytes) -> the filesystem mount(2) is told:
# ext2/3/4 s_magic 0xEF53 at byte 1024 + 0x38 (the ext4 driver mounts all
# three); XFS "XFSB" at 0; btrfs "_BHRfS_M" at 64 KiB + 0x40.
_MAGICS = (
    (1080, b"\x53\xef", "ext4"),
    (0, b"XFSB", "xfs"),
    (65600, b"_BHRfS_M", "btrfs"),
)

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
        if not storage.source.startswith("/"):
            raise InvalidArgument(f"block storage {storage.source!r} is a serial: resolve it to a device first")
        if not storage.fstype:
            raise InvalidArgument(f"block storage {storage.source} needs an fstype")
        return MountRequest(storage.source, target, storage.fstype, flags, data)
    if driver == "local":
        fstype = storage.fstype or "tmpfs"
        return MountRequest(storage.source or fstype, target, fstype, flags, data)
    raise InvalidArgument(f"unknown storage driver {driver!r} (virtiofs, 9p, blk, local)")


def find_block_device(serial: str, sys_block: str = SYS_BLOCK, dev_dir: str = "/dev") -> str | None:
    """The device path of the disk whose virtio-blk serial is ``serial``, or None.

    virtio_blk exposes the device's ID string (virtio spec 1.2, 5.2.6,
    VIRTIO_BLK_T_GET_ID) as ``/sys/block/<disk>/serial``.
    """
    try:
        disks = sorted(os.listdir(sys_block))
    except FileNotFoundError:
        return None
    for disk in disks:
        try:
            with open(os.path.join(sys_block, disk, "serial"), encoding="utf-8", errors="replace") as file:
                found = file.read().strip()
        except OSError:
            continue
        if found == serial:
            return os.path.join(dev_dir, disk)
    return None


async def wait_block_device(
    serial: str, timeout: float = BLOCK_DEVICE_TIMEOUT, sys_block: str = SYS_BLOCK, dev_dir: str = "/dev"
) -> str:
    """:func:`find_block_device`, polling until the hot-plugged disk and its device node (devtmpfs) exist."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        device = find_block_device(serial, sys_block, dev_dir)
        if device is not None and os.path.exists(device):
            return device
        if time.monotonic() >= deadline:
            raise StorageError(f"no disk with serial {serial} appeared within {timeout:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def probe_fstype(device: str) -> str:
    """The filesystem on ``device``, from its superblock magic (see ``_MAGICS``)."""
    try:
        with open(device, "rb") as file:
            for offset, magic, fstype in _MAGICS:
                file.seek(offset)
                if file.read(len(magic)) == magic:
                    return fstype
    except OSError as exc:
        raise StorageError(f"cannot read the superblock of {device}: {os.strerror(exc.errno or 0)}") from exc
    raise StorageError(f"{device} holds no filesystem the guest can mount (ext2/3/4, xfs, btrfs)")


async def resolve(
    storage: pb.Storage, timeout: float = BLOCK_DEVICE_TIMEOUT, sys_block: str = SYS_BLOCK, dev_dir: str = "/dev"
) -> pb.Storage:
    """A ``blk`` Storage named by serial, with its guest device and filesystem filled in; others as they are."""
    if storage.driver != "blk" or storage.source.startswith("/"):
        return storage
    resolved = pb.Storage()
    resolved.CopyFrom(storage)
    resolved.source = await wait_block_device(storage.source, timeout, sys_block, dev_dir)
    if not resolved.fstype:
        resolved.fstype = await asyncio.to_thread(probe_fstype, resolved.source)
    return resolved


def block_device_serials(spec: dict[str, Any]) -> dict[str, str]:
    """Container path -> virtio-blk serial of each linux.devices block device the host attached."""
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict):
        return {}
    return {
        key[len(BLOCK_DEVICE_ANNOTATION) :]: value
        for key, value in annotations.items()
        if isinstance(key, str) and key.startswith(BLOCK_DEVICE_ANNOTATION) and isinstance(value, str)
    }


def rewrite_block_devices(spec: dict[str, Any], numbers: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The spec with each named block device's major:minor replaced by the guest's; pure.

    config-linux.md "Devices" gives the node crun makes; "Device allowlist"
    rules for the old major:minor (the host's) must follow it, or the
    container's cgroup would refuse its own device.  The annotations that
    carried the serials are dropped.  The input is not modified.
    """
    linux = spec.get("linux")
    if not numbers or not isinstance(linux, dict):
        return spec
    devices: list[Any] = []
    moved: dict[tuple[Any, Any], tuple[int, int]] = {}
    for entry in linux.get("devices") or []:
        if isinstance(entry, dict) and entry.get("type") == "b" and entry.get("path") in numbers:
            major, minor = numbers[entry["path"]]
            moved[(entry.get("major"), entry.get("minor"))] = (major, minor)
            entry = {**entry, "major": major, "minor": minor}
        devices.append(entry)
    new_linux = {**linux, "devices": devices}
    resources = linux.get("resources")
    if isinstance(resources, dict) and isinstance(resources.get("devices"), list):
        rules: list[Any] = []
        for rule in resources["devices"]:
            if isinstance(rule, dict) and rule.get("type") == "b" and (rule.get("major"), rule.get("minor")) in moved:
                major, minor = moved[(rule["major"], rule["minor"])]
                rule = {**rule, "major": major, "minor": minor}
            rules.append(rule)
        new_linux["resources"] = {**resources, "devices": rules}
    annotations = spec.get("annotations")
    new_spec = {**spec, "linux": new_linux}
    if isinstance(annotations, dict):
        new_spec["annotations"] = {
            key: value for key, value in annotations.items() if not str(key).startswith(BLOCK_DEVICE_ANNOTATION)
        }
    return new_spec


async def with_guest_devices(
    spec: dict[str, Any], timeout: float = BLOCK_DEVICE_TIMEOUT, sys_block: str = SYS_BLOCK, dev_dir: str = "/dev"
) -> dict[str, Any]:
    """The spec with its attached block devices renumbered (:func:`rewrite_block_devices`), once they arrived."""
    numbers: dict[str, tuple[int, int]] = {}
    for path, serial in block_device_serials(spec).items():
        device = await wait_block_device(serial, timeout, sys_block, dev_dir)
        try:
            rdev = os.stat(device).st_rdev
        except OSError as exc:
            raise StorageError(f"cannot stat {device}: {os.strerror(exc.errno or 0)}") from exc
        numbers[path] = (os.major(rdev), os.minor(rdev))
    return rewrite_block_devices(spec, numbers)


def same_storage(a: pb.Storage, b: pb.Storage) -> bool:
    """Whether two Storage requests mean the same mount (a pod's containers sharing a guest tmpfs)."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


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
