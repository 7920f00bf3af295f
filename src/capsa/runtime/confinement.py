"""Which confinement measures are in force for this host and configuration.

One list, read by ``capsa check`` (one line each, with the reason when a
measure is off) and ``capsa env --json`` (``confinement``).  Every measure
is on by default; each can be turned off in ``[security]``, and some fall
back when the host or the configuration cannot give them (9p needs a root
QEMU).  docs/architecture.md, "Confinement", says what each one stops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from capsa.config import Config
from capsa.hypervisor.jail import VMM_PARENT, kvm_gid


@dataclass(frozen=True)
class Measure:
    name: str
    on: bool
    detail: str


def measures(config: Config) -> list[Measure]:
    security = config.security
    nine_p = config.shared_fs.kind == "virtio-9p"
    unprivileged = security.unprivileged_vmm and not nine_p
    first = security.sandbox_id_base
    last = first + security.sandbox_id_count - 1
    if unprivileged:
        identity = f"QEMU runs as a uid/gid of its sandbox's own ({first}..{last}), with no capabilities"
    elif nine_p:
        identity = "off: shared_fs.kind = virtio-9p (QEMU serves 9p itself, which needs root)"
    else:
        identity = "off: [security] unprivileged_vmm = false (QEMU runs as root with every capability)"
    jailed = unprivileged and security.jail
    if jailed and os.access(VMM_PARENT, os.X_OK):
        jail = "QEMU's root is a tmpfs holding only its files; own mount, PID and IPC namespaces"
    elif jailed:
        jail = (
            f"QEMU's root is a tmpfs holding only its files; own mount and IPC namespaces, but the host's "
            f"PID namespace: {VMM_PARENT} is missing (scripts/setup.sh builds it)"
        )
    elif not security.jail:
        jail = "off: [security] jail = false (QEMU sees the host's file system and processes)"
    else:
        jail = "off: needs the unprivileged VMM (a root process can leave a chroot)"
    kvm = kvm_gid()
    if jailed:
        kvm_detail = "/dev/kvm reaches QEMU as a node of its own in its jail, owned by its uid"
    elif kvm is not None:
        kvm_detail = f"/dev/kvm reaches QEMU through the kvm group ({kvm})"
    else:
        kvm_detail = "no jail and no kvm group: an unprivileged QEMU cannot open /dev/kvm"
    found = [
        Measure("unprivileged_vmm", unprivileged, identity),
        Measure("no_new_privs", unprivileged, "QEMU can gain no privilege by exec" if unprivileged else "off"),
        Measure("seccomp", True, "QEMU: -sandbox on (obsolete, elevateprivileges, spawn, resourcecontrol denied)"),
        Measure("jail", jailed, jail),
        Measure(
            "rlimits",
            unprivileged,
            "QEMU: open files, file size, no core dumps; virtiofsd: no core dumps" if unprivileged else "off",
        ),
        Measure(
            "cgroup_limits",
            security.cgroup_limits,
            "memory, pids and CPU limits on each sandbox's host cgroup"
            if security.cgroup_limits
            else "off: [security] cgroup_limits = false (accounting only)",
        ),
        Measure(
            "virtiofsd",
            config.shared_fs.kind == "virtio-fs",
            "root (to serve files with their owners), its own mount/PID/net namespaces, seccomp, "
            "no_new_privs, capabilities reduced to chown, dac_override, fowner, fsetid, setgid, setuid, setfcap"
            if not nine_p
            else "not used (9p)",
        ),
        Measure("kvm_device", jailed or kvm is not None or not unprivileged, kvm_detail),
    ]
    return found
