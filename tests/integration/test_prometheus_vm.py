"""A real Prometheus (Debian's 2.42) scraping capsa-monitor on 127.0.0.1 while sandboxes come and go,
checked through Prometheus's own HTTP API: what docs/operations.md tells an operator to set up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa, scrape, start_monitor, subreaper
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.vm, pytest.mark.slow]

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

#: Prometheus's scrape_interval, and its scrape_timeout (which may not be longer).
INTERVAL = 1.0
#: The monitor reads on every scrape (no cache: Prometheus is its one scraper) and bounds its
#: agent round well inside the scrape timeout: a scrape that times out fails as a whole, and
#: Prometheus marks every series of a failed scrape stale.
MONITOR = {"cache_seconds": 0.0, "agent_timeout": 0.4, "scrape_timeout": 0.7}
#: A change shows in the first scrape that starts after it (at most one interval later), once that
#: scrape is done (within its timeout: one more interval).
WITHIN = 2 * INTERVAL
#: How often the test asks, and what that and the query itself may add to what it measures.
POLL = 0.1
SLACK = 0.25


@pytest.fixture(autouse=True)
def adopt_orphans() -> Iterator[None]:
    with subreaper():
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Prometheus:
    url: str
    target: str  # the monitor's HOST:PORT: the instance label of its series
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query at the current time (``/api/v1/query``): its result's series."""
        body = urllib.parse.urlencode({"query": promql}).encode()
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query", body, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # 400: the query does not parse
            raise AssertionError(f"{promql!r}: {exc.code} {exc.read().decode(errors='replace')}") from exc
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def sandboxes(self, promql: str, ours: set[str]) -> set[str]:
        """The ``sandbox`` labels among ``ours`` of the query's series (other tests' sandboxes on this host
        are there too: the monitor finds every sandbox through /run/capsa-vm)."""
        return {s["metric"].get("sandbox", "") for s in self.query(promql)} & ours

    def scrapes(self) -> str:
        """The monitor's target as Prometheus last saw it, for failure messages."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            targets = json.load(response)["data"]["activeTargets"]
        return json.dumps([{k: t[k] for k in ("health", "lastError", "lastScrapeDuration")} for t in targets])


def is_ready(url: str) -> bool:
    """Prometheus's readiness endpoint says 200 once its storage is open and its configuration loaded."""
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
            status: int = response.status
            return status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prometheus(target: str, work: Path) -> Iterator[Prometheus]:
    """Debian's ``prometheus`` scraping ``http://TARGET/metrics`` every INTERVAL, storing in ``work``,
    serving its API on a free port of 127.0.0.1; stopped (SIGTERM) at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: scripts/setup.sh installs it")
        pytest.skip("prometheus is not installed: run scripts/setup.sh")
    work.mkdir()
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {INTERVAL:g}s\n"
        f"  scrape_timeout: {INTERVAL:g}s\n"
        "scrape_configs:\n"
        "  - job_name: capsa\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    url = f"http://127.0.0.1:{free_port()}"
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not is_ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not get ready: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield Prometheus(url, target, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(prom: Prometheus, check: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll ``check`` every POLL until it holds; how long that took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:g} s; the monitor's target: {prom.scrapes()}")
        time.sleep(POLL)
    return time.monotonic() - started


def documented_queries() -> list[str]:
    """docs/operations.md's PromQL: each ```promql block, split at blank lines (# lines are PromQL comments)."""
    blocks = re.findall(r"^```promql\n(.*?)^```$", OPERATIONS.read_text(), re.M | re.S)
    return [q.strip() for block in blocks for q in re.split(r"\n\s*\n", block) if q.strip()]


def test_prometheus_sees_sandboxes_come_and_go(capsa: Capsa) -> None:
    tag = os.getpid()
    a, b, c = (f"prom-{name}-{tag}" for name in "abc")
    ours = {a, b, c}
    capsa.spec(["sleep", "600"])
    work = capsa.root.parent
    monitor, metrics_url = start_monitor(capsa.root, work / "monitor.log", **MONITOR)
    made: list[str] = []
    try:
        target = urllib.parse.urlsplit(metrics_url).netloc
        with prometheus(target, work / "prometheus") as prom:
            # Two sandboxes, booted together while Prometheus finds its target.
            creates = [capsa.popen("create", "--bundle", str(capsa.bundle), cid) for cid in (a, b)]
            made += [a, b]
            assert [p.wait(timeout=180) for p in creates] == [0, 0]
            for cid in (a, b):
                assert capsa("start", cid).code == 0
            running = 'capsa_sandbox_status{status="running"} == 1'
            wait_for(prom, lambda: prom.sandboxes(running, ours) == {a, b}, "two sandboxes running", 60)
            agent_ok = 'capsa_sandbox_agent_up{reason="ok"} == 1'
            wait_for(prom, lambda: prom.sandboxes(agent_ok, ours) == {a, b}, "both agents answering", 30)

            # Their series, with the monitor's labels and Prometheus's job and instance; the empty
            # pod_name and pod_namespace of a container outside Kubernetes are no label at all.
            info = {s["metric"]["sandbox"]: s["metric"] for s in prom.query("capsa_sandbox_info")}
            for cid in (a, b):
                assert info[cid].pop("boot") in ("template", "cold")
                assert info[cid] == {
                    "__name__": "capsa_sandbox_info",
                    "job": "capsa",
                    "instance": target,
                    "sandbox": cid,
                    "kind": "runc",
                    "containers": cid,
                    "source": str(capsa.root / cid),
                }
                pss = {
                    s["metric"]["role"]: float(s["value"][1])
                    for s in prom.query(f'capsa_sandbox_host_pss_bytes{{sandbox="{cid}"}}')
                }
                assert {"qemu", "proxy", "shim", "virtiofsd", "vmm"} <= pss.keys()
                assert min(pss.values()) > 0
                used = prom.query(f'capsa_container_memory_usage_bytes{{sandbox="{cid}"}}')
                assert [(s["metric"]["container"], float(s["value"][1]) > 0) for s in used] == [(cid, True)]
            # Every family the monitor serves for them is in Prometheus with the same label names.
            served: set[tuple[str, frozenset[str]]] = set()
            for (name, labels), _ in scrape(metrics_url).items():
                values = dict(labels)
                if values.get("sandbox") in (a, b):
                    served.add((name, frozenset(k for k, v in values.items() if v)))
            stored = {
                (s["metric"]["__name__"], frozenset(s["metric"].keys() - {"__name__", "job", "instance"}))
                for s in prom.query(f'{{__name__=~"capsa_.+", sandbox=~"{a}|{b}"}}')
            }
            assert served and served <= stored, served - stored

            # A third sandbox shows within two scrapes of `capsa start` returning...
            assert capsa("create", "--bundle", str(capsa.bundle), c).code == 0
            made.append(c)
            assert capsa("start", c).code == 0
            took = wait_for(prom, lambda: prom.sandboxes(running, ours) == {a, b, c}, "the third sandbox", 30)
            assert took <= WITHIN + SLACK, f"the third sandbox showed after {took:.2f} s"

            # ...and a deleted one is gone within two scrapes of `capsa delete` returning: the first
            # scrape without it marks its series stale, so an instant query has none (well inside
            # the 5 minutes Prometheus would otherwise look back for a last sample).
            assert capsa("delete", "--force", b).code == 0
            made.remove(b)
            sandboxes = "capsa_sandbox_info"
            took = wait_for(prom, lambda: prom.sandboxes(sandboxes, ours) == {a, c}, "the deleted sandbox gone", 30)
            assert took <= WITHIN + SLACK, f"the deleted sandbox went after {took:.2f} s"
            assert prom.sandboxes(f'{{__name__=~"capsa_.+", sandbox="{b}"}}', ours) == set()

            # The operations page's queries parse, and name only families the monitor serves.
            queries = documented_queries()
            assert len(queries) >= 8
            with urllib.request.urlopen(metrics_url, timeout=60) as response:
                families = {f.name for f in text_string_to_metric_families(response.read().decode())}
            for promql in queries:
                prom.query(promql)
                for name in re.findall(r"\bcapsa_\w+", promql):
                    assert re.sub(r"_(bucket|sum|count|total)$", "", name) in families, (name, promql)
    finally:
        for cid in made:
            capsa("delete", "--force", cid)
        monitor.terminate()
        assert monitor.wait(timeout=10) == 0
