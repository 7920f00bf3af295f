"""runc-shaped `events` documents from the agent's answers, and the `capsa events` stream."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import cast

import pytest

from capsa.cli import events as events_verb
from capsa.cli.context import Context
from capsa.errors import AgentError, WrongState
from capsa.protocols import agent_pb2 as pb
from capsa.runtime import lifecycle
from capsa.runtime.events import UNLIMITED, encode, oom_event, stats_event


def test_stats_event_units_and_keys() -> None:
    stats = pb.StatsContainerResponse(
        cpu_usage_usec=1_500_000,
        memory_usage_bytes=12 * 2**20,
        memory_limit_bytes=256 * 2**20,
        pids_current=3,
    )
    assert stats_event("c1", stats) == {
        "type": "stats",
        "id": "c1",
        "data": {
            "cpu": {"usage": {"total": 1_500_000_000}},
            "memory": {"usage": {"usage": 12 * 2**20, "limit": 256 * 2**20}},
            "pids": {"current": 3},
        },
    }


def test_no_memory_limit_is_max_uint64() -> None:
    event = stats_event("c1", pb.StatsContainerResponse(memory_usage_bytes=4096))
    assert event["data"]["memory"]["usage"]["limit"] == UNLIMITED == 18446744073709551615


def test_zeros_are_omitted_like_go_omitempty() -> None:
    event = stats_event("c1", pb.StatsContainerResponse(memory_limit_bytes=1 << 30))
    assert event["data"] == {"cpu": {"usage": {}}, "memory": {"usage": {"limit": 1 << 30}}, "pids": {}}


def test_oom_event_has_no_data() -> None:
    assert oom_event("web") == {"type": "oom", "id": "web"}


def test_encode_is_one_compact_line() -> None:
    line = encode(stats_event("c1", pb.StatsContainerResponse(pids_current=1)))
    assert line.endswith("\n") and line.count("\n") == 1
    assert " " not in line
    assert json.loads(line)["data"]["pids"] == {"current": 1}
    # A uint64 limit survives JSON exactly (Go prints it as an integer, not a float).
    assert '"limit":18446744073709551615' in line


# --- `capsa events ID`: the stream, with the runtime's calls to the guest replaced


class FakeGuest:
    """lifecycle.stats and lifecycle.wait_oom_kill for one container, scripted."""

    def __init__(self, oom_kills: int, reports: list[pb.OOMEvent | Exception | None], stats_fail: bool = False) -> None:
        self.oom_kills = oom_kills
        self.reports = reports
        self.stats_fail = stats_fail
        self.stats_calls = 0
        self.waits: list[tuple[int, float]] = []

    def stats(self, rt: object, container_id: str) -> pb.StatsContainerResponse:
        self.stats_calls += 1
        if self.stats_calls > 1 and self.stats_fail:
            raise WrongState("cannot get stats of a container that is stopped")
        return pb.StatsContainerResponse(pids_current=1, oom_kills=self.oom_kills)

    def wait_oom_kill(self, rt: object, container_id: str, seen: int, timeout: float) -> pb.OOMEvent | None:
        self.waits.append((seen, timeout))
        report = self.reports.pop(0) if self.reports else None
        if isinstance(report, Exception):
            raise report
        return report


def watch(monkeypatch: pytest.MonkeyPatch, guest: FakeGuest, *flags: str) -> list[dict[str, object]]:
    import io
    from contextlib import redirect_stdout

    monkeypatch.setattr(lifecycle, "stats", guest.stats)
    monkeypatch.setattr(lifecycle, "wait_oom_kill", guest.wait_oom_kill)
    args = argparse.Namespace(id="web", stats="--stats" in flags, interval=flags[-1] if flags else "1h")
    out = io.StringIO()
    with redirect_stdout(out):
        assert events_verb.execute(args, cast(Context, SimpleNamespace(runtime=None))) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_an_oom_kill_is_one_oom_line_and_the_stream_ends_with_the_container(monkeypatch: pytest.MonkeyPatch) -> None:
    guest = FakeGuest(2, [None, pb.OOMEvent(oom_kills=3), pb.OOMEvent(oom_kills=5, stopped=True)])
    printed = watch(monkeypatch, guest)
    assert [e["type"] for e in printed] == ["stats", "oom", "oom"]
    assert printed[1] == {"type": "oom", "id": "web"}
    # Kills before the watch began (2) are not reported; each report moves the mark.
    assert [seen for seen, _ in guest.waits] == [2, 2, 3]


def test_a_report_without_a_new_kill_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    guest = FakeGuest(0, [pb.OOMEvent(oom_kills=0, stopped=True)])
    assert [e["type"] for e in watch(monkeypatch, guest)] == ["stats"]


def test_the_kill_that_stopped_the_container_is_printed_before_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stats tick found it stopped: one last question to the guest.
    guest = FakeGuest(0, [], stats_fail=True)
    guest.wait_oom_kill = lambda rt, cid, seen, timeout: (  # type: ignore[method-assign]
        pb.OOMEvent(oom_kills=1, stopped=True) if timeout == events_verb.LAST_OOM_TIMEOUT else None
    )
    printed = watch(monkeypatch, guest, "1ms")
    assert [e["type"] for e in printed][-1] == "oom"
    assert all(e["type"] == "stats" for e in printed[:-1])


def test_the_stream_ends_quietly_when_the_vm_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    guest = FakeGuest(0, [AgentError("the container's VM is not running")])
    assert [e["type"] for e in watch(monkeypatch, guest)] == ["stats"]


def test_stats_flag_prints_one_event_and_waits_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    guest = FakeGuest(0, [pb.OOMEvent(oom_kills=1)])
    assert [e["type"] for e in watch(monkeypatch, guest, "--stats", "5s")] == ["stats"]
    assert guest.waits == []
