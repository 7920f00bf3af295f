#!/usr/bin/env python3
"""Density: what N idle containers cost the host, capsa against runc, counted two ways.

For each N (``--counts``, default 1,10,50,100), for capsa and then runc,
back to back on the same host and the same busybox bundle (``sleep``):

1. The host's ``MemAvailable`` and ``Shmem`` (proc(5)) before anything starts.
2. N containers created and started through the runc CLI, one after the
   other; the time of the first and of the Nth create+start.
3. After ``--settle`` seconds idle: the drop of ``MemAvailable`` and the
   growth of ``Shmem`` divided by N (the figure that cannot undercount:
   template RAM copied into /dev/shm belongs to nobody's PSS until QEMU
   touches it), and the PSS of every host process by role (QEMU, its
   capsa-vmm parent, virtiofsd, proxy, shim), summed and divided by N.
4. The host CPU the N idle sandboxes burn: their processes' utime+stime
   over ``--cpu-window`` seconds, as % of one core per sandbox.
5. ``exec sleep 0`` in every container: each must answer.
6. All deleted; after ``--settle`` seconds, how far ``MemAvailable`` came
   back (as % of where it started).

Prints one Markdown table, writes the figures as JSON (``--json``) and, when
matplotlib is importable, a plot (``--plot``, PNG: memory per sandbox and
start time against N).  Absolute figures drift on a shared host: read the
ratios and the per-sandbox figures side by side.  Run as root after
scripts/setup.sh: /opt/capsa/venv/bin/python bench/density.py [--counts 1,10]

Not measured here yet: containers of one CRI pod (each further container
after the first), which needs a CRI containerd (tests/e2e/cri).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lifecycle import become_subreaper, children, ensure_runc, make_bundle, memory_kib, reap_orphans

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
            after = meminfo()
            result.mem_available_drop_mib = (before["MemAvailable"] - after["MemAvailable"]) / 1024 / n
            result.shmem_growth_mib = (after["Shmem"] - before["Shmem"]) / 1024 / n
            roles: dict[str, list[int]] = {}
            for cid, shim in shims.items():
                for role, pids in self.processes(cid, shim).items():
                    roles.setdefault(role, []).extend(pids)
            for role, pids in roles.items():
                result.pss_mib[role] = sum(memory_kib(p)[1] for p in pids) / 1024 / n
            everyone = [p for pids in roles.values() for p in pids]
            ticks = cpu_ticks(everyone)
            time.sleep(cpu_window)
            ticks = cpu_ticks(everyone) - ticks
            result.cpu_percent = 100 * ticks / CLOCK_TICKS / cpu_window / n
            result.exec_ok = sum(self.call("exec", cid, "sleep", "0").returncode == 0 for cid in shims)
        finally:
            for cid in shims:
                self.call("delete", "--force", cid, timeout=120)
            reap_orphans()
        time.sleep(settle)
        result.returned_percent = 100 * meminfo()["MemAvailable"] / before["MemAvailable"]
        return result


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
    fig, (memory, start) = plt.subplots(1, 2, figsize=(11, 4))
    for runtime in sorted({r.runtime for r in results}):
        rows = [r for r in results if r.runtime == runtime]
        ns = [r.n for r in rows]
        memory.plot(ns, [r.mem_available_drop_mib for r in rows], marker="o", label=f"{runtime} MemAvailable drop")
        memory.plot(ns, [r.pss_total for r in rows], marker="x", linestyle="--", label=f"{runtime} PSS")
        start.plot(ns, [r.last_start_s for r in rows], marker="o", label=f"{runtime} Nth create+start")
    memory.set(xlabel="idle containers (N)", ylabel="MiB per container", title="Host memory per container")
    start.set(xlabel="idle containers (N)", ylabel="seconds", title="Start time of the Nth container")
    for axis in (memory, start):
        axis.set_xscale("log")
        axis.legend(fontsize=7)
        axis.grid(True, alpha=0.3)
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
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (QEMU, virtiofsd, runc)")
    counts = [int(n) for n in args.counts.split(",")]
    runc_path = ensure_runc()
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="capsa-density-", dir="/tmp"))
    bundle = make_bundle(work)
    runners = [
        Runner("capsa", [sys.executable, "-m", "capsa"], work, bundle),
        Runner("runc", [runc_path], work, bundle),
    ]
    results: list[Result] = []
    try:
        for n in counts:
            for runner in runners:
                result = runner.run(n, args.settle, args.cpu_window)
                results.append(result)
                print(f"{runner.name} N={n}: {result.mem_available_drop_mib:.1f} MiB/sandbox", file=sys.stderr)
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
        if args.plot and not plot(results, args.plot):
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    finally:
        reap_orphans()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
