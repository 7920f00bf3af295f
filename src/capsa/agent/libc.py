"""The Linux system calls the agent needs that Python's standard library lacks.

The guest has no ``mount`` binary and no shell, and spawning one would cost
startup time anyway, so mount(2), umount2(2), reboot(2) and
prctl(PR_SET_CHILD_SUBREAPER) are called through libc with :mod:`ctypes`.
The host side uses mount(2) and unshare(2) from here too
(:mod:`capsa.storage.shared`: Python 3.11 has no ``os.unshare``).
Constants are the x86-64/generic Linux values from ``<sys/mount.h>``,
``<linux/reboot.h>``, ``<linux/prctl.h>`` and ``<linux/sched.h>``.
"""

from __future__ import annotations

import ctypes
import os

# mount(2) flags, <linux/mount.h>.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

# umount2(2) flags.
MNT_FORCE = 0x1
MNT_DETACH = 0x2

# unshare(2) flag, <linux/sched.h>.
CLONE_NEWNS = 0x00020000

# reboot(2) command, <linux/reboot.h> LINUX_REBOOT_CMD_POWER_OFF.
RB_POWER_OFF = 0x4321FEDC

# prctl(2), <linux/prctl.h>.
PR_SET_CHILD_SUBREAPER = 36

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # CDLL(None) is the already-loaded C library of the interpreter: no
        # path lookup, no extra file opened.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str, path: str | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError carrying errno and the target path."""
    result = _lib().mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(result, f"mount {source} ({fstype or 'bind'})", target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_lib().umount2(target.encode(), ctypes.c_int(flags)), "umount", target)


def unshare(flags: int) -> None:
    """unshare(2); raises OSError carrying errno."""
    _check(_lib().unshare(ctypes.c_int(flags)), "unshare")


def power_off() -> None:
    """reboot(LINUX_REBOOT_CMD_POWER_OFF): only returns if the kernel refused."""
    _check(_lib().reboot(ctypes.c_int(RB_POWER_OFF)), "reboot(RB_POWER_OFF)")


# inotify(7), <sys/inotify.h>.
IN_MODIFY = 0x2
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


def inotify_init() -> int:
    """inotify_init1(IN_NONBLOCK | IN_CLOEXEC): a new inotify file descriptor."""
    fd = _lib().inotify_init1(ctypes.c_int(IN_NONBLOCK | IN_CLOEXEC))
    _check(0 if fd >= 0 else -1, "inotify_init1")
    return int(fd)


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """inotify_add_watch(2): the watch descriptor (the same one again for a path already watched)."""
    wd = _lib().inotify_add_watch(ctypes.c_int(fd), path.encode(), ctypes.c_uint32(mask))
    _check(0 if wd >= 0 else -1, "inotify_add_watch", path)
    return int(wd)


def set_child_subreaper() -> None:
    """Make orphaned descendants re-parent to this process (see prctl(2)).

    PID 1 gets every orphan anyway; outside a guest (tests on the host) this
    gives the agent the same view of the container processes crun leaves
    behind when it exits.
    """
    result = _lib().prctl(ctypes.c_int(PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), 0, 0, 0)
    _check(result, "prctl(PR_SET_CHILD_SUBREAPER)")
