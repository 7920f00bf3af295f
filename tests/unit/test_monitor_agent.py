"""capsa-monitor asking agents over real ttrpc sockets: a fake agent, a fake shim v2, and a sick proxy.

The fakes serve the same wire a proxy (agent API forwarded) and a
containerd-shim-capsa-v2 (containerd's Task API) do, on unix sockets in a
short temporary directory; each runs in a thread of its own with its own
event loop, as the real ones are processes of their own.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path

import pytest
from monitor_fakes import fake_agent, serving, silent_listener

from capsa.monitor.discovery import ContainerInfo, SandboxInfo
from capsa.monitor.guest import ContainerFigures, GuestReport, Reason, ask_proxy, ask_shim_v2, gather
from capsa.protocols.containerd.cgroups.v2 import metrics_pb2
from capsa.protocols.containerd.task.v2 import shim_pb2
from capsa.protocols.containerd.types.task import task_pb2
from capsa.shim.v2.wire import TASK_SERVICE, pack_any
from capsa.ttrpc.errors import Code, StatusError
from capsa.ttrpc.server import Context, Server, unary_method


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fake_shim_v2(statuses: Mapping[str, task_pb2.Status.ValueType]) -> Server:
    async def state(request: shim_pb2.StateRequest, context: Context) -> shim_pb2.StateResponse:
        if request.id not in statuses:
            raise StatusError(Code.NOT_FOUND, f"container {request.id} does not exist")
        return shim_pb2.StateResponse(id=request.id, status=statuses[request.id])

    async def stats(request: shim_pb2.StatsRequest, context: Context) -> shim_pb2.StatsResponse:
        metrics = metrics_pb2.Metrics(
            pids=metrics_pb2.PidsStat(current=4),
            cpu=metrics_pb2.CPUStat(usage_usec=750_000),
            memory=metrics_pb2.MemoryStat(usage=9 << 20, usage_limit=64 << 20),
        )
        return shim_pb2.StatsResponse(stats=pack_any(metrics))

    server = Server()
    server.register_service(
        TASK_SERVICE,
        {"State": unary_method(shim_pb2.StateRequest, state), "Stats": unary_method(shim_pb2.StatsRequest, stats)},
    )
    return server


def runc_sandbox(endpoint: Path, *containers: str) -> SandboxInfo:
    return SandboxInfo(
        id=containers[0],
        kind="runc",
        status="running",
        containers=tuple(ContainerInfo(c) for c in containers),
        endpoint=endpoint,
        source=str(endpoint),
    )


Calls = list[tuple[str, float | None]]


def run_ask(
    ask: Callable[[SandboxInfo, float, Callable[[str, float | None], None]], Awaitable[GuestReport]],
    sandbox: SandboxInfo,
    timeout: float = 2.0,
) -> tuple[GuestReport, Calls]:
    calls: Calls = []

    def record(rpc: str, seconds: float | None) -> None:
        calls.append((rpc, seconds))

    return asyncio.run(asyncio.wait_for(ask(sandbox, timeout, record), 10)), calls


def test_the_agent_through_a_proxy_socket(short_dir: Path) -> None:
    with serving(lambda: fake_agent(missing=frozenset({"not-yet"})), short_dir / "proxy.sock"):
        report, calls = run_ask(ask_proxy, runc_sandbox(short_dir, "c1", "not-yet"))
    assert (report.up, report.reason) == (True, Reason.OK)
    assert report.details is not None
    assert (report.details.memory_total_bytes, report.details.online_cpus) == (480 << 20, 2)
    assert report.details.kernel_release == "6.1.0-capsa"
    # A container the guest does not know (yet) has no figures; the agent is still up.
    assert report.containers == {"c1": ContainerFigures(2.5, 7 << 20, 0, 2)}
    assert [rpc for rpc, _ in calls] == ["Check", "GetGuestDetails", "StatsContainer", "StatsContainer"]
    assert calls[-1][1] is None and all(seconds is not None and seconds < 2 for _, seconds in calls[:3])


def test_no_proxy_socket_is_unreachable(short_dir: Path) -> None:
    report, calls = run_ask(ask_proxy, runc_sandbox(short_dir, "c1"))
    assert (report.up, report.reason, calls) == (False, Reason.UNREACHABLE, [])


def test_a_sick_proxy_gives_agent_down_within_the_timeout(short_dir: Path) -> None:
    sick = runc_sandbox(short_dir, "sick")
    with silent_listener(short_dir / "proxy.sock"):
        started = time.monotonic()
        reports = asyncio.run(gather([sick], lambda *_: None, timeout=0.5, concurrency=4, deadline=3))
        elapsed = time.monotonic() - started
    assert (reports[str(short_dir)].up, reports[str(short_dir)].reason) == (False, Reason.TIMEOUT)
    assert 0.4 < elapsed < 1.5


def test_a_shim_v2_pod_through_its_task_api(short_dir: Path) -> None:
    statuses = {"sb": task_pb2.RUNNING, "app": task_pb2.PAUSED, "done": task_pb2.STOPPED}
    pod = SandboxInfo(
        id="sb",
        kind="shim-v2",
        status="",
        containers=(ContainerInfo("sb"), ContainerInfo("app"), ContainerInfo("done")),
        endpoint=short_dir / "shim.sock",
        source="k8s.io/sb",
    )
    with serving(lambda: fake_shim_v2(statuses), short_dir / "shim.sock"):
        report, calls = run_ask(ask_shim_v2, pod)
    assert (report.up, report.reason) == (True, Reason.OK)
    assert report.statuses == {"sb": "running", "app": "paused", "done": "stopped"}
    assert report.containers == {
        "sb": ContainerFigures(0.75, 9 << 20, 64 << 20, 4),
        "app": ContainerFigures(0.75, 9 << 20, 64 << 20, 4),
    }
    assert [rpc for rpc, _ in calls] == ["StatsContainer", "StatsContainer"]


def test_a_shim_v2_whose_containers_all_stopped_says_so(short_dir: Path) -> None:
    pod = SandboxInfo(
        id="sb", kind="shim-v2", status="", containers=(ContainerInfo("sb"),), endpoint=short_dir / "s", source="x"
    )
    with serving(lambda: fake_shim_v2({"sb": task_pb2.STOPPED}), short_dir / "s"):
        report, _ = run_ask(ask_shim_v2, pod)
    assert (report.up, report.reason, dict(report.statuses)) == (False, Reason.STOPPED, {"sb": "stopped"})


def test_a_shim_v2_pod_being_made(short_dir: Path) -> None:
    # containerd wrote the bundles; the shim has created no task yet.
    pod = SandboxInfo(
        id="sb",
        kind="shim-v2",
        status="",
        containers=(ContainerInfo("sb"), ContainerInfo("app")),
        endpoint=short_dir / "s",
        source="x",
    )
    with serving(lambda: fake_shim_v2({}), short_dir / "s"):
        report, calls = run_ask(ask_shim_v2, pod)
    assert (report.up, report.reason, calls) == (False, Reason.CREATING, [])
    with serving(lambda: fake_shim_v2({"sb": task_pb2.RUNNING}), short_dir / "s"):
        report, calls = run_ask(ask_shim_v2, pod)
    assert (report.up, list(report.containers), dict(report.statuses)) == (True, ["sb"], {"sb": "running"})
