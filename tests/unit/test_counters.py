"""The host's runtime counters: what a start adds, what a failure adds, and what the monitor serves."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from prometheus_client.core import Metric

from capsa.errors import AgentError, HypervisorError, InvalidArgument
from capsa.monitor.metrics import runtime_families
from capsa.runtime import counters
from capsa.runtime.admission import AdmissionError


def test_a_start_counts_by_boot_and_template_and_lands_in_its_bucket(tmp_path: Path) -> None:
    path = tmp_path / "counters.json"
    counters.record_start("template", "hit", 1.2, path)
    counters.record_start("template", "hit", 0.4, path)
    counters.record_start("cold", "", 3.6, path)
    read = counters.read(path)
    assert read.starts == {"template/hit": 2, "cold/": 1}
    template = read.start_seconds["template"]
    assert template["count"] == 2 and abs(template["sum"] - 1.6) < 1e-9
    assert template["buckets"][0] == 1 and template["buckets"][2] == 1  # <= 0.5 s, <= 1.5 s
    assert path.stat().st_mode & 0o777 == 0o600


def test_failures_count_by_reason_not_by_words(tmp_path: Path) -> None:
    path = tmp_path / "counters.json"
    for exc in (HypervisorError("QEMU exited"), HypervisorError("other words"), AgentError("x"),
                AdmissionError("no memory"), InvalidArgument("bad"), KeyboardInterrupt()):  # fmt: skip
        counters.record_failure(exc, path)
    assert counters.read(path).failures == {"vm": 2, "agent": 1, "host-memory": 1, "invalid": 1, "interrupted": 1}


def test_the_template_result_of_a_start() -> None:
    assert counters.template_result({"template_restored": 1.0}, made=False) == "hit"
    assert counters.template_result({"template_restored": 1.0}, made=True) == "made"
    assert counters.template_result({"template_failed": 1.0, "agent_ready": 2.0}, made=False) == "failed"
    assert counters.template_result({"agent_ready": 2.0}, made=False) == ""


def test_a_malformed_or_missing_document_counts_nothing(tmp_path: Path) -> None:
    assert counters.read(tmp_path / "none.json") == counters.Counters()
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"starts": {"a": -1, "b": "x"}, "failures": [], "start_seconds": {"c": {"buckets": [1]}}})
    )
    assert counters.read(bad) == counters.Counters()
    bad.write_text("{not json")
    assert counters.read(bad) == counters.Counters()


def _count_starts(path: str) -> None:
    for _ in range(20):
        counters.record_start("template", "hit", 1.0, Path(path))


def test_concurrent_starts_lose_no_count(tmp_path: Path) -> None:
    path = tmp_path / "counters.json"
    workers = [multiprocessing.Process(target=_count_starts, args=(str(path),)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert counters.read(path).starts == {"template/hit": 80}


def samples(family: Metric) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}


def test_the_monitor_serves_them_as_prometheus_families(tmp_path: Path) -> None:
    path = tmp_path / "counters.json"
    counters.record_start("template", "made", 7.0, path)
    counters.record_start("template", "hit", 1.0, path)
    counters.record_failure(HypervisorError("x"), path)
    starts, failures, seconds = runtime_families(counters.read(path))
    assert (
        samples(starts)[("capsa_runtime_sandbox_starts_total", frozenset({("boot", "template"), ("template", "hit")}))]
        == 1
    )
    assert samples(failures)[("capsa_runtime_sandbox_start_failures_total", frozenset({("reason", "vm")}))] == 1
    histogram = samples(seconds)
    bucket = "capsa_runtime_sandbox_start_seconds_bucket"
    assert histogram[(bucket, frozenset({("boot", "template"), ("le", "1")}))] == 1  # cumulative
    assert histogram[(bucket, frozenset({("boot", "template"), ("le", "+Inf")}))] == 2
    assert histogram[("capsa_runtime_sandbox_start_seconds_sum", frozenset({("boot", "template")}))] == 8.0
