"""capsa-monitor against a real container: its QEMU, proxy, virtiofsd and shims' cost on the host,
and the guest's own figures from the agent, scraped over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from harness import Capsa, Samples, scrape, start_monitor, subreaper, vm_processes

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True)
def adopt_orphans() -> Iterator[None]:
    with subreaper():
        yield


def find(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, (name, labels)
    return found[0] if found else None


def scrape_until(url: str, check: Callable[[Samples], bool], what: str, timeout: float = 120) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def test_monitor_scrapes_a_running_container(capsa: Capsa) -> None:
    cid = "mon"
    capsa.spec(["sleep", "600"])
    pid_file = capsa.root.parent / f"{cid}.pid"
    created = capsa.popen("create", "--bundle", str(capsa.bundle), "--pid-file", str(pid_file), cid)
    assert created.wait(timeout=180) == 0
    monitor: subprocess.Popen[bytes] | None = None
    try:
        assert capsa("start", cid).code == 0
        pids = vm_processes(capsa, cid)
        log = capsa.root.parent / "monitor.log"
        # Reading on every scrape; TCG guests answer slowly while they are busy booting an exec.
        monitor, url = start_monitor(capsa.root, log, cache_seconds=0, agent_timeout=10, scrape_timeout=20)
        base = {"sandbox": cid}

        samples = scrape_until(url, lambda s: find(s, "capsa_sandbox_agent_up", reason="ok", **base) == 1, "agent up")
        assert find(samples, "capsa_sandbox_up", **base) == 1
        assert find(samples, "capsa_sandbox_status", status="running", **base) == 1
        # The host's cost, by role: QEMU's PSS holds the guest's touched RAM.
        for role in ("qemu", "proxy", "shim", "virtiofsd", "vmm"):
            pss = find(samples, "capsa_sandbox_host_pss_bytes", role=role, **base)
            assert pss is not None and pss > 0, role
        qemu_pss = find(samples, "capsa_sandbox_host_pss_bytes", role="qemu", **base)
        proxy_pss = find(samples, "capsa_sandbox_host_pss_bytes", role="proxy", **base)
        assert qemu_pss is not None and proxy_pss is not None and qemu_pss > proxy_pss
        assert find(samples, "capsa_sandbox_host_processes", role="qemu", **base) == 1
        virtiofsd = find(samples, "capsa_sandbox_host_processes", role="virtiofsd", **base)
        assert virtiofsd is not None and virtiofsd >= 2  # rootfs and volumes shares
        qemu_cpu = find(samples, "capsa_sandbox_host_cpu_seconds_total", role="qemu", **base)
        assert qemu_cpu is not None and qemu_cpu > 0
        # The guest's figures, from its agent.
        total = find(samples, "capsa_guest_memory_total_bytes", **base)
        assert total is not None and total > 64 << 20
        cpus = find(samples, "capsa_guest_online_cpus", **base)
        assert cpus is not None and cpus >= 1
        boot = find(samples, "capsa_guest_kernel_boot_seconds", **base)
        assert boot is not None and boot > 0
        used = find(samples, "capsa_container_memory_usage_bytes", container=cid, **base)
        assert used is not None and used > 0
        assert find(samples, "capsa_container_pids", container=cid, **base) == 1  # sleep
        count = find(samples, "capsa_agent_rpc_duration_seconds_count", via="proxy", rpc="StatsContainer", **base)
        assert count is not None and count >= 1

        # An exec's shim counts apart from the init's.
        assert capsa("exec", "--detach", cid, "sleep", "300").code == 0
        samples = scrape_until(
            url, lambda s: find(s, "capsa_sandbox_host_processes", role="exec-shim", **base) == 1, "exec shim"
        )
        assert find(samples, "capsa_container_pids", container=cid, **base) == 2

        # A paused container says so, and its agent still answers.
        assert capsa("pause", cid).code == 0
        samples = scrape(url)
        assert find(samples, "capsa_sandbox_status", status="paused", **base) == 1
        assert find(samples, "capsa_sandbox_agent_up", reason="ok", **base) == 1
        assert capsa("resume", cid).code == 0

        # A QEMU that cannot run (stopped) gives agent_up 0 at once, not a hung scrape.
        os.kill(pids["qemu"], signal.SIGSTOP)
        try:
            started = time.monotonic()
            samples = scrape(url)
            assert time.monotonic() - started < 10
            assert find(samples, "capsa_sandbox_agent_up", reason="frozen", **base) == 0
        finally:
            os.kill(pids["qemu"], signal.SIGCONT)
        scrape_until(url, lambda s: find(s, "capsa_sandbox_agent_up", reason="ok", **base) == 1, "agent back")
    finally:
        if monitor is not None:
            monitor.terminate()
            assert monitor.wait(timeout=10) == 0
        capsa("delete", "--force", cid)
