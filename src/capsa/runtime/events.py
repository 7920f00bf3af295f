"""The documents ``capsa events`` prints, shaped like runc's (``types/events.go``).

runc prints one JSON object per line: ``{"type", "id", "data"}``, where a
``stats`` event's data is runc's ``types.Stats`` and an ``oom`` event has
no data.  containerd's runc shim and ``docker stats`` read these keys.

Our agent measures the container's cgroup v2 in the guest
(``StatsContainerResponse``): ``cpu.stat`` usage_usec, ``memory.current``,
``memory.max`` and ``pids.current``.  Only what it measures is filled in;
runc's other fields (per-CPU usage, throttling, blkio, hugetlb, swap, the
kernel/user split) are left out rather than reported as zeros.  Units follow
runc: CPU time in nanoseconds, memory in bytes, and no memory limit
(``memory.max`` is ``max``, which the agent sends as 0) is the largest
uint64, as runc's cgroup v2 reader reports it.

Pure functions: no I/O, so the verb and the shim share them.
"""

from __future__ import annotations

import json
from typing import Any

from capsa.protocols import agent_pb2 as pb

UNLIMITED = 2**64 - 1
"""runc's memory limit for ``memory.max`` = ``max`` (Go's math.MaxUint64)."""


def stats_event(container_id: str, stats: pb.StatsContainerResponse) -> dict[str, Any]:
    """A runc ``stats`` event for one StatsContainer answer."""
    memory_usage: dict[str, int] = {"limit": stats.memory_limit_bytes or UNLIMITED}
    # runc's MemoryEntry.Usage and Pids.Current are `omitempty`: a zero is not printed.
    if stats.memory_usage_bytes:
        memory_usage["usage"] = stats.memory_usage_bytes
    cpu_usage: dict[str, int] = {}
    if stats.cpu_usage_usec:
        cpu_usage["total"] = stats.cpu_usage_usec * 1000
    pids: dict[str, int] = {}
    if stats.pids_current:
        pids["current"] = stats.pids_current
    return {
        "type": "stats",
        "id": container_id,
        "data": {
            "cpu": {"usage": cpu_usage},
            "memory": {"usage": memory_usage},
            "pids": pids,
        },
    }


def oom_event(container_id: str) -> dict[str, Any]:
    """A runc ``oom`` event: the OOM killer took a process of the container (in the guest); no data."""
    return {"type": "oom", "id": container_id}


def encode(event: dict[str, Any]) -> str:
    """One event as runc writes it (Go's json.Encoder: compact, one line, newline-terminated)."""
    return json.dumps(event, separators=(",", ":")) + "\n"
