"""Bringing up the guest userspace: what an init does before anything else.

The guest has no systemd, no udev, no mount binary: the agent as PID 1 mounts
the API filesystems crun and the containers expect (runtime-spec
config-linux.md assumes /proc, /sys, /dev, cgroup2), creates the /dev
symlinks a udev would, enables the cgroup v2 controllers, and at the end
powers the VM off.  ``INIT_MOUNTS`` is data; ``bring_up`` is the shell.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

from capsa.agent import libc
from capsa.agent.storage import MountRequest

log = logging.getLogger("capsa.agent")

_NO_EXEC_DEV = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC

# Order matters: /dev before /dev/pts and /dev/shm, /sys before its cgroup2.
INIT_MOUNTS: tuple[MountRequest, ...] = (
    MountRequest("proc", "/proc", "proc", _NO_EXEC_DEV),
    MountRequest("sysfs", "/sys", "sysfs", _NO_EXEC_DEV),
    MountRequest("devtmpfs", "/dev", "devtmpfs", libc.MS_NOSUID, "mode=0755"),
    # newinstance: a devpts of our own, so container ptys (crun mounts a
    # fresh devpts in each container) never share numbering with the agent's;
    # ptmxmode=0666 makes /dev/pts/ptmx usable through the /dev/ptmx symlink.
    MountRequest(
        "devpts", "/dev/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"
    ),
    MountRequest("shm", "/dev/shm", "tmpfs", _NO_EXEC_DEV, "mode=1777"),
    MountRequest("tmpfs", "/run", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755"),
    MountRequest("tmpfs", "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777"),
    MountRequest("cgroup2", "/sys/fs/cgroup", "cgroup2", _NO_EXEC_DEV, "nsdelegate"),
)

# What udev (or systemd-tmpfiles) would create in /dev; kernel
# Documentation/admin-guide/devices.rst "Compulsory links".
DEV_SYMLINKS: tuple[tuple[str, str], ...] = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
    ("pts/ptmx", "/dev/ptmx"),
)

DEFAULT_HOSTNAME = "capsa"

# What a container may learn of, or ask of, the guest kernel, set before
# any container runs (Documentation/admin-guide/sysctl/kernel.rst, vm.rst):
# kernel pointers shown as zeros even to root in a container (2), the kernel
# log only to CAP_SYSLOG, no unprivileged BPF (2: an admin may still allow
# it), no unprivileged userfaultfd (a staple of kernel exploits), no perf
# events for containers.  A knob the kernel lacks is a feature built out of
# it (our kernel has no userfaultfd, no perf events and no module loading at
# all): nothing to restrict.
HARDENING_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("kernel/kptr_restrict", "2"),
    ("kernel/dmesg_restrict", "1"),
    ("kernel/unprivileged_bpf_disabled", "2"),
    ("vm/unprivileged_userfaultfd", "0"),
    ("kernel/perf_event_paranoid", "3"),
)

# netdevice(7): SIOCGIFFLAGS / SIOCSIFFLAGS (<linux/sockios.h>) on a struct
# ifreq (IFNAMSIZ name, then a union whose ifr_flags is a short; 40 bytes);
# IFF_UP from <linux/if.h>.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ_FLAGS = struct.Struct("16sh22x")


def mount_api_filesystems(mounts: tuple[MountRequest, ...] = INIT_MOUNTS) -> None:
    """Mount each entry; one that is already there (EBUSY) is left alone."""
    for request in mounts:
        try:
            os.makedirs(request.target, exist_ok=True)
            libc.mount(request.source, request.target, request.fstype, request.flags, request.data)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise


def make_dev_symlinks(links: tuple[tuple[str, str], ...] = DEV_SYMLINKS) -> None:
    for source, name in links:
        if not os.path.lexists(name):
            os.symlink(source, name)


def subtree_control_line(controllers: str) -> str:
    """``cgroup.controllers`` content -> what to write to ``cgroup.subtree_control``.

    Documentation/admin-guide/cgroup-v2.rst "Enabling and Disabling": a
    space-separated list of ``+controller``.  The root cgroup is exempt from
    the no-internal-process rule, so enabling everything there is allowed
    even though the agent itself lives in it.
    """
    return " ".join(f"+{name}" for name in controllers.split())


def enable_cgroup_controllers(root: str = "/sys/fs/cgroup") -> None:
    with open(os.path.join(root, "cgroup.controllers"), encoding="ascii") as file:
        line = subtree_control_line(file.read())
    if line:
        with open(os.path.join(root, "cgroup.subtree_control"), "w", encoding="ascii") as file:
            file.write(line)


def set_link_up(name: str) -> bool:
    """Set a network link up (``ip link set NAME up``); False if it already was.

    Two ioctls rather than netlink: the loopback link is brought up at every
    boot, and pyroute2 is imported only when a NIC is configured.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        request = _IFREQ_FLAGS.pack(name.encode(), 0)
        _, flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))
        if flags & IFF_UP:
            return False
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags | IFF_UP))
        return True


def harden(sysctls: tuple[tuple[str, str], ...] = HARDENING_SYSCTLS, proc_sys: str = "/proc/sys") -> list[str]:
    """Write :data:`HARDENING_SYSCTLS`; return the ones that failed (logged, not fatal).

    A sysctl the kernel does not have is skipped: its feature is not built in.
    """
    failed = []
    for name, value in sysctls:
        path = os.path.join(proc_sys, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            failed.append(f"{name}: {exc.strerror}")
    return failed


#: The guest's root image (virtio-pmem), when it boots from one.
ROOT_IMAGE_DEVICE = "/dev/pmem0"
#: ioctl(2) that marks a block device read-only (linux/fs.h: _IO(0x12, 93)).
BLKROSET = 0x125D


def make_root_image_read_only(device: str = ROOT_IMAGE_DEVICE) -> str | None:
    """Mark the root image's block device read-only; why not, or None.

    The host maps the image read-only and no write reaches the file; this
    makes a write from the guest fail at once (EPERM/EROFS) instead of
    reaching QEMU's read-only mapping, where under TCG the writer hangs.
    No device (an initrd boot): nothing to do.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    try:
        fcntl.ioctl(fd, BLKROSET, struct.pack("i", 1))
    except OSError as exc:
        return f"{device}: BLKROSET: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def bring_up(hostname: str = DEFAULT_HOSTNAME) -> None:
    """The rest of PID 1's setup once the API filesystems are mounted."""
    for problem in harden():
        log.warning("cannot harden the guest kernel: %s", problem)
    if refused := make_root_image_read_only():
        log.warning("cannot make the root image read-only: %s", refused)
    make_dev_symlinks()
    try:
        enable_cgroup_controllers()
    except OSError as exc:
        # Containers still run without controllers, only without limits.
        log.warning("cannot enable cgroup controllers: %s", exc)
    socket.sethostname(hostname)
    try:
        # The kernel gives lo 127.0.0.1/8 and ::1 when it goes up; containers
        # sharing the guest's network (a network namespace path in the spec)
        # expect it, as they had it on the host.
        set_link_up("lo")
    except OSError as exc:
        log.warning("cannot set the loopback link up: %s", exc)


def power_off() -> None:
    """Flush filesystems and power the VM off (QEMU exits: ACPI S5)."""
    os.sync()
    libc.power_off()


def root_is_initramfs(mountinfo: str) -> bool:
    """Whether ``/`` is the initramfs (fstype rootfs) per /proc/self/mountinfo.

    proc(5) mountinfo: field 5 is the mount point; after the ``-`` separator
    comes the filesystem type.  The last entry for ``/`` is the visible one.
    """
    fstype = ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7 or fields[4] != "/" or "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if separator + 1 < len(fields):
            fstype = fields[separator + 1]
    return fstype == "rootfs"


def init_exec_uptime(kmsg_records: list[str]) -> float | None:
    """When the kernel exec'd /init, in seconds of uptime, from its log records.

    init/main.c run_init_process logs "Run %s as init process" right before
    the exec.  /dev/kmsg records are ``PRIORITY,SEQ,USEC,FLAGS;MESSAGE``
    (Documentation/ABI/testing/dev-kmsg).  The process start time in
    /proc/1/stat cannot serve: PID 1 starts as a kernel thread long before
    it execs /init.
    """
    for record in kmsg_records:
        header, _, message = record.partition(";")
        if message.startswith("Run ") and message.rstrip().endswith(" as init process"):
            fields = header.split(",")
            if len(fields) >= 3 and fields[2].isdigit():
                return int(fields[2]) / 1e6
    return None


def read_kmsg() -> list[str]:
    """Every record still in the kernel's log buffer (non-blocking read of /dev/kmsg)."""
    records: list[str] = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while reading: skip ahead
                    continue
                raise
            if not record:
                break
            records.append(record.decode("utf-8", "replace"))
    finally:
        os.close(fd)
    return records
