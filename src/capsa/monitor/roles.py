"""Which of a sandbox's host processes plays which part (docs/architecture.md,
"The processes of one container" and "containerd's shim v2").

A runc-CLI container's processes hang from two anchors recorded in its
``state.json``: the shim (``pid``) and the proxy (``proxy_pid``), plus a
shim per ``capsa exec``.  A shim v2 pod's hang from its one
``containerd-shim-capsa-v2`` process.  Below an anchor, a process takes the
role its command name says (virtiofsd, the jailed QEMU's ``capsa-vmm``
parent, QEMU) and otherwise its parent's, so whatever a part runs counts as
that part's cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from capsa.monitor.procfs import MemoryUse, ProcessTable


class Role:
    SHIM = "shim"  # capsa-shim of the container's init, or the shim v2 of a pod
    EXEC_SHIM = "exec-shim"  # capsa-shim of a `capsa exec` process
    PROXY = "proxy"
    VIRTIOFSD = "virtiofsd"
    VMM = "vmm"  # capsa-vmm, the jailed QEMU's parent outside its PID namespace
    QEMU = "qemu"


ALL_ROLES = (Role.SHIM, Role.EXEC_SHIM, Role.PROXY, Role.VIRTIOFSD, Role.VMM, Role.QEMU)


def role_by_comm(comm: str) -> str | None:
    """The role a command name announces, if any (``comm`` is at most 15 bytes: ``qemu-system-x86``)."""
    if comm == "virtiofsd":
        return Role.VIRTIOFSD
    if comm == "capsa-vmm":
        return Role.VMM
    if comm.startswith("qemu-system") or comm == "kvm":
        return Role.QEMU
    return None


def assign_roles(table: ProcessTable, anchors: Iterable[tuple[int, str]], hypervisor_pid: int = 0) -> dict[int, str]:
    """Every live process below the anchors (``(pid, role)`` pairs), anchors included, with its role.

    ``hypervisor_pid`` is QEMU's own PID when known (``state.json``): it is
    QEMU whatever its command name (a configured binary may be called
    anything).  What ``capsa-vmm`` starts is QEMU.
    """
    roles: dict[int, str] = {}
    pending: list[tuple[int, str]] = [(pid, role) for pid, role in anchors if table.alive(pid)]
    while pending:
        pid, role = pending.pop()
        if pid in roles:
            continue
        roles[pid] = role
        for child in table.children(pid):
            stat = table.get(child)
            if stat is None or stat.dead:
                continue
            if child == hypervisor_pid or role in (Role.VMM, Role.QEMU):
                child_role = Role.QEMU
            else:
                child_role = role_by_comm(stat.comm) or role
            pending.append((child, child_role))
    return roles


@dataclass(frozen=True)
class RoleUsage:
    """What one role's processes of a sandbox cost the host."""

    processes: int
    cpu_seconds: float
    rss_bytes: int
    pss_bytes: int


def host_usage(
    roles: Mapping[int, str], table: ProcessTable, memory: Mapping[int, MemoryUse | None]
) -> dict[str, RoleUsage]:
    """Sum CPU time and memory by role.  A process whose memory could not be read counts for its CPU time only."""
    totals: dict[str, tuple[int, int, int, int]] = {}
    for pid, role in roles.items():
        stat = table.get(pid)
        if stat is None:
            continue
        use = memory.get(pid)
        count, ticks, rss, pss = totals.get(role, (0, 0, 0, 0))
        totals[role] = (
            count + 1,
            ticks + stat.cpu_ticks,
            rss + (use.rss_bytes if use else 0),
            pss + (use.pss_bytes if use else 0),
        )
    return {
        role: RoleUsage(count, ticks / table.clock_ticks, rss, pss) for role, (count, ticks, rss, pss) in totals.items()
    }


def boot_kind(qemu_argv: Iterable[str]) -> str:
    """``template`` for a VM restored from a template (QEMU waits with ``-incoming defer``,
    hypervisor/template.py ``clone_vm``), ``cold`` for one that booted its kernel."""
    return "template" if "-incoming" in qemu_argv else "cold"
