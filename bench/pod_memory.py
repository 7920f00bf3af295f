#!/usr/bin/env python3
"""Pods through CRI: host memory of a pod of 1, 2 and 4 idle containers, and the time
to start the pod and each further container, capsa's handler against runc's.

A private containerd 1.6 with its CRI plugin (the harness of tests/e2e/test_cri.py:
``tests/e2e/cri/harness.py``, a CNI bridge of its own, a local pause image) runs,
for each handler and each pod size N, one pod: ``RunPodSandbox`` (timed), then N
busybox containers running ``sleep`` (``CreateContainer`` + ``StartContainer``
timed per container), ``--settle`` seconds idle, then the memory of every host
process that containerd started for the pod, read from ``/proc/PID/smaps_rollup``
(RSS, and PSS, which divides shared pages among the processes mapping them, so
PSS adds up), grouped as shim, QEMU, virtiofsd (with its sandboxed worker) and
the rest (under runc: the pause and container processes themselves). Then
``StopPodSandbox`` + ``RemovePodSandbox``.

Under capsa one ``containerd-shim-capsa-v2`` holds the pod's one VM and every
container runs in it; under runc one ``containerd-shim-runc-v2`` per pod runs
each container as host processes.

Run as root after scripts/setup.sh, with capsa's Python:
/opt/capsa/venv/bin/python bench/pod_memory.py [--rounds N] [--settle S] [--sizes 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from cri import api_pb2 as cri
from cri.harness import ShimContainerd, capsa_shim
from e2e_support import Proc, make_rootfs, make_rootfs_tar, processes

from capsa.config import load_config

GROUPS = ("shim", "qemu", "virtiofsd", "containers")


def group_of(proc: Proc) -> str:
    argv0 = proc.cmdline.split(" ", 1)[0]
    if "containerd-shim" in argv0 or "capsa.shim.v2" in proc.cmdline:
        return "shim"
    if "qemu-system" in argv0:
        return "qemu"
    if "virtiofsd" in argv0:
        return "virtiofsd"
    return "containers"


def smaps_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB of one process; (0, 0) if it is gone or a kernel thread."""
    rss = pss = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Rss":
            rss = int(value.split()[0])
        elif key == "Pss":
            pss = int(value.split()[0])
    return rss, pss


def pod_processes(k: ShimContainerd) -> list[Proc]:
    """The shims containerd started and everything below them (QEMU, virtiofsd,
    and under runc the pause and container processes, which carry neither the
    session marker nor a path of the test)."""
    every = {p.pid: p for p in processes(k.session)}
    chosen = {p.pid for p in k.shims()}
    grew = True
    while grew:
        more = {p.pid for p in every.values() if p.ppid in chosen} - chosen
        chosen |= more
        grew = bool(more)
    return [every[pid] for pid in sorted(chosen) if pid in every]


@dataclass
class Figures:
    """One handler's measurements, by pod size."""

    pod_start: dict[int, list[float]] = field(default_factory=dict)
    container_start: dict[int, list[list[float]]] = field(default_factory=dict)
    memory: dict[int, list[dict[str, tuple[int, int]]]] = field(default_factory=dict)


def one_pod(k: ShimContainerd, handler: str, size: int, settle: float, figures: Figures, tag: str) -> None:
    config = k.pod_config(f"bench-{handler}-{size}-{tag}")
    t0 = time.monotonic()
    pod_id = k.run_pod(config, handler)
    try:
        figures.pod_start.setdefault(size, []).append(time.monotonic() - t0)
        starts = []
        for i in range(size):
            t0 = time.monotonic()
            cid = k.create_container(pod_id, config, f"c{i}", ["sleep", "3600"])
            k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
            starts.append(time.monotonic() - t0)
        figures.container_start.setdefault(size, []).append(starts)
        time.sleep(settle)
        memory = dict.fromkeys(GROUPS, (0, 0))
        for proc in pod_processes(k):
            rss, pss = smaps_kib(proc.pid)
            group = group_of(proc)
            memory[group] = (memory[group][0] + rss, memory[group][1] + pss)
        figures.memory.setdefault(size, []).append(memory)
    finally:
        k.remove_pod(pod_id)
    left = k.wait_nothing_left()
    if left:
        raise SystemExit("left behind after the pod:\n" + "\n".join(str(p) for p in left))


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def report(results: dict[str, Figures], sizes: list[int], rounds: int) -> None:
    config = load_config()
    hv = config.hypervisor
    print(
        f"\n{rounds} round(s), medians; guest {hv.default_memory_mib} MiB / {hv.default_vcpus} vCPU, "
        f"boot = {hv.boot}, shared fs {config.shared_fs.kind}\n"
    )
    print("Time (CRI calls as the kubelet makes them), median (min):\n")
    print("| handler | pod size | RunPodSandbox | container 1 | further containers (each) |")
    print("|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} s ({min(values):.3f})" if values else "-"

    for handler, fig in results.items():
        for size in sizes:
            first = [s[0] for s in fig.container_start[size]]
            rest = [x for s in fig.container_start[size] for x in s[1:]]
            print(f"| {handler} | {size} | {cell(fig.pod_start[size])} | {cell(first)} | {cell(rest)} |")
    print("\nHost memory of the idle pod, MiB (RSS / PSS):\n")
    print("| handler | pod size | " + " | ".join(GROUPS) + " | total PSS | PSS per container |")
    print("|---|---|" + "---|" * len(GROUPS) + "---|---|")
    for handler, fig in results.items():
        for size in sizes:
            cells = []
            for group in GROUPS:
                rss = statistics.median(m[group][0] for m in fig.memory[size])
                pss = statistics.median(m[group][1] for m in fig.memory[size])
                cells.append(f"{mib(rss)} / {mib(pss)}")
            total = statistics.median(sum(m[g][1] for g in GROUPS) for m in fig.memory[size])
            print(f"| {handler} | {size} | " + " | ".join(cells) + f" | **{mib(total)}** | {mib(total / size)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring memory")
    parser.add_argument("--sizes", default="1,2,4", help="pod sizes (containers per pod), comma-separated")
    parser.add_argument("--handlers", default="capsa,runc", help="CRI runtime handlers, comma-separated")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (containerd, QEMU, virtiofsd)")
    sizes = [int(s) for s in args.sizes.split(",")]
    handlers = args.handlers.split(",")
    shim = capsa_shim()
    if "capsa" in handlers and shim is None:
        raise SystemExit("containerd-shim-capsa-v2 is not installed (CAPSA_E2E_SHIM names another)")
    work = Path(tempfile.mkdtemp(prefix="capsa-pm-", dir="/tmp"))
    results = {h: Figures() for h in handlers}
    k = None
    try:
        make_rootfs(work / "rootfs")
        make_rootfs_tar(work / "rootfs", work / "busybox.tar")
        k = ShimContainerd(work, work / "busybox.tar", shim)
        for n in range(args.rounds):
            for size in sizes:
                for handler in handlers:
                    one_pod(k, handler, size, args.settle, results[handler], str(n))
                    fig = results[handler]
                    total = sum(v[1] for v in fig.memory[size][-1].values())
                    print(
                        f"round {n + 1}, {handler}, {size} container(s): pod {fig.pod_start[size][-1]:.2f} s, "
                        f"containers {', '.join(f'{s:.2f}' for s in fig.container_start[size][-1])} s, "
                        f"PSS {mib(total)} MiB",
                        file=sys.stderr,
                    )
        report(results, sizes, args.rounds)
    finally:
        if k is not None:
            k.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
