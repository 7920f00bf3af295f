"""The host cgroup an engine named for a container, as the engine's own tools find it.

Podman (``podman stats``) reads ``/proc/<container pid>/cgroup`` and loads the
cgroup there; containerd's runc shim does the same with the PID the runtime
wrote to ``--pid-file`` (``docker stats``).  Under capsa that PID is the
container's capsa-shim, which must sit in the cgroup the spec's
``linux.cgroupsPath`` names, in every hierarchy; under runc it is the
container's init.  Either way the directories go when the container does.
"""

from __future__ import annotations

import re
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kKMGT]?i?B)")


def cgroup_dirs(pid: int, needle: str) -> list[Path]:
    """The cgroup directories of ``pid`` whose path holds ``needle``, one per hierarchy.

    v1 lines (``N:controllers:/path``) map to ``/sys/fs/cgroup/<controllers
    as mounted>/path``; the v2 line (``0::/path``) to the unified mount
    (``/sys/fs/cgroup/unified`` on a hybrid host, else ``/sys/fs/cgroup``).
    """
    found = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if needle not in path:
            continue
        if controllers:
            base = CGROUP_ROOT / controllers.removeprefix("name=")
        else:
            unified = CGROUP_ROOT / "unified"
            base = unified if unified.is_dir() else CGROUP_ROOT
        found.append(base / path.lstrip("/"))
    return found


def memory_bytes(usage: str) -> float:
    """The first figure of a stats MemUsage column ("12.5MiB / 7.7GiB", "1.2MB / 8GB") in bytes."""
    match = _SIZE.match(usage)
    assert match, f"no memory figure in {usage!r}"
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return number * scale.get(unit, 1)
