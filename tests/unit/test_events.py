"""runc-shaped `events` documents from the agent's StatsContainer answer."""

from __future__ import annotations

import json

from capsa.protocols import agent_pb2 as pb
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
