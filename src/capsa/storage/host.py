"""What the host's mount table says about a path (the I/O half of :mod:`capsa.runtime.mounts`).

:func:`tmpfs_size` tells whether a bind source is a tmpfs mount of its own,
and how big: an engine's /dev/shm directory is one (Podman's
``userdata/shm``, Docker's ``mounts/shm``, the CRI sandbox's ``shm``, each
mounted with ``size=`` from ``--shm-size``), and the guest makes a tmpfs of
that size in its place.

:func:`block_device` finds the host's node of a block device's
major:minor, which is all a linux.devices entry says about the host side.
"""

from __future__ import annotations

import os
from pathlib import Path

from capsa.errors import StorageError

MOUNTINFO = Path("/proc/self/mountinfo")
SYS_DEV_BLOCK = Path("/sys/dev/block")


def mount_types(mountinfo: str) -> dict[str, str]:
    """Mount point -> filesystem type of every mount in a ``/proc/PID/mountinfo`` text.

    The format is proc(5) "/proc/pid/mountinfo": field 5 is the mount point
    (octal escapes for space, tab, newline and backslash), and the first
    field after the lone ``-`` is the filesystem type.  A path mounted over
    several times keeps the last (topmost) mount's type.
    """
    types: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) <= separator + 1:
            continue
        types[_unescape(fields[4])] = fields[separator + 1]
    return types


def tmpfs_size(path: Path, mountinfo: Path = MOUNTINFO) -> int | None:
    """The size in bytes of the tmpfs mounted at ``path``; None if ``path`` is not a tmpfs mount point.

    The size is what statvfs(3) reports (``f_blocks * f_frsize``), which is
    the ``size=`` the engine gave (rounded to pages by the kernel).
    """
    try:
        resolved = os.path.realpath(path)
        types = mount_types(mountinfo.read_text())
    except OSError:
        return None
    if types.get(resolved) != "tmpfs":
        return None
    try:
        stats = os.statvfs(resolved)
    except OSError:
        return None
    size = stats.f_blocks * stats.f_frsize
    return size if size > 0 else None


def mounted_devices(mountinfo: str) -> set[tuple[int, int]]:
    """The ``major:minor`` (field 3 of proc(5) mountinfo) of every mounted filesystem's device."""
    found: set[tuple[int, int]] = set()
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 2 and ":" in fields[2]:
            major, _, minor = fields[2].partition(":")
            if major.isdigit() and minor.isdigit():
                found.add((int(major), int(minor)))
    return found


def check_not_mounted(device: Path, mountinfo: Path = MOUNTINFO) -> None:
    """StorageError if the host has a filesystem of block device ``device`` mounted.

    A filesystem mounted by two kernels at once, the host's and the
    guest's, is corrupted by the first write of either: a block volume the
    guest mounts read-write must be the guest's alone.
    """
    try:
        rdev = os.stat(device).st_rdev
        mounted = mounted_devices(mountinfo.read_text())
    except OSError as exc:
        raise StorageError(f"cannot check whether {device} is mounted: {os.strerror(exc.errno or 0)}") from exc
    if (os.major(rdev), os.minor(rdev)) in mounted:
        raise StorageError(
            f"block device {device} is mounted on the host: the VM cannot mount it read-write as well (use ro)"
        )


def block_device(major: int, minor: int, sys_dev_block: Path = SYS_DEV_BLOCK, dev: Path = Path("/dev")) -> Path | None:
    """The ``/dev`` node of block device ``major:minor`` (its ``DEVNAME`` in sysfs), or None if there is none.

    sysfs-rules.rst: ``/sys/dev/block/<major>:<minor>`` links to the
    device, whose ``uevent`` names its node relative to /dev.
    """
    try:
        uevent = (sys_dev_block / f"{major}:{minor}" / "uevent").read_text()
    except OSError:
        return None
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            node = dev / value
            return node if node.exists() else None
    return None


def _unescape(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` is a space)."""
    if "\\" not in field:
        return field
    out: list[str] = []
    index = 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)
