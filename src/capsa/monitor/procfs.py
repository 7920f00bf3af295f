"""What the monitor reads of ``/proc``: process status, memory, command lines.

The parsers are pure (text in, values out; proc(5) names each field); the
readers below them are thin and treat a process that vanished mid-read as
absent, since any process may exit between the listing and the read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")

#: States of /proc/PID/stat (proc(5), field 3) in which a process is gone.
_DEAD_STATES = frozenset("ZX")
#: Stopped by a signal or traced: it runs nothing until continued.
STOPPED_STATES = frozenset("Tt")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the monitor uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    cpu_ticks: int  # utime + stime (fields 14 and 15), in clock ticks
    start_time: int  # field 22, clock ticks after boot: with the PID, names one process

    @property
    def dead(self) -> bool:
        return self.state in _DEAD_STATES

    @property
    def stopped(self) -> bool:
        return self.state in STOPPED_STATES


@dataclass(frozen=True)
class MemoryUse:
    """From ``/proc/PID/smaps_rollup``: resident and proportional set size."""

    rss_bytes: int
    pss_bytes: int


def parse_stat(text: str) -> ProcStat:
    """``/proc/PID/stat`` (proc(5)); ValueError if it is not one.

    ``comm`` (field 2) is in parentheses and may itself hold spaces and
    parentheses, so the fields after it are counted from the last ``)``.
    """
    open_paren = text.index("(")
    close_paren = text.rindex(")")
    pid = int(text[:open_paren])
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3].
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        cpu_ticks=int(rest[11]) + int(rest[12]),
        start_time=int(rest[19]),
    )


def parse_smaps_rollup(text: str) -> MemoryUse:
    """``/proc/PID/smaps_rollup`` (proc(5)): the ``Rss:`` and ``Pss:`` lines, in kB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            number, _, _unit = rest.strip().partition(" ")
            values[key] = int(number) * 1024
    return MemoryUse(rss_bytes=values.get("Rss", 0), pss_bytes=values.get("Pss", 0))


def parse_cmdline(data: bytes) -> tuple[str, ...]:
    """``/proc/PID/cmdline``: NUL-separated arguments."""
    return tuple(arg.decode(errors="replace") for arg in data.split(b"\0")[:-1]) if data else ()


def boot_time(stat_text: str) -> float:
    """``btime`` of ``/proc/stat``: when the host booted, in seconds since the epoch (0.0 if absent)."""
    for line in stat_text.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


class ProcessTable:
    """One reading of every process, and the command lines of those asked for."""

    def __init__(
        self,
        stats: Iterable[ProcStat],
        cmdlines: Mapping[int, tuple[str, ...]] | None = None,
        clock_ticks: int = 100,
        boot_time: float = 0.0,
    ) -> None:
        self.stats = {stat.pid: stat for stat in stats}
        self.cmdlines = dict(cmdlines or {})
        self.clock_ticks = clock_ticks
        self.boot_time = boot_time
        self._children: dict[int, list[int]] = {}
        for stat in sorted(self.stats.values(), key=lambda s: s.pid):
            self._children.setdefault(stat.ppid, []).append(stat.pid)

    def get(self, pid: int) -> ProcStat | None:
        return self.stats.get(pid)

    def alive(self, pid: int, start_time: int = 0) -> bool:
        """True while ``pid`` is the process that started at ``start_time`` (0: any) and not a zombie,
        as :func:`capsa.runtime.pids.alive` decides."""
        stat = self.stats.get(pid)
        return stat is not None and not stat.dead and (start_time == 0 or stat.start_time == start_time)

    def children(self, pid: int) -> list[int]:
        return list(self._children.get(pid, ()))

    def with_comm(self, comm: str) -> list[ProcStat]:
        return [stat for stat in self.stats.values() if stat.comm == comm and not stat.dead]

    def started_at(self, pid: int) -> float | None:
        """When the process started, in seconds since the epoch."""
        stat = self.stats.get(pid)
        if stat is None or not self.boot_time:
            return None
        return self.boot_time + stat.start_time / self.clock_ticks


def read_process_table(proc: Path = PROC, want_cmdline: Callable[[ProcStat], bool] = lambda _: False) -> ProcessTable:
    """Every process's stat, and the command line of those ``want_cmdline`` picks."""
    stats: list[ProcStat] = []
    cmdlines: dict[int, tuple[str, ...]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        entries = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = parse_stat((proc / entry / "stat").read_text(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue  # gone since the listing, or not a process directory
        stats.append(stat)
        if want_cmdline(stat):
            cmdlines[stat.pid] = read_cmdline(stat.pid, proc)
    try:
        btime = boot_time((proc / "stat").read_text())
    except OSError:
        btime = 0.0
    return ProcessTable(stats, cmdlines, clock_ticks=os.sysconf("SC_CLK_TCK"), boot_time=btime)


def read_memory(pid: int, proc: Path = PROC) -> MemoryUse | None:
    """The process's RSS and PSS, or None if it is gone (or its memory cannot be read).

    The kernel walks the process's page tables for this under its mmap lock
    (read side): cheap, but not free for a VM of many GiB, which is one
    reason the monitor caches a reading for the scrape interval.
    """
    try:
        return parse_smaps_rollup((proc / str(pid) / "smaps_rollup").read_text())
    except (OSError, ValueError):
        return None


def read_cmdline(pid: int, proc: Path = PROC) -> tuple[str, ...]:
    try:
        return parse_cmdline((proc / str(pid) / "cmdline").read_bytes())
    except OSError:
        return ()


def read_cwd(pid: int, proc: Path = PROC) -> Path | None:
    try:
        return Path(os.readlink(proc / str(pid) / "cwd"))
    except OSError:
        return None
