"""The jail a VMM runs in: its own identity, no privileges, only its own files.

What a process in QEMU's place gets, in the order the child sets it up
between fork and exec (:func:`confine`):

1. Its own mount, IPC and network namespaces (unshare(2) ``CLONE_NEWNS |
   CLONE_NEWIPC | CLONE_NEWNET``), every mount private, so nothing it
   mounts reaches the host and back.  The network namespace is empty: QEMU
   needs none of its own (its NICs arrive as open tap descriptors, which
   keep working in any namespace), and a compromised QEMU reaches no
   network, the host's or the pod's.
2. A fresh tmpfs as its root, holding only what it needs, each at the same
   path as on the host (so QEMU's command line does not change): ``/usr``
   read-only (QEMU, its libraries, firmware and ROMs), the guest kernel and
   image read-only, the VM's socket directory and RAM file read-write (its
   console and stderr are sockets we pass it: hypervisor/bounded_log.py),
   ``/dev/null``, ``/dev/zero``, ``/dev/urandom`` and, where KVM (or vsock)
   is used, a ``/dev/kvm`` (``/dev/vhost-vsock``) node of its own, owned by
   its uid: no host group has to let it in.  No ``/etc``, no ``/proc``, no
   ``/sys``, no ``/home``: nothing of the host it does not need exists there.  The
   tmpfs is made read-only, then becomes ``/`` by pivot_root(2) with the old
   root detached, so there is no way back to the host's tree.
3. Resource limits: open files, file size, no core dumps (setrlimit(2)).
4. ``no_new_privs`` (prctl(2) ``PR_SET_NO_NEW_PRIVS``): no exec can gain
   privileges, whatever it runs.
5. Every capability dropped from the bounding set, the inheritable and
   ambient sets cleared, then the sandbox's own gid, no supplementary
   groups but those named (``kvm`` for ``/dev/kvm``), and its own uid
   (setresgid/setresuid): the kernel clears the permitted and effective
   sets on the move from uid 0.
6. QEMU's own seccomp filter (``-sandbox``, in its command line) then
   removes the system calls a VMM never needs.

7. Its own PID namespace, in which it is PID 1 and sees no other process.
   unshare(2) ``CLONE_NEWPID`` moves only the caller's children, so the
   child execs ``capsa-vmm`` (:data:`VMM_PARENT`, a small C program built
   by scripts/setup.sh, under /usr so the jail holds it), as confined as
   QEMU, which forks QEMU as PID 1 of the new namespace and stays outside
   as its parent: it passes on SIGTERM, SIGINT and SIGHUP and exits as QEMU
   exits (the same status, or the same signal), and QEMU dies with it
   (``PR_SET_PDEATHSIG``) as it dies with its starter.  Without the program
   QEMU runs in the host's PID namespace, and ``capsa check`` says so.

The plan (:func:`jail_plan`) is a pure function of the VM's configuration;
:func:`confine` applies it and is the only part that does I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capsa.agent import libc
from capsa.hypervisor.base import NinePShare, SerialChannel, VirtioFsShare, VMConfig

# <linux/sched.h>
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
# <linux/prctl.h>
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/capability.h>: capset(2) header version 3 (64-bit sets, two words).
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# x86-64 system call numbers (<asm/unistd_64.h>).
_SYS_CAPSET = 126
_SYS_PIVOT_ROOT = 155

#: The PID namespace's outside parent (src/capsa/hypervisor/vmm/capsa-vmm.c).
VMM_PARENT = Path("/usr/local/libexec/capsa/capsa-vmm")

#: Devices every VMM needs: /dev/null and /dev/zero for its own plumbing,
#: /dev/urandom behind the guest's virtio-rng.
BASE_DEVICES = (Path("/dev/null"), Path("/dev/zero"), Path("/dev/urandom"))
KVM_DEVICE = Path("/dev/kvm")
VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")
#: Open files: a VMM holds a few per vCPU and device (eventfds, ioeventfds).
NOFILE_LIMIT = 4096
#: Bytes beyond the guest's largest RAM block any file QEMU writes may
#: reach.  RLIMIT_FSIZE also bounds the memfds QEMU sizes for guest RAM and
#: hot-plugged DIMMs, so the limit is the VM's largest possible memory plus
#: this; what it still bounds is a file QEMU grows by writing (a saved
#: state) to that size.  Its console and stderr are sockets (hypervisor/bounded_log.py).
FSIZE_MARGIN = 256 << 20


@dataclass(frozen=True)
class Confinement:
    """Who a VMM runs as, and whether in a jail (``[security]``)."""

    uid: int
    gid: int
    jailed: bool = True

    def plan(self, vm: VMConfig) -> JailPlan:
        return jail_plan(
            vm,
            root=jail_root(vm),
            uid=self.uid,
            gid=self.gid,
            kvm_gid=kvm_gid(),
            jailed=self.jailed,
            host_links=merged_usr_links(),
            pid_parent=VMM_PARENT if os.access(VMM_PARENT, os.X_OK) else None,
        )


def jail_root(vm: VMConfig) -> Path:
    """The empty host directory the VMM's jail is mounted over: beside its socket directory."""
    return vm.run_dir.with_name(vm.run_dir.name + ".jail")


def kvm_gid() -> int | None:
    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


def prepare(vm: VMConfig, uid: int, gid: int) -> None:
    """Make what the VMM writes its uid's, before it starts (see :func:`owned_paths`).

    The socket directory 0700, the RAM file 0600 and
    already as large as the guest's RAM: QEMU then never grows it, and its
    file size limit can stay small.  The jail's mount point is made empty.
    """
    vm.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chown(vm.run_dir, uid, gid)
    os.chmod(vm.run_dir, 0o700)
    root = jail_root(vm)
    root.mkdir(exist_ok=True, mode=0o700)
    if vm.memory_file is not None:
        fd = os.open(vm.memory_file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size == 0:
                os.ftruncate(fd, vm.memory_mib << 20)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def release(vm: VMConfig) -> None:
    """Undo :func:`prepare` where it matters: the jail's mount point goes, the RAM file is root's again."""
    with contextlib.suppress(OSError):
        jail_root(vm).rmdir()
    if vm.memory_file is not None:
        with contextlib.suppress(OSError):
            os.chown(vm.memory_file, 0, 0)


@dataclass(frozen=True)
class JailBind:
    """A host path made visible at the same path in the jail."""

    path: Path
    writable: bool = False


@dataclass(frozen=True)
class JailPlan:
    """Everything :func:`confine` does, as data."""

    #: An empty directory on the host; the jail's tmpfs is mounted over it
    #: (in the VMM's own mount namespace only) and becomes its ``/``.
    root: Path
    uid: int
    gid: int
    #: Supplementary groups (``kvm``'s gid where /dev/kvm is used).
    groups: tuple[int, ...]
    binds: tuple[JailBind, ...]
    #: Host device nodes made anew in the jail, same numbers, owned by ``uid`` (0600).
    devices: tuple[Path, ...]
    #: Symbolic links the host's merged /usr layout has (``/lib -> usr/lib``).
    links: tuple[tuple[Path, str], ...]
    rlimits: tuple[tuple[int, int], ...]
    #: Only confine the identity (no namespaces, no jail root): ``[security] jail = false``.
    jailed: bool = True
    #: The program that becomes QEMU's parent outside its own PID namespace;
    #: None: no PID namespace (the program is missing).
    pid_parent: Path | None = None

    def wrap(self, argv: list[str]) -> list[str]:
        """The command line to exec: ``argv`` behind its PID namespace's parent, if any."""
        if self.jailed and self.pid_parent is not None:
            return [str(self.pid_parent), *argv]
        return argv


def jail_plan(
    vm: VMConfig,
    *,
    root: Path,
    uid: int,
    gid: int,
    kvm_gid: int | None,
    jailed: bool = True,
    host_links: tuple[tuple[Path, str], ...] = (),
    pid_parent: Path | None = None,
) -> JailPlan:
    """What ``vm``'s QEMU needs in its jail; pure (``host_links`` come from :func:`merged_usr_links`)."""
    binds: list[JailBind] = [JailBind(Path("/usr"))]
    binds += [JailBind(device, writable=True) for device in BASE_DEVICES]
    groups: tuple[int, ...] = ()
    # Device nodes QEMU opens read-write that are root's on the host: in a
    # jail, nodes of its own (same device numbers, its uid's, 0600); without
    # one, the kvm group.
    devices: list[Path] = []
    if vm.accelerator == "kvm":
        devices.append(KVM_DEVICE)
        if kvm_gid is not None and not jailed:
            groups = (kvm_gid,)
    if not isinstance(vm.agent_channel, SerialChannel):
        devices.append(VHOST_VSOCK_DEVICE)
    for path in (vm.kernel, vm.initrd, vm.rootfs_image, vm.firmware):
        if path is not None:
            binds.append(JailBind(path))
    # Sockets: its agent socket and the virtiofsd sockets it connects to.
    binds.append(JailBind(vm.run_dir, writable=True))
    for share in vm.shares:
        if isinstance(share, VirtioFsShare) and share.socket_path.parent != vm.run_dir:
            binds.append(JailBind(share.socket_path, writable=True))
        elif isinstance(share, NinePShare):
            binds.append(JailBind(share.host_path, writable=not share.readonly))
    if vm.memory_file is not None:
        binds.append(JailBind(vm.memory_file, writable=True))
    rlimits = (
        (resource.RLIMIT_NOFILE, NOFILE_LIMIT),
        (resource.RLIMIT_FSIZE, ((vm.max_memory_mib or vm.memory_mib) << 20) + FSIZE_MARGIN),
        (resource.RLIMIT_CORE, 0),
    )
    return JailPlan(
        root=root,
        uid=uid,
        gid=gid,
        groups=groups,
        binds=tuple(dict.fromkeys(binds)),
        devices=tuple(devices),
        links=host_links,
        rlimits=rlimits,
        jailed=jailed,
        pid_parent=pid_parent if jailed else None,
    )


def owned_paths(vm: VMConfig) -> tuple[Path, ...]:
    """What the VMM's uid must own: its socket directory and RAM file."""
    paths = [vm.run_dir]
    if vm.memory_file is not None:
        paths.append(vm.memory_file)
    return tuple(paths)


def merged_usr_links() -> tuple[tuple[Path, str], ...]:
    """The host's top-level links into /usr (Debian 12: /lib, /lib64, /bin, /sbin), so the
    dynamic loader and ``#!`` paths resolve in the jail as on the host."""
    links = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if target.lstrip("/").startswith("usr/"):
            links.append((path, target))
    return tuple(links)


def _sys(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount_point(target: Path, source: Path) -> None:
    """An empty file or directory at ``target`` (in the jail's tmpfs) to bind ``source`` on."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if source.is_dir():
        target.mkdir(exist_ok=True, mode=0o755)
    elif not target.exists():
        target.touch(mode=0o600)


def confine(plan: JailPlan) -> None:
    """Apply ``plan`` to the calling process (a forked child, before exec); see the module docstring."""
    lib = ctypes.CDLL(None, use_errno=True)
    if plan.jailed:
        pid = CLONE_NEWPID if plan.pid_parent is not None else 0
        libc.unshare(libc.CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | pid)
        libc.mount("none", "/", "", libc.MS_REC | libc.MS_PRIVATE)
        root = str(plan.root)
        # Not nodev: it holds the VMM's own device nodes (it cannot make any:
        # no CAP_MKNOD, and the tmpfs is read-only before it runs).
        libc.mount("capsa-jail", root, "tmpfs", libc.MS_NOSUID, "mode=0755,size=1m,nr_inodes=4096")
        for bind in plan.binds:
            target = Path(root + str(bind.path))
            _mount_point(target, bind.path)
            libc.mount(str(bind.path), str(target), "", libc.MS_BIND | libc.MS_REC)
            flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_NOSUID
            if not bind.writable:
                flags |= libc.MS_RDONLY
            if not bind.path.is_relative_to("/dev"):
                flags |= libc.MS_NODEV
            libc.mount("none", str(target), "", flags)
        for device in plan.devices:
            target = Path(root + str(device))
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            os.mknod(target, stat.S_IFCHR | 0o600, os.stat(device).st_rdev)
            os.chown(target, plan.uid, plan.gid)
        for link, target_name in plan.links:
            os.symlink(target_name, root + str(link))
        libc.mount("none", root, "", libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV)
        # pivot_root(".", "."): the old root is stacked under the new one
        # and detached at once (pivot_root(2), NOTES), leaving no way back.
        os.chdir(root)
        _sys(lib.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        libc.umount(".", libc.MNT_DETACH)
        os.chdir("/")
    for limit, value in plan.rlimits:
        resource.setrlimit(limit, (value, value))
    _sys(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    for cap in range(last_capability() + 1):
        _sys(lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    _sys(lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    os.setgroups(list(plan.groups))
    os.setresgid(plan.gid, plan.gid, plan.gid)
    os.setresuid(plan.uid, plan.uid, plan.uid)
    _clear_capabilities(lib)


def _clear_capabilities(lib: ctypes.CDLL) -> None:
    """capset(2) with every set empty: the inheritable set survives setuid otherwise."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    _sys(lib.syscall(_SYS_CAPSET, header, data), "capset")


def last_capability() -> int:
    """The highest capability number this kernel knows (``/proc/sys/kernel/cap_last_cap``)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, Linux 5.9+


def confine_hook(plan: JailPlan, then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` applying ``plan``, then ``then`` (the die-with-parent hook, which
    must come after the uid change: that clears the parent-death signal).

    A failure is written to the child's stderr (the VMM's log) as one line
    and the child exits 126, so the caller reports it like QEMU's own.
    """

    def hook() -> None:
        try:
            confine(plan)
        except OSError as exc:
            os.write(2, f"capsa: cannot confine the VMM: {exc.strerror or exc}\n".encode())
            os._exit(126)
        if then is not None:
            then()

    return hook


def vmm_pid(pid: int) -> int:
    """The VMM itself behind ``pid``: its child when ``pid`` is its ``capsa-vmm`` parent
    (``/proc/PID/task/PID/children``), else ``pid``."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pid
    return int(children[0]) if len(children) == 1 else pid
