#!/usr/bin/env python3
"""Density: what N idle containers cost the host, capsa against runc, counted two ways,
through the runc CLI and through CRI pods.

For each N (``--counts``, default 1,10,50,100), for capsa and then runc,
back to back on the same host and the same busybox bundle (``sleep``), through
each path of ``--paths`` (default both):

``cli``: the runtime's own command line (``capsa``, ``runc``), as an engine
such as Podman drives it.

``cri``: N pods of one busybox container each (``sleep 3600``), through the
CRI of a private containerd 1.6 (the harness of tests/e2e/test_cri.py,
``tests/e2e/cri/harness.py``, as bench/pod_memory.py runs it), with the
handler ``capsa`` (one ``containerd-shim-capsa-v2`` and one VM per pod) or
``runc``.  containerd starts once for the whole run, before the first N.
A sandbox here is a pod: start = ``RunPodSandbox`` + ``CreateContainer`` +
``StartContainer``; its processes are what containerd started for it
(shim, QEMU, virtiofsd, and under runc the pause and container processes),
grouped as bench/pod_memory.py groups them but for QEMU's ``capsa-vmm``,
named as the CLI path names it; exec is CRI ``ExecSync``.

1. The host's ``MemAvailable`` and ``Shmem`` (proc(5)) before anything starts.
2. N containers (CLI) or pods (CRI) created and started one after the
   other; the time of the first and of the Nth create+start.
3. After ``--settle`` seconds idle: the drop of ``MemAvailable`` and the
   growth of ``Shmem`` divided by N (the figure that cannot undercount:
   template RAM copied into /dev/shm belongs to nobody's PSS until QEMU
   touches it), and the PSS of every host process by role (QEMU, its
   capsa-vmm parent, virtiofsd, proxy, shim; through CRI: shim,
   capsa-vmm, QEMU, virtiofsd, containers), summed and divided by N.
4. The host CPU the N idle sandboxes burn: their processes' utime+stime
   over ``--cpu-window`` seconds, as % of one core per sandbox.
5. ``exec sleep 0`` in every container: each must answer.
6. All deleted (through CRI: every pod stopped and removed, and nothing of
   them left running); after ``--settle`` seconds, how far ``MemAvailable`` came
   back (as % of where it started).

Prints one Markdown table, writes the figures as JSON (``--json``) and, when
matplotlib is importable, a plot (``--plot``, PNG: memory per sandbox and
start time against N).  Absolute figures drift on a shared host: read the
ratios and the per-sandbox figures side by side.  Run as root after
scripts/setup.sh: /opt/capsa/venv/bin/python bench/density.py [--counts 1,10] [--paths cli,cri]
(the CRI path needs the dev extra's grpcio, containerd 1.6 and the CNI plugins).

Not measured here: further containers of one pod (each container after the
first), which is bench/pod_memory.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The e2e harness of the CRI path (tests/e2e: cri, e2e_engines, e2e_support), as bench/pod_memory.py uses it.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from lifecycle import become_subreaper, children, ensure_runc, make_bundle, memory_kib, reap_orphans

if TYPE_CHECKING:
    from cri.harness import ShimContainerd

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PATHS = ("cli", "cri")


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in KiB."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return fields


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            fields = stat[stat.rfind(b")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14, 15)
    return total


def descendants(pid: int) -> list[int]:
    found = [pid]
    for child in children(pid):
        found += descendants(child)
    return found


@dataclass
class Result:
    runtime: str
    n: int
    first_start_s: float = 0.0
    last_start_s: float = 0.0
    mem_available_drop_mib: float = 0.0  # per sandbox
    shmem_growth_mib: float = 0.0  # per sandbox
    pss_mib: dict[str, float] = field(default_factory=dict)  # per sandbox, by role
    cpu_percent: float = 0.0  # of one core, per sandbox
    exec_ok: int = 0
    returned_percent: float = 0.0  # MemAvailable after delete, % of before

    @property
    def pss_total(self) -> float:
        return sum(self.pss_mib.values())


def idle_figures(
    result: Result, before: dict[str, int], roles: dict[str, list[int]], n: int, cpu_window: float
) -> None:
    """Fill in ``result``'s figures of N idle sandboxes, per sandbox: the host's ``MemAvailable`` drop and
    ``Shmem`` growth since ``before`` (meminfo), the PSS of their host processes by role, their idle CPU."""
    after = meminfo()
    result.mem_available_drop_mib = (before["MemAvailable"] - after["MemAvailable"]) / 1024 / n
    result.shmem_growth_mib = (after["Shmem"] - before["Shmem"]) / 1024 / n
    def pss_kib(pid: int) -> int:
        try:
            return memory_kib(pid)[1]
        except OSError:  # gone since it was listed
            return 0

    for role, pids in roles.items():
        result.pss_mib[role] = sum(pss_kib(p) for p in pids) / 1024 / n
    everyone = [p for pids in roles.values() for p in pids]
    ticks = cpu_ticks(everyone)
    time.sleep(cpu_window)
    ticks = cpu_ticks(everyone) - ticks
    result.cpu_percent = 100 * ticks / CLOCK_TICKS / cpu_window / n


class Runner:
    def __init__(self, name: str, prefix: list[str], work: Path, bundle: Path) -> None:
        self.name = name
        self.prefix = prefix
        self.root = work / f"{name}-root"
        self.bundle = bundle
        self.log = work / f"{name}.log"

    def call(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.run(
                [*self.prefix, "--root", str(self.root), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.bundle,
                timeout=timeout,
            )

    def must(self, *args: str) -> None:
        proc = self.call(*args)
        if proc.returncode != 0:
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
            raise SystemExit(f"{self.name} {' '.join(args)} failed ({proc.returncode}): {tail}")

    def processes(self, cid: str, shim: int) -> dict[str, list[int]]:
        """The host processes of one container, by role."""
        if self.name == "runc":
            return {"container": [shim]}
        state = json.loads((self.root / cid / "state.json").read_text())
        qemu = state["hypervisor_pid"]
        parent = int(Path(f"/proc/{qemu}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        roles: dict[str, list[int]] = {"qemu": [qemu], "shim": [state["pid"]], "proxy": [state["proxy_pid"]]}
        if Path(f"/proc/{parent}/comm").read_text().strip() == "capsa-vmm":
            roles["capsa-vmm"] = [parent]
        roles["virtiofsd"] = [
            p
            for child in children(state["proxy_pid"])
            if Path(f"/proc/{child}/comm").read_text().strip() == "virtiofsd"
            for p in descendants(child)
        ]
        return roles

    def run(self, n: int, settle: float, cpu_window: float) -> Result:
        result = Result(self.name, n)
        before = meminfo()
        shims: dict[str, int] = {}
        try:
            for i in range(n):
                cid = f"d{i}"
                pid_file = self.root.parent / f"{self.name}-{cid}.pid"
                started = time.monotonic()
                self.must("create", "--bundle", str(self.bundle), "--pid-file", str(pid_file), cid)
                self.must("start", cid)
                elapsed = time.monotonic() - started
                if i == 0:
                    result.first_start_s = elapsed
                result.last_start_s = elapsed
                shims[cid] = int(pid_file.read_text())
            time.sleep(settle)
            roles: dict[str, list[int]] = {}
            for cid, shim in shims.items():
                for role, pids in self.processes(cid, shim).items():
                    roles.setdefault(role, []).extend(pids)
            idle_figures(result, before, roles, n, cpu_window)
            result.exec_ok = sum(self.call("exec", cid, "sleep", "0").returncode == 0 for cid in shims)
        finally:
            for cid in shims:
                self.call("delete", "--force", cid, timeout=120)
            reap_orphans()
        time.sleep(settle)
        result.returned_percent = 100 * meminfo()["MemAvailable"] / before["MemAvailable"]
        return result


class PodRunner:
    """N idle pods through CRI, one busybox container each, under one runtime handler."""

    def __init__(self, handler: str, containerd: ShimContainerd) -> None:
        self.handler = handler
        self.name = f"{handler} (CRI)"
        self.containerd = containerd

    def answers(self, container_id: str) -> bool:
        """CRI ``ExecSync`` of ``sleep 0`` in the container exits 0 (the harness raises
        AssertionError on a failed call)."""
        try:
            return int(self.containerd.exec_sync(container_id, ["sleep", "0"]).exit_code) == 0
        except AssertionError:
            return False

    def run(self, n: int, settle: float, cpu_window: float) -> Result:
        # Imported here: the CLI path needs neither grpcio (the dev extra's) nor the e2e harness.
        from cri import api_pb2 as cri
        from cri.harness import VMM_KEEPER
        from pod_memory import group_of, pod_processes

        k = self.containerd
        result = Result(self.name, n)
        before = meminfo()
        pods: list[str] = []
        containers: list[str] = []
        try:
            for i in range(n):
                config = k.pod_config(f"density-{self.handler}-{n}-{i}")
                started = time.monotonic()
                pods.append(k.run_pod(config, self.handler))
                cid = k.create_container(pods[-1], config, "sleep", ["sleep", "3600"])
                k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
                elapsed = time.monotonic() - started
                if i == 0:
                    result.first_start_s = elapsed
                result.last_start_s = elapsed
                containers.append(cid)
            time.sleep(settle)
            roles: dict[str, list[int]] = {}
            for proc in pod_processes(k):
                # QEMU's jail keeper is its own binary, which group_of would count with the containers.
                role = "capsa-vmm" if proc.name == VMM_KEEPER else group_of(proc)
                roles.setdefault(role, []).append(proc.pid)
            idle_figures(result, before, roles, n, cpu_window)
            result.exec_ok = sum(self.answers(cid) for cid in containers)
        except AssertionError as e:  # a CRI call failed: the harness's message names it
            raise SystemExit(f"{self.name} N={n}: {e}") from None
        finally:
            for pod_id in pods:
                # Every pod gets its stop and remove; what still fails, ShimContainerd.stop() retries.
                with contextlib.suppress(AssertionError):
                    k.remove_pod(pod_id)
            left = k.wait_nothing_left()
            reap_orphans()  # the shims exited: we are their subreaper
        if left:
            raise SystemExit(f"{self.name} N={n}: left behind after the pods:\n" + "\n".join(map(str, left)))
        time.sleep(settle)
        result.returned_percent = 100 * meminfo()["MemAvailable"] / before["MemAvailable"]
        return result


def start_containerd(work: Path) -> ShimContainerd:
    """The private CRI containerd of tests/e2e/cri (both handlers), with its busybox image."""
    from cri.harness import ShimContainerd, capsa_shim, cri_unready
    from e2e_engines import CONTAINERD_SOCKET, serving
    from e2e_support import make_rootfs, make_rootfs_tar

    shim = capsa_shim()
    if shim is None:
        raise SystemExit("containerd-shim-capsa-v2 is not installed (CAPSA_E2E_SHIM names another)")
    if reason := cri_unready():
        raise SystemExit(reason)
    # The harness runs containerd at its default socket and state; under a test run it would skip instead.
    if serving(CONTAINERD_SOCKET):
        raise SystemExit(f"another containerd already serves {CONTAINERD_SOCKET}: stop it to measure the CRI path")
    make_rootfs(work / "cri-rootfs")
    make_rootfs_tar(work / "cri-rootfs", work / "cri-busybox.tar")
    return ShimContainerd(work, work / "cri-busybox.tar", shim)


def table(results: list[Result]) -> str:
    lines = [
        "| runtime | N | MemAvailable drop / sandbox | Shmem growth / sandbox | PSS / sandbox (by role) "
        "| idle CPU / sandbox | first start | Nth start | exec answered | memory back |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        roles = ", ".join(f"{role} {mib:.1f}" for role, mib in sorted(r.pss_mib.items()))
        lines.append(
            f"| {r.runtime} | {r.n} | {r.mem_available_drop_mib:.1f} MiB | {r.shmem_growth_mib:.1f} MiB "
            f"| {r.pss_total:.1f} MiB ({roles}) | {r.cpu_percent:.2f} % | {r.first_start_s:.2f} s "
            f"| {r.last_start_s:.2f} s | {r.exec_ok}/{r.n} | {r.returned_percent:.1f} % |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        return False
    fig, (memory, start) = plt.subplots(1, 2, figsize=(11, 5))
    for index, runtime in enumerate(sorted({r.runtime for r in results})):
        rows = sorted((r for r in results if r.runtime == runtime), key=lambda r: r.n)
        ns = [r.n for r in rows]
        color = f"C{index}"  # one colour per runtime in both panels
        drop = [r.mem_available_drop_mib for r in rows]
        memory.plot(ns, drop, "o-", color=color, label=f"{runtime}: MemAvailable drop")
        memory.plot(ns, [r.pss_total for r in rows], "x--", color=color, label=f"{runtime}: PSS")
        start.plot(ns, [r.last_start_s for r in rows], "o-", color=color, label=runtime)
    memory.set(xlabel="idle containers (N)", ylabel="MiB per container", title="Host memory per container")
    start.set(xlabel="idle containers (N)", ylabel="seconds", title="Start time of the Nth container")
    for axis in (memory, start):
        axis.set_xscale("log")
        axis.grid(True, alpha=0.3)
    memory.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    start.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,10,50,100", help="comma-separated N")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds idle before measuring")
    parser.add_argument("--cpu-window", type=float, default=30.0, help="seconds of idle CPU measured")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: cli (runc CLI), cri (CRI pods)")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="measure nothing: print the table (and --plot) of figures earlier runs wrote with --json",
    )
    args = parser.parse_args()
    if args.from_json:
        results = [Result(**row) for path in args.from_json for row in json.loads(path.read_text())]
        results.sort(key=lambda r: (r.runtime, r.n))
        print(table(results))
        if args.plot and not plot(results, args.plot):
            print("no plot: matplotlib is not installed (pip install '.[bench]')", file=sys.stderr)
        return 0
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown path(s) {', '.join(sorted(unknown))}: choose from {', '.join(PATHS)}")
    if os.geteuid() != 0:
        raise SystemExit("run as root (QEMU, virtiofsd, runc)")
    counts = [int(n) for n in args.counts.split(",")]
    runc_path = ensure_runc()
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="capsa-density-", dir="/tmp"))
    runners: list[Runner | PodRunner] = []
    results: list[Result] = []
    containerd: ShimContainerd | None = None
    try:
        if "cli" in paths:
            bundle = make_bundle(work)
            runners += [
                Runner("capsa", [sys.executable, "-m", "capsa"], work, bundle),
                Runner("runc", [runc_path], work, bundle),
            ]
        if "cri" in paths:
            try:
                containerd = start_containerd(work)
            except AssertionError as e:  # the harness's way of saying containerd did not come up
                raise SystemExit(f"containerd: {e}") from None
            runners += [PodRunner("capsa", containerd), PodRunner("runc", containerd)]
        for n in counts:
            for runner in runners:
                result = runner.run(n, args.settle, args.cpu_window)
                results.append(result)
                print(f"{runner.name} N={n}: {result.mem_available_drop_mib:.1f} MiB/sandbox", file=sys.stderr)
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
        if args.plot and not plot(results, args.plot):
            print("no plot: matplotlib is not installed (pip install '.[bench]')", file=sys.stderr)
    finally:
        if containerd is not None:
            containerd.stop()
        reap_orphans()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
