"""Reading a container's cgroup v2 files (Documentation/admin-guide/cgroup-v2.rst).

crun puts each container in its own cgroup; the agent finds it through the
container init's /proc/PID/cgroup and reads the interface files for
StatsContainer and ListProcesses.  Parsing is pure; reading is one open each.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class CgroupStats:
    cpu_usage_usec: int = 0
    memory_usage_bytes: int = 0
    memory_limit_bytes: int = 0  # 0: no limit ("max")
    pids_current: int = 0
    oom_kills: int = 0  # memory.events oom_kill


def unified_path(proc_cgroup: str) -> str:
    """The cgroup v2 path from /proc/PID/cgroup: the ``0::PATH`` line (cgroups(7))."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path.strip()
    return ""


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A "flat keyed" file such as cpu.stat: ``key value`` per line."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def parse_single_value(text: str) -> int:
    """memory.current, memory.max, pids.current; ``max`` (no limit) is 0."""
    value = text.strip()
    if not value or value == "max":
        return 0
    return int(value)


def _read(directory: str, name: str) -> str:
    with contextlib.suppress(FileNotFoundError), open(os.path.join(directory, name), encoding="ascii") as file:
        return file.read()
    return ""


def directory(path: str, root: str = CGROUP_ROOT) -> str:
    return os.path.join(root, path.lstrip("/"))


def read_stats(cgroup_dir: str) -> CgroupStats:
    """Stats from the interface files; a controller that is off reads as 0."""
    return CgroupStats(
        cpu_usage_usec=parse_flat_keyed(_read(cgroup_dir, "cpu.stat")).get("usage_usec", 0),
        memory_usage_bytes=parse_single_value(_read(cgroup_dir, "memory.current")),
        memory_limit_bytes=parse_single_value(_read(cgroup_dir, "memory.max")),
        pids_current=parse_single_value(_read(cgroup_dir, "pids.current")),
        oom_kills=oom_kills(cgroup_dir),
    )


def oom_kills(cgroup_dir: str) -> int:
    """How many processes the OOM killer took in this cgroup (memory.events ``oom_kill``)."""
    return parse_flat_keyed(_read(cgroup_dir, "memory.events")).get("oom_kill", 0)


def read_pids(cgroup_dir: str) -> list[int]:
    """cgroup.procs: the PIDs (in the agent's PID namespace) of the cgroup."""
    return [int(line) for line in _read(cgroup_dir, "cgroup.procs").split()]


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of a live process; "" if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="ascii") as file:
            return unified_path(file.read())
    except (FileNotFoundError, ProcessLookupError):
        return ""
