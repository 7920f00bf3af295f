"""Reading a container's cgroup v2 files (Documentation/admin-guide/cgroup-v2.rst).

crun puts each container in its own cgroup; the agent finds it through the
container init's /proc/PID/cgroup and reads the interface files for
StatsContainer and ListProcesses.  Parsing is pure; reading is one open each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from dataclasses import dataclass

from capsa.agent import libc
from capsa.agent.stdio import wait_fd

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


class FileChanges:
    """Wake when an interface file changes: cgroup v2 notifies a change of
    ``memory.events`` as a modification (Documentation/admin-guide/cgroup-v2.rst,
    "memory.events"), which inotify(7) reports.

    :meth:`watch` each file once (again is harmless); :meth:`changed` waits
    until any watched file changed since the last call, or ``timeout``.  A
    watch goes with its cgroup.  Without inotify, :meth:`changed` just waits
    ``fallback`` seconds: the caller polls.
    """

    def __init__(self, fallback: float) -> None:
        self.fallback = fallback
        self._fd: int | None = None
        self._broken = False

    def watch(self, path: str) -> None:
        if self._broken:
            return
        try:
            if self._fd is None:
                self._fd = libc.inotify_init()
            libc.inotify_add_watch(self._fd, path, libc.IN_MODIFY)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # the cgroup is gone already
                return
            self._broken = True

    async def changed(self, timeout: float) -> None:
        if self._fd is None or self._broken:
            await asyncio.sleep(self.fallback)
            return
        fd = self._fd
        if not self._drain(fd):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wait_fd(asyncio.get_running_loop(), fd, writable=False), timeout)
            self._drain(fd)

    @staticmethod
    def _drain(fd: int) -> bool:
        """Read away the queued events; whether there were any."""
        got = False
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                got = True
        return got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
