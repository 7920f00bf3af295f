"""Taking a snapshot of the host's sandboxes, and serving it to Prometheus from a cache.

:func:`take_snapshot` is the one place that reads: the process table, the
sandboxes' state, their processes' memory, their agents.  :class:`Monitor`
is the Prometheus collector: a scrape within ``cache_seconds`` of the last
reading is served from it, and scrapes that come together wait for one
reading rather than each making their own, so however often and however
many scrapers come, each sandbox is read at most once per interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import Metric

from capsa.monitor import discovery, procfs
from capsa.monitor.discovery import SandboxInfo
from capsa.monitor.guest import ASKS, Ask, GuestReport, LatencyBook, ask_order, gather, skip_reason
from capsa.monitor.metrics import SandboxSample, Snapshot, families
from capsa.monitor.procfs import MemoryUse, ProcessTable
from capsa.monitor.roles import Role, assign_roles, boot_kind, host_usage
from capsa.runtime import counters
from capsa.runtime.state import SOCKET_ROOT

log = logging.getLogger("capsa.monitor")


@dataclass(frozen=True)
class Settings:
    #: State roots given with --root, searched besides the defaults.
    roots: tuple[Path, ...] = ()
    #: Search the engines' default roots (discovery.default_roots) too.
    default_roots: bool = True
    cache_seconds: float = 5.0
    #: Bound on one sandbox's agent figures: connect and every call.
    agent_timeout: float = 2.0
    #: How many sandboxes' agents are asked at once.
    concurrency: int = 4
    #: Bound on asking all of them; those not reached in time are "skipped".
    deadline: float = 5.0
    socket_root: Path = SOCKET_ROOT
    proc: Path = procfs.PROC
    containerd_runc_root: Path = discovery.CONTAINERD_RUNC_ROOT
    #: How each kind of sandbox is asked (guest.ASKS); tests put fakes here.
    asks: Mapping[str, Ask] = field(default_factory=lambda: dict(ASKS))


def search_roots(settings: Settings) -> list[Path]:
    roots = list(settings.roots)
    if settings.default_roots:
        roots += discovery.default_roots(settings.containerd_runc_root)
    return roots


def discover(settings: Settings, table: ProcessTable) -> list[SandboxInfo]:
    return discovery.discover_runc(search_roots(settings), table, settings.socket_root) + discovery.discover_shim_v2(
        table, settings.proc
    )


def take_snapshot(
    settings: Settings,
    book: LatencyBook,
    previous: Snapshot | None = None,
    clock: Callable[[], float] = time.time,
) -> Snapshot:
    started = time.monotonic()
    table = procfs.read_process_table(settings.proc, lambda stat: discovery.wants_cmdline(stat.comm))
    sandboxes = discover(settings, table)
    roles = {sb.source: assign_roles(table, sb.anchors, sb.hypervisor_pid) for sb in sandboxes}
    memory: dict[int, MemoryUse | None] = {}
    qemu_argv: dict[int, tuple[str, ...]] = {}
    for pids in roles.values():
        for pid, role in pids.items():
            memory[pid] = procfs.read_memory(pid, settings.proc)
            if role == Role.QEMU:
                qemu_argv[pid] = procfs.read_cmdline(pid, settings.proc)

    to_ask: list[SandboxInfo] = []
    reports: dict[str, GuestReport] = {}
    for sb in sandboxes:
        reason = skip_reason(sb, table, roles[sb.source])
        if reason is None:
            to_ask.append(sb)
        else:
            reports[sb.source] = GuestReport(False, reason)
    last = {s.sandbox.source: s.guest for s in previous.samples} if previous else {}

    def record(sandbox: SandboxInfo, via: str, rpc: str, seconds: float | None) -> None:
        if seconds is None:
            book.failed(sandbox.source, via, rpc)
        else:
            book.observe(sandbox.source, via, rpc, seconds)

    if to_ask:
        reports.update(
            asyncio.run(
                gather(
                    ask_order(to_ask, last),
                    record,
                    timeout=settings.agent_timeout,
                    concurrency=settings.concurrency,
                    deadline=settings.deadline,
                    asks=settings.asks,
                )
            )
        )
    book.keep_only(sb.source for sb in sandboxes)

    samples = [sample_of(sb, roles[sb.source], table, memory, qemu_argv, reports[sb.source]) for sb in sandboxes]
    return Snapshot(
        taken_at=clock(),
        duration_seconds=time.monotonic() - started,
        refreshes=(previous.refreshes if previous else 0) + 1,
        samples=tuple(samples),
        latencies=book.export(),
        runtime=counters.read(),
    )


def sample_of(
    sandbox: SandboxInfo,
    roles: Mapping[int, str],
    table: ProcessTable,
    memory: Mapping[int, MemoryUse | None],
    qemu_argv: Mapping[int, tuple[str, ...]],
    guest: GuestReport,
) -> SandboxSample:
    qemus = sorted(pid for pid, role in roles.items() if role == Role.QEMU)
    # QEMU itself (the recorded PID, else the first whose command line could be read).
    main = sandbox.hypervisor_pid if sandbox.hypervisor_pid in qemus else next(iter(qemus), 0)
    return SandboxSample(
        sandbox=sandbox,
        roles=host_usage(roles, table, memory),
        vm_running=bool(qemus),
        boot=boot_kind(qemu_argv.get(main, ())) if qemus else "",
        guest=guest,
    )


class Monitor:
    """The Prometheus collector: families of the latest snapshot, read again when older than the cache."""

    def __init__(
        self,
        settings: Settings,
        take: Callable[[Settings, LatencyBook, Snapshot | None], Snapshot] = take_snapshot,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._take = take
        self._clock = clock
        self._lock = threading.Lock()
        self._book = LatencyBook()
        self._snapshot: Snapshot | None = None
        self._taken = 0.0

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self._clock()
            if self._snapshot is None or now - self._taken >= self.settings.cache_seconds:
                self._snapshot = self._take(self.settings, self._book, self._snapshot)
                self._taken = self._clock()
            return self._snapshot

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())
