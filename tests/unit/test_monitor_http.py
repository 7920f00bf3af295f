"""capsa-monitor's HTTP endpoint on 127.0.0.1 (an ephemeral port): a healthy and a sick sandbox."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from monitor_fakes import FakeHost, fake_agent, serving, silent_listener
from prometheus_client.parser import text_string_to_metric_families

from capsa.errors import InvalidArgument
from capsa.monitor.collector import Monitor
from capsa.monitor.main import main, make_server, parse_args, parse_listen_address, settings_from, url_of


@pytest.fixture
def host(tmp_path: Path) -> Iterator[FakeHost]:
    sockets = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    try:
        yield FakeHost(tmp_path, socket_root=sockets)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples_of(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_over_http_with_a_sick_sandbox(host: FakeHost) -> None:
    for sandbox, base in (("well", 100), ("sick", 200)):
        host.process(base, "capsa-shim")
        host.process(base + 1, "capsa-proxy", pss_kb=1000)
        host.process(base + 2, "qemu-system-x86", ppid=base + 1, pss_kb=5000)
        host.container(sandbox, shim=base, proxy=base + 1, hypervisor=base + 2)
    monitor = Monitor(host.settings(agent_timeout=0.5, deadline=2.0, cache_seconds=60))
    server = make_server("127.0.0.1", 0, monitor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = url_of(server)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with (
            serving(fake_agent, host.socket_dir("well") / "proxy.sock"),
            silent_listener(host.socket_dir("sick") / "proxy.sock"),
        ):
            started = time.monotonic()
            status, text = get(url)
            elapsed = time.monotonic() - started
        assert status == 200
        assert elapsed < 2.0  # the sick one cost its timeout, not a hung scrape
        samples = samples_of(text)
        pod = {("pod_name", ""), ("pod_namespace", "")}
        assert samples[("capsa_sandbox_agent_up", frozenset({("sandbox", "sick"), ("reason", "timeout"), *pod}))] == 0
        assert samples[("capsa_sandbox_agent_up", frozenset({("sandbox", "well"), ("reason", "ok"), *pod}))] == 1
        assert samples[("capsa_guest_memory_total_bytes", frozenset({("sandbox", "well"), *pod}))] == 480 << 20
        qemu = frozenset({("sandbox", "sick"), ("role", "qemu"), *pod})
        assert samples[("capsa_sandbox_host_pss_bytes", qemu)] == 5000 * 1024

        # Within the cache interval a scrape is served from the same reading, at once.
        started = time.monotonic()
        status, again = get(url)
        assert status == 200 and time.monotonic() - started < 0.5
        assert samples_of(again)[("capsa_monitor_refreshes_total", frozenset())] == 1

        assert get(url.removesuffix("/metrics") + "/")[0] == 200
        assert get(url.removesuffix("/metrics") + "/other")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_listen_address_forms() -> None:
    assert parse_listen_address("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen_address("[::1]:9100") == ("::1", 9100)
    assert parse_listen_address(":8090") == ("", 8090)
    for bad in ("8090", "localhost", "127.0.0.1:http", "::1:8090", "h:70000"):
        with pytest.raises(InvalidArgument):
            parse_listen_address(bad)


def test_flags() -> None:
    args = parse_args(["--root", "/run/x", "--root", "/run/y", "--cache-seconds", "10"])
    settings = settings_from(args)
    assert settings.roots == (Path("/run/x"), Path("/run/y"))
    assert (settings.cache_seconds, settings.agent_timeout, settings.concurrency) == (10, 2, 4)
    assert settings.default_roots
    assert parse_args([]).listen_address == "127.0.0.1:8090"
    with pytest.raises(InvalidArgument):
        settings_from(parse_args(["--agent-timeout", "5", "--scrape-timeout", "1"]))


def test_bad_flags_and_a_taken_port_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--listen-address", "8090"]) == 2
    assert main(["--max-concurrency", "0"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--listen-address", f"127.0.0.1:{port}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("capsa-monitor: ") for line in lines)
    assert "cannot listen on 127.0.0.1:" in lines[2]
