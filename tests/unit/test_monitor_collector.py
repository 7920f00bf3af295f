"""capsa-monitor's collector as data: a fake /proc and state directories in, metric families out."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from monitor_fakes import BOOT_TIME, CLOCK_TICKS, FakeHost, shim_v2_argv
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from capsa.monitor import discovery, procfs
from capsa.monitor.collector import Monitor, Settings, take_snapshot
from capsa.monitor.discovery import SandboxInfo
from capsa.monitor.guest import (
    ContainerFigures,
    GuestDetails,
    GuestReport,
    LatencyBook,
    Reason,
    Record,
    ask_order,
    gather,
)
from capsa.monitor.metrics import Snapshot
from capsa.monitor.roles import Role, assign_roles

DETAILS = GuestDetails("6.1.0-capsa", "0.1.0", "1.8.1", 2, 512 * 1024 * 1024, 0.25, 0.5)


def answering(figures: Mapping[str, ContainerFigures] | None = None) -> object:
    """An agent that answers at once with DETAILS and, for each container, ``figures`` or a fixed set."""
    asked: list[str] = []

    async def ask(sandbox: SandboxInfo, timeout: float, record: Record) -> GuestReport:
        asked.append(sandbox.id)
        record("Check", 0.002)
        record("StatsContainer", 0.004)
        containers = figures or {c.id: ContainerFigures(1.5, 10 << 20, 256 << 20, 3) for c in sandbox.containers}
        statuses = {c.id: "running" for c in sandbox.containers} if sandbox.kind == "shim-v2" else {}
        return GuestReport(True, Reason.OK, details=DETAILS, containers=containers, statuses=statuses)

    ask.asked = asked  # type: ignore[attr-defined]
    return ask


def scrape(settings: Settings) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The metrics a Prometheus scrape of a fresh monitor would read: (sample name, labels) -> value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Monitor(settings))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, [k for k in samples if k[0] == name])
    return found[0]


def label_sets(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> list[dict[str, str]]:
    return [dict(ls) for (n, ls) in samples if n == name]


def runc_container(host: FakeHost, cid: str = "c1", base: int = 100, **state: object) -> Path:
    """A running container's processes as capsa makes them, and its state (docs/architecture.md)."""
    shim, proxy, vfs, vfs_child, vol, vmm, qemu = (base + i for i in range(7))
    host.process(shim, "capsa-shim", utime=50, stime=50, rss_kb=30_000, pss_kb=20_000, argv=["python3", "-m"])
    host.process(proxy, "capsa-proxy", utime=200, stime=100, rss_kb=40_000, pss_kb=25_000)
    host.process(vfs, "virtiofsd", ppid=proxy, utime=10, rss_kb=4_000, pss_kb=1_000)
    host.process(vfs_child, "virtiofsd", ppid=vfs, utime=30, stime=10, rss_kb=6_000, pss_kb=2_000)
    host.process(vol, "virtiofsd", ppid=proxy, rss_kb=4_000, pss_kb=1_000)
    host.process(vmm, "capsa-vmm", ppid=proxy, rss_kb=600, pss_kb=160)
    host.process(qemu, "qemu-system-x86", ppid=vmm, utime=900, stime=100, rss_kb=300_000, pss_kb=280_000)
    return host.container(cid, shim=shim, proxy=proxy, hypervisor=qemu, **state)  # type: ignore[arg-type]


# -- /proc parsing ----------------------------------------------------------------


def test_parse_stat_takes_fields_after_the_last_parenthesis() -> None:
    text = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 10 0 0 0 250 150 0 0 20 0 1 0 98765 1000 10\n"
    stat = procfs.parse_stat(text)
    assert (stat.pid, stat.comm, stat.state, stat.ppid) == (4242, "a (b) c", "S", 17)
    assert (stat.cpu_ticks, stat.start_time) == (400, 98765)


def test_parse_stat_of_this_process() -> None:
    stat = procfs.parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert stat.pid == os.getpid() and stat.ppid == os.getppid() and stat.state == "R"


def test_parse_smaps_rollup_in_bytes() -> None:
    text = "5600-7ffd ---p 00000000 00:00 0   [rollup]\nRss:  1768 kB\nPss:   378 kB\nPss_Anon:  100 kB\n"
    assert procfs.parse_smaps_rollup(text) == procfs.MemoryUse(1768 * 1024, 378 * 1024)


def test_parse_cmdline() -> None:
    assert procfs.parse_cmdline(b"python3\0-m\0capsa.shim\0") == ("python3", "-m", "capsa.shim")
    assert procfs.parse_cmdline(b"") == ()


# -- roles ------------------------------------------------------------------------


def test_roles_follow_the_process_tree(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    runc_container(host)
    host.process(999, "bash", ppid=1)  # not the sandbox's
    table = procfs.read_process_table(host.proc)
    roles = assign_roles(table, [(100, Role.SHIM), (101, Role.PROXY)], hypervisor_pid=106)
    assert roles == {
        100: Role.SHIM,
        101: Role.PROXY,
        102: Role.VIRTIOFSD,
        103: Role.VIRTIOFSD,
        104: Role.VIRTIOFSD,
        105: Role.VMM,
        106: Role.QEMU,
    }


def test_unconfined_qemu_is_known_by_its_pid_or_name(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.process(10, "capsa-proxy")
    host.process(11, "my-vmm-binary", ppid=10)  # the configured hypervisor path, any name
    host.process(12, "qemu-system-x86", ppid=10)  # a template maker, say
    table = procfs.read_process_table(host.proc)
    assert assign_roles(table, [(10, Role.PROXY)], hypervisor_pid=11) == {10: "proxy", 11: "qemu", 12: "qemu"}


# -- runc-CLI containers -------------------------------------------------------------


def test_host_cost_by_role_with_pod_labels(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    annotations = {
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "shop",
        "io.kubernetes.cri.container-name": "nginx",
    }
    runc_container(host, annotations=annotations)
    samples = scrape(host.settings(asks={"runc": answering()}))

    base = {"sandbox": "c1", "pod_name": "web-0", "pod_namespace": "shop"}
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="qemu", **base) == 280_000 * 1024
    assert value(samples, "capsa_sandbox_host_rss_bytes", role="qemu", **base) == 300_000 * 1024
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="virtiofsd", **base) == 4_000 * 1024
    assert value(samples, "capsa_sandbox_host_processes", role="virtiofsd", **base) == 3
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="proxy", **base) == 25_000 * 1024
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="shim", **base) == 20_000 * 1024
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="vmm", **base) == 160 * 1024
    assert value(samples, "capsa_sandbox_host_cpu_seconds_total", role="qemu", **base) == 1000 / CLOCK_TICKS
    assert value(samples, "capsa_sandbox_host_cpu_seconds_total", role="proxy", **base) == 300 / CLOCK_TICKS
    assert value(samples, "capsa_sandbox_up", **base) == 1
    assert value(samples, "capsa_sandbox_status", status="running", **base) == 1
    assert value(samples, "capsa_sandbox_status", status="stopped", **base) == 0
    assert value(samples, "capsa_sandbox_created_timestamp_seconds", **base) == 1714564800
    info = label_sets(samples, "capsa_sandbox_info")
    assert info == [{**base, "kind": "runc", "containers": "c1", "boot": "cold", "source": str(host.root / "c1")}]

    # The guest's figures, per container with its CRI name.
    assert value(samples, "capsa_sandbox_agent_up", reason="ok", **base) == 1
    assert value(samples, "capsa_guest_memory_total_bytes", **base) == 512 * 1024 * 1024
    assert value(samples, "capsa_guest_online_cpus", **base) == 2
    assert value(samples, "capsa_guest_kernel_boot_seconds", **base) == 0.25
    assert value(samples, "capsa_guest_info", kernel_release="6.1.0-capsa", crun_version="1.8.1") == 1
    cbase = {**base, "container": "c1", "container_name": "nginx"}
    assert value(samples, "capsa_container_cpu_seconds_total", **cbase) == 1.5
    assert value(samples, "capsa_container_memory_usage_bytes", **cbase) == 10 << 20
    assert value(samples, "capsa_container_memory_limit_bytes", **cbase) == 256 << 20
    assert value(samples, "capsa_container_pids", **cbase) == 3
    assert value(samples, "capsa_container_status", status="running", **cbase) == 1

    # The monitor's own calls to the agent, as a histogram by RPC.
    rpc = {**base, "via": "proxy", "rpc": "StatsContainer"}
    assert value(samples, "capsa_agent_rpc_duration_seconds_bucket", le="0.005", **rpc) == 1
    assert value(samples, "capsa_agent_rpc_duration_seconds_bucket", le="0.0025", **rpc) == 0
    assert value(samples, "capsa_agent_rpc_duration_seconds_count", **rpc) == 1
    assert value(samples, "capsa_sandboxes", kind="runc", status="running") == 1
    assert value(samples, "capsa_sandboxes_booted", boot="cold") == 1


def test_exec_shims_count_apart_from_the_init_shim(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    runc_container(host)
    argv = ["python3", "-m", "capsa.shim", "--root", str(host.root), "--id=c1", "--exec-id", "ab12", "--process", "p"]
    host.process(300, "capsa-shim", argv=argv, rss_kb=30_000, pss_kb=9_000)
    other = ["python3", "-m", "capsa.shim", "--root", str(host.root), "--id=c2", "--exec-id", "cd34"]
    host.process(301, "capsa-shim", argv=other, rss_kb=30_000, pss_kb=9_000)  # another container's
    samples = scrape(host.settings(asks={"runc": answering()}))
    assert value(samples, "capsa_sandbox_host_pss_bytes", sandbox="c1", role="exec-shim") == 9_000 * 1024
    assert value(samples, "capsa_sandbox_host_processes", sandbox="c1", role="exec-shim") == 1
    assert value(samples, "capsa_sandbox_host_pss_bytes", sandbox="c1", role="shim") == 20_000 * 1024


def test_a_template_clone_says_so(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.process(10, "capsa-shim")
    host.process(11, "capsa-proxy")
    host.process(12, "capsa-vmm", ppid=11)
    host.process(13, "qemu-system-x86", ppid=12, argv=["qemu-system-x86_64", "-m", "512", "-incoming", "defer"])
    host.container("clone", shim=10, proxy=11, hypervisor=13)
    samples = scrape(host.settings(asks={"runc": answering()}))
    assert label_sets(samples, "capsa_sandbox_info")[0]["boot"] == "template"
    assert value(samples, "capsa_sandboxes_booted", boot="template") == 1


def test_a_stopped_container_is_reported_without_asking_its_agent(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.container("gone", shim=10, proxy=11, hypervisor=13)  # none of them runs
    host.process(20, "capsa-shim")
    host.process(21, "capsa-proxy")
    # Its PIDs now belong to other processes: the start times tell them apart.
    host.container("reused", shim=20, proxy=21, shim_start=5, proxy_start=5)
    ask = answering()
    samples = scrape(host.settings(asks={"runc": ask}))
    for sandbox in ("gone", "reused"):
        assert value(samples, "capsa_sandbox_status", sandbox=sandbox, status="stopped") == 1
        assert value(samples, "capsa_sandbox_up", sandbox=sandbox) == 0
        assert value(samples, "capsa_sandbox_agent_up", sandbox=sandbox, reason="stopped") == 0
    assert label_sets(samples, "capsa_sandbox_host_pss_bytes") == []
    assert ask.asked == []  # type: ignore[attr-defined]
    assert value(samples, "capsa_sandboxes", kind="runc", status="stopped") == 2


def test_a_stopped_qemu_is_frozen_not_waited_for(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.process(10, "capsa-shim")
    host.process(11, "capsa-proxy")
    host.process(13, "qemu-system-x86", ppid=11, state="T")  # SIGSTOPped
    host.container("paused-vm", shim=10, proxy=11, hypervisor=13)
    ask = answering()
    samples = scrape(host.settings(asks={"runc": ask}))
    assert value(samples, "capsa_sandbox_agent_up", sandbox="paused-vm", reason="frozen") == 0
    assert ask.asked == []  # type: ignore[attr-defined]


def test_a_paused_container_says_so(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    runc_container(host, "p1", status="paused")
    samples = scrape(host.settings(asks={"runc": answering()}))
    assert value(samples, "capsa_sandbox_status", sandbox="p1", status="paused") == 1
    assert value(samples, "capsa_sandbox_status", sandbox="p1", status="running") == 0
    assert value(samples, "capsa_sandbox_agent_up", sandbox="p1") == 1


def test_runc_state_in_the_same_root_is_passed_over(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    runc_container(host)
    runc_own = host.root / "a-runc-container"
    runc_own.mkdir()
    (runc_own / "state.json").write_text('{"id": "a-runc-container", "init_process_pid": 5, "config": {}}')
    (host.root / "junk").mkdir()
    (host.root / "junk" / "state.json").write_text("{not json")
    samples = scrape(host.settings(asks={"runc": answering()}))
    assert [labels["sandbox"] for labels in label_sets(samples, "capsa_sandbox_info")] == ["c1"]


def test_containers_under_any_root_are_found_through_their_socket_directories(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    elsewhere = tmp_path / "some" / "engine" / "root"
    runc_container(host, "far", root=elsewhere)
    without_link = scrape(host.settings(asks={"runc": answering()}, roots=()))
    assert [labels["source"] for labels in label_sets(without_link, "capsa_sandbox_info")] == [str(elsewhere / "far")]


def test_a_root_named_through_a_symlink_keeps_its_sockets(tmp_path: Path) -> None:
    # Docker names /var/run/docker/...; /var/run is a link to /run.  The socket
    # key hashes the path the runtime was given, which the link records.
    host = FakeHost(tmp_path)
    real_root = tmp_path / "run" / "docker"
    real_root.mkdir(parents=True)
    (tmp_path / "var").mkdir()
    os.symlink(tmp_path / "run", tmp_path / "var" / "run")
    given_root = tmp_path / "var" / "run" / "docker"
    runc_container(host, "d1", root=given_root)
    sandboxes = discovery.discover_runc([real_root], procfs.read_process_table(host.proc), host.socket_root)
    [sandbox] = sandboxes
    assert sandbox.endpoint == host.socket_dir("d1", root=given_root)
    assert sandbox.source == str(real_root / "d1")


def test_the_same_id_under_two_roots_stays_two_sandboxes(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    runc_container(host, "same", base=100)
    other_root = tmp_path / "other"
    runc_container(host, "same", base=200, root=other_root)
    samples = scrape(host.settings(asks={"runc": answering()}, roots=(host.root, other_root)))
    names = sorted(labels["sandbox"] for labels in label_sets(samples, "capsa_sandbox_info"))
    assert names == ["same", f"same@{other_root / 'same'}"]


# -- shim v2 pods ------------------------------------------------------------------------


def test_a_shim_v2_pod_with_its_containers(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    socket = "/run/capsa-v2/s/0123456789abcdef0123456789abcdef"
    address = f"unix://{socket}"
    pod = {"io.kubernetes.cri.sandbox-name": "db-0", "io.kubernetes.cri.sandbox-namespace": "prod"}
    sandbox_bundle = host.bundle("k8s.io", "sb1", address, {**pod, "io.kubernetes.cri.container-type": "sandbox"})
    host.bundle("k8s.io", "app1", address, {**pod, "io.kubernetes.cri.container-name": "postgres"})
    host.bundle("k8s.io", "sb2", "unix:///run/capsa-v2/s/other", {})  # another pod's shim
    argv = shim_v2_argv("k8s.io", "sb1", socket)
    host.process(500, "capsa-shim-v2", argv=argv, cwd=sandbox_bundle, rss_kb=50_000, pss_kb=40_000, start=4000)
    host.process(501, "virtiofsd", ppid=500, pss_kb=1_500)
    host.process(502, "capsa-vmm", ppid=500, pss_kb=160)
    host.process(503, "qemu-system-x86", ppid=502, pss_kb=200_000)
    samples = scrape(host.settings(asks={"shim-v2": answering()}))

    base = {"sandbox": "sb1", "pod_name": "db-0", "pod_namespace": "prod"}
    [info] = label_sets(samples, "capsa_sandbox_info")
    assert info == {**base, "kind": "shim-v2", "containers": "sb1,app1", "boot": "cold", "source": "k8s.io/sb1"}
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="shim", **base) == 40_000 * 1024
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="qemu", **base) == 200_000 * 1024
    assert value(samples, "capsa_sandbox_host_pss_bytes", role="virtiofsd", **base) == 1_500 * 1024
    assert value(samples, "capsa_sandbox_created_timestamp_seconds", **base) == BOOT_TIME + 4000 / CLOCK_TICKS
    assert value(samples, "capsa_sandbox_status", status="running", **base) == 1
    app = {**base, "container": "app1", "container_name": "postgres"}
    assert value(samples, "capsa_container_memory_usage_bytes", **app) == 10 << 20
    assert value(samples, "capsa_container_status", status="running", **app) == 1


def test_parse_shim_argv_forms() -> None:
    assert discovery.parse_shim_argv(["py", "-m", "capsa.shim", "--root", "/r", "--id=-x", "--exec-id", "e"]) == (
        discovery.ShimArgs("/r", "-x", "e")
    )
    assert discovery.parse_shim_argv(["py", "--root=/r", "--id", "c"]) == discovery.ShimArgs("/r", "c", "")
    assert discovery.parse_shim_argv(["py", "--id=c"]) is None
    args = discovery.parse_shim_v2_argv(shim_v2_argv("default", "pod", "/run/capsa-v2/s/k"))
    assert args == discovery.ShimV2Args("default", "pod", "/run/capsa-v2/s/k")
    assert discovery.parse_shim_v2_argv(["py", "-m", "capsa.shim.v2", "start"]) is None


def test_cri_o_annotations_name_the_pod_too() -> None:
    annotations = {"io.kubernetes.pod.name": "p", "io.kubernetes.pod.namespace": "ns"}
    assert discovery.pod_labels(annotations) == ("p", "ns")
    assert discovery.container_name({"io.kubernetes.container.name": "c"}) == "c"


# -- asking the agents: bounds ---------------------------------------------------------------


def sandbox(name: str) -> SandboxInfo:
    return SandboxInfo(id=name, kind="runc", status="running", containers=(), source=name, endpoint=Path("/x"))


def test_gather_asks_at_most_concurrency_at_once_and_gives_up_at_the_deadline() -> None:
    in_flight = 0
    most = 0

    async def slow(sb: SandboxInfo, timeout: float, record: Record) -> GuestReport:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.05 if sb.id != "hung" else 60)
        finally:
            in_flight -= 1
        return GuestReport(True, Reason.OK)

    names = ["hung", *(f"s{i}" for i in range(19)), "late"]

    started = time.monotonic()
    reports = asyncio.run(
        gather(
            [sandbox(n) for n in names],
            lambda *_: None,
            timeout=0.3,
            concurrency=2,
            deadline=0.45,
            asks={"runc": slow},
        )
    )
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert most == 2
    assert reports["hung"] == GuestReport(False, Reason.TIMEOUT, error="no answer within 0.3 s")
    assert reports["s0"].up
    # 2 slots: "hung" holds one for 0.3 s while the others pass through the
    # other at 0.05 s each, then both serve them: the last are not reached by 0.45 s.
    assert reports["late"].reason == Reason.SKIPPED
    assert {r.reason for r in reports.values()} <= {Reason.OK, Reason.TIMEOUT, Reason.SKIPPED}


def test_gather_reports_an_ask_that_raises_as_an_error() -> None:
    async def broken(sb: SandboxInfo, timeout: float, record: Record) -> GuestReport:
        raise RuntimeError("bug")

    reports = asyncio.run(
        gather([sandbox("a")], lambda *_: None, timeout=1, concurrency=1, deadline=1, asks={"runc": broken})
    )
    assert (reports["a"].up, reports["a"].reason) == (False, Reason.ERROR)


def test_healthy_sandboxes_are_asked_before_sick_ones() -> None:
    last = {"sick": GuestReport(False, Reason.TIMEOUT), "well": GuestReport(True, Reason.OK)}
    order = ask_order([sandbox("sick"), sandbox("new"), sandbox("well")], last)
    assert [sb.id for sb in order] == ["well", "new", "sick"]


def test_latency_book_is_cumulative_and_forgets_gone_sandboxes() -> None:
    book = LatencyBook(bounds=(0.01, 0.1))
    for seconds in (0.005, 0.05, 0.5):
        book.observe("a", "proxy", "Check", seconds)
    book.failed("a", "proxy", "Check")
    book.observe("b", "proxy", "Check", 0.001)
    [a, b] = book.export()
    assert (a.source, a.buckets, a.errors) == ("a", (1, 2, 3), 1)
    assert (b.source, b.buckets, b.errors) == ("b", (1, 1, 1), 0)
    assert a.total_seconds == pytest.approx(0.555)
    book.keep_only(["a"])
    assert [c.source for c in book.export()] == ["a"]


# -- the cache -------------------------------------------------------------------------------


def test_scrapes_within_the_cache_interval_share_one_reading() -> None:
    taken: list[float] = []
    now = [100.0]

    def take(settings: Settings, book: LatencyBook, previous: Snapshot | None) -> Snapshot:
        taken.append(now[0])
        return Snapshot(taken_at=now[0], duration_seconds=0.0, refreshes=len(taken))

    monitor = Monitor(Settings(cache_seconds=5), take=take, clock=lambda: now[0])
    monitor.snapshot()
    now[0] += 4
    assert monitor.snapshot().refreshes == 1
    now[0] += 2
    assert monitor.snapshot().refreshes == 2
    assert taken == [100.0, 106.0]


def test_take_snapshot_counts_refreshes_and_keeps_latencies(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    runc_container(host)
    book = LatencyBook()
    settings = host.settings(asks={"runc": answering()})
    first = take_snapshot(settings, book)
    second = take_snapshot(settings, book, first)
    assert (first.refreshes, second.refreshes) == (1, 2)
    [check, stats] = second.latencies
    assert (check.rpc, check.buckets[-1]) == ("Check", 2)
    assert (stats.rpc, stats.buckets[-1]) == ("StatsContainer", 2)
