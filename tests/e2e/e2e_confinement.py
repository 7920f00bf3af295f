"""What the kernel says about a QEMU an engine's container runs in: confined (issue 13).

The same facts tests/integration/test_confinement_vm.py checks for the runc
CLI, read here for QEMUs the engines started (Podman, Docker, containerd's
runc shim, the shim v2 and CRI pods), found by the session's marker.
"""

from __future__ import annotations

import os
from pathlib import Path

from e2e_support import processes

from capsa.config import DEFAULT_SANDBOX_ID_BASE, DEFAULT_SANDBOX_ID_COUNT

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
#: A cgroup v1 memory limit at or above this is "no limit" (the kernel's PAGE_COUNTER_MAX, page-rounded).
V1_UNLIMITED = 1 << 62


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def marked_qemus(session: Path) -> list[int]:
    return [p.pid for p in processes(session) if p.marked and "qemu-system" in p.cmdline.split(" ", 1)[0]]


def cgroup_limits(pid: int) -> dict[str, str]:
    """The memory and pids limits of ``pid``'s cgroup, from whichever hierarchy holds each."""
    found: dict[str, str] = {}
    unified = "/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup"
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        base = f"/sys/fs/cgroup/{controllers}" if controllers else unified
        for name in ("memory.max", "memory.limit_in_bytes", "pids.max"):
            with_limit = Path(base + path) / name
            if with_limit.exists() and name not in found:
                found[name] = with_limit.read_text().strip()
    return found


def confinement_problems(pid: int) -> list[str]:
    """Everything about QEMU ``pid`` that is not as confined as the default promises."""
    problems = []
    qemu = status(pid)
    uid = int(qemu["Uid"].split()[0])
    if not DEFAULT_SANDBOX_ID_BASE <= uid < DEFAULT_SANDBOX_ID_BASE + DEFAULT_SANDBOX_ID_COUNT:
        problems.append(f"runs as uid {uid}")
    if qemu["Gid"].split()[0] != str(uid):
        problems.append(f"runs as gid {qemu['Gid']}")
    problems += [f"{cap_set} {qemu[cap_set]}" for cap_set in CAP_SETS if int(qemu[cap_set], 16)]
    if qemu["NoNewPrivs"] != "1":
        problems.append("no no_new_privs")
    if qemu["Seccomp"] != "2":
        problems.append(f"seccomp mode {qemu['Seccomp']}")
    if qemu["NSpid"].split()[-1] != "1":
        problems.append("not PID 1 of a PID namespace of its own")
    for kind in ("mnt", "ipc", "net"):
        if os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(f"/proc/self/ns/{kind}"):
            problems.append(f"in the host's {kind} namespace")
    top = {p.name for p in Path(f"/proc/{pid}/root").iterdir()}
    problems += [f"/{name} in its root" for name in ("etc", "home", "root", "proc", "sys") if name in top]
    limits = cgroup_limits(pid)
    memory = limits.get("memory.max", limits.get("memory.limit_in_bytes", "max"))
    if memory == "max" or int(memory) >= V1_UNLIMITED:
        problems.append(f"no host memory limit ({limits})")
    if limits.get("pids.max", "max") == "max":
        problems.append(f"no host pids limit ({limits})")
    return problems


def pod_qemus() -> list[int]:
    """The QEMUs of shim v2 pods (their sockets live under /run/capsa-v2/pods/): containerd
    starts the shim, not the session's wrapper, so they carry no marker."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"qemu-system" in argv[0] and any(b"/run/capsa-v2/pods/" in arg for arg in argv):
            found.append(int(entry))
    return found


def assert_confined(qemus: list[int], expected: int = 1) -> None:
    """At least ``expected`` QEMUs run, and every one is confined."""
    assert len(qemus) >= expected, f"expected {expected} QEMU(s), found {qemus}"
    problems = {pid: confinement_problems(pid) for pid in qemus}
    assert not any(problems.values()), f"QEMU not confined: {problems}"


def assert_qemus_confined(session: Path, expected: int = 1) -> None:
    """At least ``expected`` of the session's QEMUs run (runc CLI path), and every one is confined."""
    assert_confined(marked_qemus(session), expected)
