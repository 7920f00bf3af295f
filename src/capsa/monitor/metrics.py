"""The metric families of one snapshot: pure, data in and Prometheus families out.

Every per-sandbox series carries ``sandbox`` (the VM's ID: the container's
for a runc-CLI container, the pod sandbox's for a shim v2 pod),
``pod_name`` and ``pod_namespace`` (CRI annotations; empty outside
Kubernetes); per-container series add ``container`` and ``container_name``.
``capsa_sandbox_info`` carries the rest (kind, containers, how it booted,
where it was found), to be joined on ``sandbox`` when wanted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from capsa.monitor.discovery import SandboxInfo
from capsa.monitor.guest import LATENCY_BUCKETS, GuestReport, LatencyCounts, Reason
from capsa.monitor.roles import RoleUsage
from capsa.runtime.counters import START_BUCKETS, Counters
from capsa.runtime.state import Status

SANDBOX_LABELS = ("sandbox", "pod_name", "pod_namespace")
CONTAINER_LABELS = (*SANDBOX_LABELS, "container", "container_name")
#: Every status a sandbox or container is reported in (OCI's, and "unknown" when its shim did not say).
STATUSES = (Status.CREATING, Status.CREATED, Status.RUNNING, Status.PAUSED, Status.STOPPED, "unknown")


@dataclass(frozen=True)
class SandboxSample:
    """What one refresh learned of one sandbox."""

    sandbox: SandboxInfo
    roles: Mapping[str, RoleUsage] = field(default_factory=dict)
    vm_running: bool = False  # its QEMU process is there
    boot: str = ""  # "template", "cold", or "" when its QEMU is not there
    guest: GuestReport = field(default_factory=lambda: GuestReport(False, Reason.STOPPED))


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # seconds since the epoch
    duration_seconds: float  # how long taking it took
    refreshes: int  # snapshots taken since the monitor started, this one included
    samples: tuple[SandboxSample, ...] = ()
    latencies: tuple[LatencyCounts, ...] = ()
    #: The host's runtime counters (runtime/counters.py) as read for this snapshot.
    runtime: Counters = field(default_factory=Counters)


def sandbox_status(sample: SandboxSample) -> str:
    """runc: capsa's state with liveness; shim v2: what its shim says of the pod's sandbox container."""
    info = sample.sandbox
    if info.status:
        return info.status
    return sample.guest.statuses.get(info.id, "unknown")


def container_status(sample: SandboxSample, container_id: str, recorded: str) -> str:
    return recorded or sample.guest.statuses.get(container_id, "unknown")


def sandbox_label_values(samples: tuple[SandboxSample, ...]) -> list[tuple[str, str, str]]:
    """The label values of each sample; a sandbox ID seen twice (two roots, one ID) gets ``@source``."""
    seen: set[str] = set()
    values = []
    for sample in samples:
        info = sample.sandbox
        name = info.id if info.id not in seen else f"{info.id}@{info.source}"
        seen.add(info.id)
        values.append((name, info.pod_name, info.pod_namespace))
    return values


def families(snapshot: Snapshot) -> list[Metric]:
    samples = snapshot.samples
    labels = sandbox_label_values(samples)

    refresh = GaugeMetricFamily(
        "capsa_monitor_refresh_seconds", "How long the monitor's last reading of the host and the agents took."
    )
    refresh.add_metric([], snapshot.duration_seconds)
    refreshed_at = GaugeMetricFamily(
        "capsa_monitor_last_refresh_timestamp_seconds", "When the figures served were read (they are cached)."
    )
    refreshed_at.add_metric([], snapshot.taken_at)
    refreshes = CounterMetricFamily("capsa_monitor_refreshes", "Readings of the host and the agents taken.")
    refreshes.add_metric([], snapshot.refreshes)

    by_status: dict[tuple[str, str], int] = {}
    by_boot: dict[str, int] = {}
    for sample in samples:
        key = (sample.sandbox.kind, sandbox_status(sample))
        by_status[key] = by_status.get(key, 0) + 1
        if sample.vm_running:
            by_boot[sample.boot] = by_boot.get(sample.boot, 0) + 1
    sandboxes = GaugeMetricFamily(
        "capsa_sandboxes", "Sandboxes on this host by kind and status.", labels=["kind", "status"]
    )
    for (kind, word), count in sorted(by_status.items()):
        sandboxes.add_metric([kind, word], count)
    booted = GaugeMetricFamily(
        "capsa_sandboxes_booted",
        "Sandboxes whose VM runs, by how it booted: restored from a VM template or a cold kernel boot.",
        labels=["boot"],
    )
    for boot, count in sorted(by_boot.items()):
        booted.add_metric([boot], count)

    info = GaugeMetricFamily(
        "capsa_sandbox_info",
        "One per sandbox: its kind (runc, shim-v2), containers, boot (template, cold) and where it was found.",
        labels=[*SANDBOX_LABELS, "kind", "containers", "boot", "source"],
    )
    status = GaugeMetricFamily(
        "capsa_sandbox_status",
        "1 for the sandbox's current status, 0 for the others.",
        labels=[*SANDBOX_LABELS, "status"],
    )
    up = GaugeMetricFamily("capsa_sandbox_up", "1 while the sandbox's VM (its QEMU) runs.", labels=list(SANDBOX_LABELS))
    created = GaugeMetricFamily(
        "capsa_sandbox_created_timestamp_seconds", "When the sandbox was created.", labels=list(SANDBOX_LABELS)
    )
    role_labels = [*SANDBOX_LABELS, "role"]
    processes = GaugeMetricFamily(
        "capsa_sandbox_host_processes",
        "The sandbox's host processes by role (shim, exec-shim, proxy, virtiofsd, vmm, qemu).",
        labels=role_labels,
    )
    cpu = CounterMetricFamily(
        "capsa_sandbox_host_cpu_seconds",
        "CPU time (user + system) of the sandbox's host processes by role; a role's falls when one of its"
        " processes ends (an exec's shim).",
        labels=role_labels,
    )
    rss = GaugeMetricFamily(
        "capsa_sandbox_host_rss_bytes", "Resident memory of the sandbox's host processes by role.", labels=role_labels
    )
    pss = GaugeMetricFamily(
        "capsa_sandbox_host_pss_bytes",
        "Proportional set size of the sandbox's host processes by role: shared pages split among their users.",
        labels=role_labels,
    )
    agent_up = GaugeMetricFamily(
        "capsa_sandbox_agent_up",
        "1 when the sandbox's agent answered this refresh; the reason says why not"
        " (timeout, unreachable, error, stopped, creating, frozen, skipped).",
        labels=[*SANDBOX_LABELS, "reason"],
    )
    guest_info = GaugeMetricFamily(
        "capsa_guest_info",
        "The guest's kernel, agent and crun versions.",
        labels=[*SANDBOX_LABELS, "kernel_release", "agent_version", "crun_version"],
    )
    guest_cpus = GaugeMetricFamily("capsa_guest_online_cpus", "vCPUs online in the guest.", labels=list(SANDBOX_LABELS))
    guest_memory = GaugeMetricFamily(
        "capsa_guest_memory_total_bytes", "The guest's MemTotal.", labels=list(SANDBOX_LABELS)
    )
    kernel_boot = GaugeMetricFamily(
        "capsa_guest_kernel_boot_seconds",
        "Guest uptime when its /init started: the kernel's boot (a template clone's is its template's).",
        labels=list(SANDBOX_LABELS),
    )
    agent_start = GaugeMetricFamily(
        "capsa_guest_agent_start_seconds",
        "From the guest's /init starting until its agent served its first request.",
        labels=list(SANDBOX_LABELS),
    )
    guest_load = GaugeMetricFamily(
        "capsa_guest_load_average",
        "The guest kernel's load average (/proc/loadavg) over the minutes given.",
        labels=[*SANDBOX_LABELS, "minutes"],
    )
    policy_denials = CounterMetricFamily(
        "capsa_guest_policy_denials",
        "Requests the guest's agent policy refused; policy is the SHA-256 of the policy in force"
        " (empty: the built-in allow-everything).",
        labels=[*SANDBOX_LABELS, "policy"],
    )
    c_status = GaugeMetricFamily(
        "capsa_container_status",
        "1 for the container's current status, 0 for the others.",
        labels=[*CONTAINER_LABELS, "status"],
    )
    c_cpu = CounterMetricFamily(
        "capsa_container_cpu_seconds", "CPU time of the container's cgroup in the guest.", labels=list(CONTAINER_LABELS)
    )
    c_memory = GaugeMetricFamily(
        "capsa_container_memory_usage_bytes",
        "memory.current of the container's cgroup in the guest.",
        labels=list(CONTAINER_LABELS),
    )
    c_limit = GaugeMetricFamily(
        "capsa_container_memory_limit_bytes",
        "memory.max of the container's cgroup in the guest (absent when unlimited).",
        labels=list(CONTAINER_LABELS),
    )
    c_pids = GaugeMetricFamily(
        "capsa_container_pids", "pids.current of the container's cgroup in the guest.", labels=list(CONTAINER_LABELS)
    )
    c_oom = CounterMetricFamily(
        "capsa_container_oom_kills",
        "Processes the guest's OOM killer took in the container's cgroup (memory.events oom_kill).",
        labels=list(CONTAINER_LABELS),
    )

    by_source: dict[str, list[str]] = {}
    for sample, base in zip(samples, labels, strict=True):
        sb = sample.sandbox
        by_source[sb.source] = list(base)
        current = sandbox_status(sample)
        info.add_metric(
            [*base, sb.kind, ",".join(c.id for c in sb.containers), sample.boot, sb.source],
            1,
        )
        for word in STATUSES:
            status.add_metric([*base, word], 1 if word == current else 0)
        up.add_metric(list(base), 1 if sample.vm_running else 0)
        if sb.created is not None:
            created.add_metric(list(base), sb.created)
        for role, usage in sorted(sample.roles.items()):
            processes.add_metric([*base, role], usage.processes)
            cpu.add_metric([*base, role], usage.cpu_seconds)
            rss.add_metric([*base, role], usage.rss_bytes)
            pss.add_metric([*base, role], usage.pss_bytes)
        guest = sample.guest
        agent_up.add_metric([*base, guest.reason], 1 if guest.up else 0)
        details = guest.details
        if details is not None:
            guest_info.add_metric([*base, details.kernel_release, details.agent_version, details.crun_version], 1)
            guest_cpus.add_metric(list(base), details.online_cpus)
            guest_memory.add_metric(list(base), details.memory_total_bytes)
            kernel_boot.add_metric(list(base), details.kernel_boot_seconds)
            agent_start.add_metric(list(base), details.agent_start_seconds)
            policy_denials.add_metric([*base, details.policy_digest], details.policy_denials)
            for minutes, load in zip(("1", "5", "15"), details.load_average, strict=False):
                guest_load.add_metric([*base, minutes], load)
        for container in sb.containers:
            c_base = [*base, container.id, container.name]
            c_current = container_status(sample, container.id, container.status)
            for word in STATUSES:
                c_status.add_metric([*c_base, word], 1 if word == c_current else 0)
            figures = guest.containers.get(container.id)
            if figures is None:
                continue
            c_cpu.add_metric(c_base, figures.cpu_seconds)
            c_memory.add_metric(c_base, figures.memory_usage_bytes)
            if figures.memory_limit_bytes:
                c_limit.add_metric(c_base, figures.memory_limit_bytes)
            c_pids.add_metric(c_base, figures.pids)
            c_oom.add_metric(c_base, figures.oom_kills)

    rpc_labels = [*SANDBOX_LABELS, "via", "rpc"]
    latency = HistogramMetricFamily(
        "capsa_agent_rpc_duration_seconds",
        "How long the agent took to answer the monitor's own calls, by RPC and by the way they went"
        " (proxy: a runc-CLI container's capsa-proxy; shim-v2: the pod's shim).",
        labels=rpc_labels,
    )
    errors = CounterMetricFamily(
        "capsa_agent_rpc_errors", "The monitor's agent calls that failed or timed out.", labels=rpc_labels
    )
    bounds = [f"{bound:g}" for bound in LATENCY_BUCKETS] + ["+Inf"]
    for counts in snapshot.latencies:
        owner = by_source.get(counts.source)
        if owner is None:
            continue
        rpc_values = [*owner, counts.via, counts.rpc]
        latency.add_metric(rpc_values, list(zip(bounds, counts.buckets, strict=True)), counts.total_seconds)
        errors.add_metric(rpc_values, counts.errors)

    return [
        *runtime_families(snapshot.runtime),
        refresh,
        refreshed_at,
        refreshes,
        sandboxes,
        booted,
        info,
        status,
        up,
        created,
        processes,
        cpu,
        rss,
        pss,
        agent_up,
        guest_info,
        guest_cpus,
        guest_memory,
        kernel_boot,
        agent_start,
        guest_load,
        policy_denials,
        c_status,
        c_cpu,
        c_memory,
        c_limit,
        c_pids,
        c_oom,
        latency,
        errors,
    ]


def runtime_families(counters: Counters) -> list[Metric]:
    """The host's runtime counters (runtime/counters.py): starts, failures by reason, template use, start times."""
    starts = CounterMetricFamily(
        "capsa_runtime_sandbox_starts",
        "Sandboxes started on this host, by how they booted and how they used a template"
        " (hit, made: this start made it, failed: it booted cold after; empty for a cold boot).",
        labels=["boot", "template"],
    )
    for key, count in sorted(counters.starts.items()):
        boot, _, template = key.partition("/")
        starts.add_metric([boot, template], count)
    failures = CounterMetricFamily(
        "capsa_runtime_sandbox_start_failures",
        "Sandboxes that did not start, by reason (invalid, host-memory, guest-files, storage, vm, agent, host,"
        " interrupted).",
        labels=["reason"],
    )
    for reason, count in sorted(counters.failures.items()):
        failures.add_metric([reason], count)
    seconds = HistogramMetricFamily(
        "capsa_runtime_sandbox_start_seconds",
        "How long starting a sandbox took (its VM booted or restored, its agent answering), by boot.",
        labels=["boot"],
    )
    bounds = [f"{bound:g}" for bound in START_BUCKETS] + ["+Inf"]
    for boot, histogram in sorted(counters.start_seconds.items()):
        cumulative, running = [], 0
        for count in histogram["buckets"]:
            running += count
            cumulative.append(running)
        seconds.add_metric([boot], list(zip(bounds, cumulative, strict=True)), histogram["sum"])
    return [starts, failures, seconds]
