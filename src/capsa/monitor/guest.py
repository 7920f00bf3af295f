"""The guest's figures, asked of each sandbox's agent without slowing it or hanging a scrape.

A runc-CLI container's agent is reached through its proxy (``proxy.sock``,
the agent API forwarded; :class:`capsa.proxy.launch.ProxyClient`): ``Check``,
``GetGuestDetails`` (CPUs, memory, boot phases), ``StatsContainer`` (the
container's cgroup in the guest).  A shim v2 pod's proxy lives inside its
shim, so the pod is asked through the shim's own containerd Task API
(``State`` and ``Stats``, which the shim answers from ``StatsContainer``).

Bounds: at most ``concurrency`` sandboxes are asked at once, each within
``timeout`` (connect and every call), and the whole round within
``deadline``; a sandbox not reached by then is reported ``skipped``.  A
sandbox that failed last time is asked last, so a host's sick sandboxes
cannot keep its healthy ones from being asked.  What could not be asked
says why (:class:`Reason`), never by hanging.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from capsa.errors import AgentError, CapsaError
from capsa.monitor.discovery import KIND_RUNC, KIND_SHIM_V2, SandboxInfo
from capsa.monitor.procfs import ProcessTable
from capsa.monitor.roles import Role
from capsa.protocols.containerd.cgroups.v2 import metrics_pb2
from capsa.protocols.containerd.task.v2 import shim_pb2
from capsa.protocols.containerd.types.task import task_pb2
from capsa.proxy.launch import ProxyClient
from capsa.runtime.state import Status
from capsa.shim.v2.wire import TASK_SERVICE, unpack_any
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code, StatusError, TtrpcError

log = logging.getLogger("capsa.monitor")

T = TypeVar("T")

VIA_PROXY = "proxy"
VIA_SHIM_V2 = "shim-v2"


class Reason:
    """Why ``capsa_sandbox_agent_up`` is what it is."""

    OK = "ok"
    TIMEOUT = "timeout"  # no answer within the per-sandbox timeout: sick, or its VM paused
    UNREACHABLE = "unreachable"  # its socket refused the connection or is missing
    ERROR = "error"  # it answered with an error
    STOPPED = "stopped"  # the sandbox is not running: nothing to ask
    CREATING = "creating"  # its VM is still being made: not asked yet
    FROZEN = "frozen"  # a process on the way (proxy, shim, QEMU) is stopped (SIGSTOP, traced)
    SKIPPED = "skipped"  # the round's deadline came before its turn


@dataclass(frozen=True)
class GuestDetails:
    """GetGuestDetails (agent.proto)."""

    kernel_release: str
    agent_version: str
    crun_version: str
    online_cpus: int
    memory_total_bytes: int
    kernel_boot_seconds: float
    agent_start_seconds: float
    #: The agent policy in force (SHA-256 of its text, "" for allow-everything) and its refusals.
    policy_digest: str = ""
    policy_denials: int = 0
    #: Over 1, 5 and 15 minutes; empty from an agent that does not say.
    load_average: tuple[float, ...] = ()


@dataclass(frozen=True)
class ContainerFigures:
    """A container's cgroup in the guest (StatsContainer, agent.proto; cgroup v2 files)."""

    cpu_seconds: float
    memory_usage_bytes: int
    memory_limit_bytes: int  # 0: no limit
    pids: int
    #: memory.events oom_kill: processes the guest's OOM killer took in the container's cgroup.
    oom_kills: int = 0


@dataclass(frozen=True)
class GuestReport:
    up: bool
    reason: str
    details: GuestDetails | None = None
    containers: Mapping[str, ContainerFigures] = field(default_factory=dict)
    #: What a shim v2 says of each container's status (OCI words); empty for runc-CLI sandboxes.
    statuses: Mapping[str, str] = field(default_factory=dict)
    error: str = ""


# -- agent RPC latencies --------------------------------------------------------

#: Histogram buckets (seconds) for the agent calls the monitor makes; TCG guests answer in tens of ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class LatencyCounts:
    """One histogram: the calls of one RPC to one sandbox's agent, as the monitor timed them."""

    source: str  # SandboxInfo.source: unique, where an ID may not be
    via: str
    rpc: str
    buckets: tuple[int, ...]  # cumulative counts for LATENCY_BUCKETS, then +Inf
    total_seconds: float
    errors: int


class LatencyBook:
    """Agent call latencies per (sandbox, path, RPC), kept across refreshes; not thread-safe.

    Sandboxes are keyed by :attr:`SandboxInfo.source`.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts: dict[tuple[str, str, str], list[int]] = {}
        self._sums: dict[tuple[str, str, str], float] = {}
        self._errors: dict[tuple[str, str, str], int] = {}

    def observe(self, source: str, via: str, rpc: str, seconds: float) -> None:
        key = (source, via, rpc)
        counts = self._counts.setdefault(key, [0] * (len(self.bounds) + 1))
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self._sums[key] = self._sums.get(key, 0.0) + seconds

    def failed(self, source: str, via: str, rpc: str) -> None:
        key = (source, via, rpc)
        self._counts.setdefault(key, [0] * (len(self.bounds) + 1))
        self._errors[key] = self._errors.get(key, 0) + 1

    def keep_only(self, sources: Iterable[str]) -> None:
        """Forget the sandboxes that are gone."""
        keep = set(sources)
        for key in [key for key in self._counts if key[0] not in keep]:
            del self._counts[key]
            self._sums.pop(key, None)
            self._errors.pop(key, None)

    def export(self) -> tuple[LatencyCounts, ...]:
        out = []
        for key in sorted(self._counts):
            running, cumulative = 0, []
            for count in self._counts[key]:
                running += count
                cumulative.append(running)
            out.append(LatencyCounts(*key, tuple(cumulative), self._sums.get(key, 0.0), self._errors.get(key, 0)))
        return tuple(out)


Record = Callable[[str, float | None], None]  # (rpc, seconds or None when it failed)


async def timed(record: Record, rpc: str, call: Awaitable[T]) -> T:
    started = time.monotonic()
    try:
        result = await call
    except BaseException:
        record(rpc, None)
        raise
    record(rpc, time.monotonic() - started)
    return result


# -- what is asked, and why not ---------------------------------------------------


def skip_reason(sandbox: SandboxInfo, table: ProcessTable, roles: Mapping[int, str]) -> str | None:
    """Why the sandbox's agent is not to be asked at all, or None to ask it."""
    if sandbox.kind == KIND_RUNC:
        if sandbox.status == Status.STOPPED:
            return Reason.STOPPED
        if sandbox.status == Status.CREATING:
            return Reason.CREATING
    if not roles:
        return Reason.STOPPED  # none of its processes runs
    if sandbox.endpoint is None:
        return Reason.UNREACHABLE  # no socket directory
    # A stopped proxy, shim or QEMU cannot answer: say so at once rather than
    # spend a timeout (and a slot) finding out.
    for pid, role in roles.items():
        stat = table.get(pid)
        if stat is not None and stat.stopped and role not in (Role.EXEC_SHIM, Role.VIRTIOFSD):
            return Reason.FROZEN
    return None


def _reason_of(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, StatusError) and cause.code == Code.DEADLINE_EXCEEDED:
        return Reason.TIMEOUT
    return Reason.ERROR


async def ask_proxy(sandbox: SandboxInfo, timeout: float, record: Record) -> GuestReport:
    """Check, GetGuestDetails and each container's StatsContainer, through the container's proxy."""
    assert sandbox.endpoint is not None
    try:
        client = await ProxyClient.connect(sandbox.endpoint, timeout)
    except AgentError as exc:
        return GuestReport(False, Reason.UNREACHABLE, error=str(exc))
    try:
        agent = client.agent
        await timed(record, "Check", agent.check(timeout))
        reply = await timed(record, "GetGuestDetails", agent.guest_details())
        details = GuestDetails(
            kernel_release=reply.kernel_release,
            agent_version=reply.agent_version,
            crun_version=reply.crun_version,
            online_cpus=reply.online_cpus,
            memory_total_bytes=reply.mem_total_bytes,
            kernel_boot_seconds=reply.kernel_boot_seconds,
            agent_start_seconds=reply.agent_start_seconds,
            policy_digest=reply.policy_digest,
            policy_denials=reply.policy_denials,
            load_average=tuple(reply.load_average),
        )
        figures: dict[str, ContainerFigures] = {}
        for container in sandbox.containers:
            try:
                stats = await timed(record, "StatsContainer", agent.stats_container(container.id))
            except AgentError as exc:
                if _reason_of(exc) == Reason.TIMEOUT:
                    raise
                log.debug("sandbox %s: no stats for %s: %s", sandbox.id, container.id, exc)
                continue
            figures[container.id] = ContainerFigures(
                cpu_seconds=stats.cpu_usage_usec / 1e6,
                memory_usage_bytes=stats.memory_usage_bytes,
                memory_limit_bytes=stats.memory_limit_bytes,
                pids=stats.pids_current,
                oom_kills=stats.oom_kills,
            )
    except AgentError as exc:
        return GuestReport(False, _reason_of(exc), error=str(exc))
    finally:
        await client.aclose()
    return GuestReport(True, Reason.OK, details=details, containers=figures)


#: containerd's task status (types/task/task.proto) in the OCI words capsa's own state uses.
_TASK_STATUS = {
    task_pb2.CREATED: Status.CREATED,
    task_pb2.RUNNING: Status.RUNNING,
    task_pb2.STOPPED: Status.STOPPED,
    task_pb2.PAUSED: Status.PAUSED,
    task_pb2.PAUSING: Status.PAUSED,
}


async def ask_shim_v2(sandbox: SandboxInfo, timeout: float, record: Record) -> GuestReport:
    """Each container's State and Stats through the pod's shim (its Task API, shim v2's own socket).

    The agent is up when a Stats came back: the shim answers it with the
    agent's StatsContainer.  State is the shim's own answer.
    """
    assert sandbox.endpoint is not None
    try:
        client = await Client.connect_unix(sandbox.endpoint)
    except OSError as exc:
        return GuestReport(False, Reason.UNREACHABLE, error=f"{sandbox.endpoint}: {exc.strerror}")
    statuses: dict[str, str] = {}
    figures: dict[str, ContainerFigures] = {}
    failure: tuple[str, str] | None = None
    try:
        for container in sandbox.containers:
            try:
                request = shim_pb2.StateRequest(id=container.id)
                state = await client.unary(TASK_SERVICE, "State", request, shim_pb2.StateResponse, timeout=timeout)
                statuses[container.id] = _TASK_STATUS.get(state.status, "unknown")
                if statuses[container.id] not in (Status.RUNNING, Status.PAUSED, Status.CREATED):
                    continue
                stats_request = shim_pb2.StatsRequest(id=container.id)
                stats_call = client.unary(TASK_SERVICE, "Stats", stats_request, shim_pb2.StatsResponse, timeout=timeout)
                reply = await timed(record, "StatsContainer", stats_call)
                metrics = unpack_any(reply.stats, metrics_pb2.Metrics)
            except StatusError as exc:
                if exc.code == Code.DEADLINE_EXCEEDED:
                    return GuestReport(False, Reason.TIMEOUT, statuses=statuses, error=str(exc))
                if exc.code != Code.NOT_FOUND:  # a bundle whose task the shim has not created yet
                    failure = (Reason.ERROR, f"{container.id}: {exc.message or exc.code.name}")
                continue
            except CapsaError as exc:  # a Stats reply that is not cgroup v2 Metrics
                failure = (Reason.ERROR, f"{container.id}: {exc}")
                continue
            figures[container.id] = ContainerFigures(
                cpu_seconds=metrics.cpu.usage_usec / 1e6,
                memory_usage_bytes=metrics.memory.usage,
                memory_limit_bytes=metrics.memory.usage_limit,
                pids=metrics.pids.current,
                oom_kills=metrics.memory_events.oom_kill,
            )
    except TtrpcError as exc:
        return GuestReport(False, Reason.ERROR, statuses=statuses, error=str(exc))
    finally:
        await client.aclose()
    if figures:
        return GuestReport(True, Reason.OK, containers=figures, statuses=statuses)
    if failure is not None:
        return GuestReport(False, failure[0], statuses=statuses, error=failure[1])
    if all(status == Status.STOPPED for status in statuses.values()) and statuses:
        return GuestReport(False, Reason.STOPPED, statuses=statuses)
    # The shim has made none of its containers yet: its VM is being made.
    return GuestReport(False, Reason.CREATING, statuses=statuses)


Ask = Callable[[SandboxInfo, float, Record], Awaitable[GuestReport]]
ASKS: Mapping[str, Ask] = {KIND_RUNC: ask_proxy, KIND_SHIM_V2: ask_shim_v2}


async def gather(
    sandboxes: Sequence[SandboxInfo],
    record: Callable[[SandboxInfo, str, str, float | None], None],
    *,
    timeout: float,
    concurrency: int,
    deadline: float,
    asks: Mapping[str, Ask] = ASKS,
) -> dict[str, GuestReport]:
    """Ask every sandbox (in the order given), keyed by ``SandboxInfo.source``.

    ``record(sandbox, via, rpc, seconds)`` hears of every agent call timed
    (``seconds`` None for one that failed).
    """
    reports: dict[str, GuestReport] = {}
    slots = asyncio.Semaphore(max(1, concurrency))

    async def one(sandbox: SandboxInfo) -> None:
        via = VIA_PROXY if sandbox.kind == KIND_RUNC else VIA_SHIM_V2

        def own_record(rpc: str, seconds: float | None) -> None:
            record(sandbox, via, rpc, seconds)

        async with slots:
            try:
                async with asyncio.timeout(timeout):
                    report = await asks[sandbox.kind](sandbox, timeout, own_record)
            except TimeoutError:
                report = GuestReport(False, Reason.TIMEOUT, error=f"no answer within {timeout:g} s")
            except Exception as exc:  # the monitor reports a sandbox it cannot read; it does not die of it
                log.warning("sandbox %s: asking its agent failed: %r", sandbox.id, exc)
                report = GuestReport(False, Reason.ERROR, error=repr(exc))
        if report.error:
            log.debug("sandbox %s: agent %s: %s", sandbox.id, report.reason, report.error)
        reports[sandbox.source] = report

    try:
        async with asyncio.timeout(deadline), asyncio.TaskGroup() as group:
            for sandbox in sandboxes:
                group.create_task(one(sandbox))
    except TimeoutError:
        pass
    for sandbox in sandboxes:
        if sandbox.source not in reports:
            reports[sandbox.source] = GuestReport(False, Reason.SKIPPED, error=f"not asked within {deadline:g} s")
    return reports


def ask_order(sandboxes: Iterable[SandboxInfo], last: Mapping[str, GuestReport]) -> list[SandboxInfo]:
    """Those that answered last time first, then new ones, then those that did not."""

    def rank(sandbox: SandboxInfo) -> int:
        previous = last.get(sandbox.source)
        if previous is None:
            return 1
        return 0 if previous.up else 2

    return sorted(sandboxes, key=rank)
