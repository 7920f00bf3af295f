#!/usr/bin/env python3
"""The runc lifecycle, capsa against runc: time of `create`, `start`, `delete`, and host memory.

Each round, back to back on the same machine and the same busybox bundle
(a container running ``sleep``, no terminal, stdio /dev/null):

- capsa: ``capsa create --pid-file``, ``capsa start``, then (idle, after
  ``--settle`` seconds) the memory of the host processes that stand for the
  container: QEMU, the two virtiofsd (rootfs and bind-volume shares, each with
  the sandboxed worker it forks), capsa-proxy
  and capsa-shim, each read from ``/proc/PID/smaps_rollup`` (RSS, and PSS,
  which divides shared pages among the processes that map them); then
  ``capsa kill ID KILL``, wait for the shim to exit, and ``capsa delete``.
- runc (Debian's): the same commands; its host-side memory is the
  container's own process, since runc leaves nothing else running.

Each command is timed from exec to exit, as an engine sees it (capsa's
include starting Python, about 0.2 s). `delete` is timed on a stopped
container, the common case after an engine's stop. The benchmark is a child
subreaper, as conmon is, so it can wait for the shim (and runc's container
process) after `create` exits.

A third runtime runs alongside: capsa with its host-side confinement off
(``[security] unprivileged_vmm = false, jail = false, cgroup_limits =
false``), so the cost of confinement (a jail set up in every QEMU's fork,
the ``capsa-vmm`` parent it leaves) is a ratio from the same rounds.

Prints the medians of N rounds and the ratios capsa/runc and
confined/unconfined. Run as root after scripts/setup.sh, with capsa's
Python: /opt/capsa/venv/bin/python bench/lifecycle.py [--rounds N] [--settle S]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from capsa.cli.spec import default_spec
from capsa.config import load_config

PR_SET_CHILD_SUBREAPER = 36
CAPSA_PARTS = ("qemu", "capsa-vmm", "virtiofsd", "virtiofsd volumes", "proxy", "shim")
UNCONFINED = "[security]\nunprivileged_vmm = false\njail = false\ncgroup_limits = false\n"
# The bind-volume share's daemon: a child of the proxy, not in state.json.
VOLUME_SOCKET = b"vol.sock"


def make_bundle(work: Path) -> Path:
    bundle = work / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    os.symlink("busybox", rootfs / "bin" / "sleep")
    for name in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / name).mkdir()
    (bundle / "config.json").write_text(json.dumps(default_spec(["sleep", "3600"], terminal=False)))
    return bundle


def ensure_runc() -> str:
    runc = shutil.which("runc")
    if runc is None:
        print("runc is missing: installing Debian's (apt-get install runc)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "runc"], check=True, stdout=subprocess.DEVNULL)
        runc = shutil.which("runc")
    if runc is None:
        raise SystemExit("runc is not on PATH after apt-get install runc")
    return runc


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def wait_for(pid: int, timeout: float = 60) -> None:
    """Reap ``pid`` (our child, or an orphan we adopted as subreaper)."""
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG)[0] != pid:
        if time.monotonic() > deadline:
            raise SystemExit(f"process {pid} did not exit within {timeout:.0f} s")
        time.sleep(0.01)


def reap_orphans() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def memory_kib(pid: int, with_children: bool = False) -> tuple[int, int]:
    """(RSS, PSS) in KiB from smaps_rollup, of the process and optionally its descendants."""
    rss = pss = 0
    pids = [pid]
    while with_children and pids:
        more = [c for p in pids for c in children(p) if c not in pids]
        if not more:
            break
        pids += more
    for p in pids:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Rss":
                rss += int(value.split()[0])
            elif key == "Pss":
                pss += int(value.split()[0])
    return rss, pss


def volume_virtiofsd_kib(proxy_pid: int) -> tuple[int, int]:
    """(RSS, PSS) of the proxy's bind-volume virtiofsd and its worker; (0, 0) with 9p."""
    for pid in children(proxy_pid):
        with contextlib.suppress(OSError):
            if VOLUME_SOCKET in Path(f"/proc/{pid}/cmdline").read_bytes():
                return memory_kib(pid, with_children=True)
    return 0, 0


@dataclass
class Runtime:
    name: str
    prefix: list[str]
    root: Path
    bundle: Path
    log: Path
    times: dict[str, list[float]] = field(default_factory=lambda: {"create": [], "start": [], "delete": []})
    memory: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def call(self, *args: str) -> float:
        # stdio are files: the container (and capsa's shim) inherit them and outlive the command.
        started = time.monotonic()
        with open(self.log, "ab") as log:
            proc = subprocess.run(
                [*self.prefix, "--root", str(self.root), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.bundle,
            )
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemExit(f"{self.name} {' '.join(args)} failed ({proc.returncode}): {' | '.join(tail)}")
        return elapsed

    def round(self, cid: str, settle: float) -> None:
        pid_file = self.root.parent / f"{self.name}-{cid}.pid"
        self.times["create"].append(self.call("create", "--bundle", str(self.bundle), "--pid-file", str(pid_file), cid))
        pid = int(pid_file.read_text())
        self.times["start"].append(self.call("start", cid))
        time.sleep(settle)
        for part, figures in self.measure(cid, pid).items():
            self.memory.setdefault(part, []).append(figures)
        self.call("kill", cid, "KILL")
        wait_for(pid)
        self.times["delete"].append(self.call("delete", cid))
        reap_orphans()

    def measure(self, cid: str, pid: int) -> dict[str, tuple[int, int]]:
        if self.name == "runc":
            return {"container process": memory_kib(pid)}
        state = json.loads((self.root / cid / "state.json").read_text())
        qemu = state["hypervisor_pid"]
        parent = int(Path(f"/proc/{qemu}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        jailed = Path(f"/proc/{parent}/comm").read_text().strip() == "capsa-vmm"
        return {
            "qemu": memory_kib(qemu),
            "capsa-vmm": memory_kib(parent) if jailed else (0, 0),
            "virtiofsd": memory_kib(state["virtiofsd_pid"], with_children=True),
            "virtiofsd volumes": volume_virtiofsd_kib(state["proxy_pid"]),
            "proxy": memory_kib(state["proxy_pid"]),
            "shim": memory_kib(state["pid"]),
        }

    def cleanup(self, cid: str) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                [*self.prefix, "--root", str(self.root), "delete", "--force", cid],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )

    def last_round(self) -> str:
        create, start, delete = (self.times[verb][-1] for verb in ("create", "start", "delete"))
        return f"{self.name} {create:.3f} / {start:.3f} / {delete:.3f} s, {self.total()[-1] / 1024:.1f} MiB"

    def total(self) -> list[int]:
        """Per round, the PSS of all parts (what this container costs the host)."""
        rounds = len(next(iter(self.memory.values())))
        return [sum(figures[i][1] for figures in self.memory.values()) for i in range(rounds)]


def median_mib(values: list[int]) -> float:
    return statistics.median(values) / 1024


def confinement_report(confined: Runtime, unconfined: Runtime) -> None:
    print("\nConfinement on (the default) and off, side by side:\n")
    print("| | confined | unconfined | confined/unconfined |")
    print("|---|---|---|---|")
    for verb in ("create", "start", "delete"):
        c, u = statistics.median(confined.times[verb]), statistics.median(unconfined.times[verb])
        print(f"| `{verb}` | {c:.3f} s | {u:.3f} s | {c / u:.3f} |")
    c, u = median_mib(confined.total()), median_mib(unconfined.total())
    print(f"| idle PSS | {c:.1f} MiB | {u:.1f} MiB | {c / u:.3f} |")


def report(capsa: Runtime, runc: Runtime, rounds: int) -> None:
    config = load_config()
    hv = config.hypervisor
    print(
        f"\n{rounds} rounds, medians; guest {hv.default_memory_mib} MiB / {hv.default_vcpus} vCPU, "
        f"boot = {hv.boot}, shared fs {config.shared_fs.kind}\n"
    )
    print("| command | capsa | runc | capsa/runc |")
    print("|---|---|---|---|")
    for verb in ("create", "start", "delete"):
        c, r = statistics.median(capsa.times[verb]), statistics.median(runc.times[verb])
        print(f"| `{verb}` | {c:.3f} s | {r:.3f} s | {c / r:.0f} |")
    print("\nHost memory of one idle container (`sleep`), MiB:\n")
    print("| process | RSS | PSS |")
    print("|---|---|---|")
    for part in CAPSA_PARTS:
        rss, pss = median_mib([f[0] for f in capsa.memory[part]]), median_mib([f[1] for f in capsa.memory[part]])
        print(f"| capsa: {part} | {rss:.1f} | {pss:.1f} |")
    capsa_total = median_mib(capsa.total())
    runc_figures = runc.memory["container process"]
    runc_total = median_mib(runc.total())
    print(f"| **capsa total** | | **{capsa_total:.1f}** |")
    print(f"| runc: the container's process | {median_mib([f[0] for f in runc_figures]):.1f} | {runc_total:.1f} |")
    print(f"\ncapsa/runc host memory (PSS): {capsa_total / runc_total:.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring memory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (QEMU, virtiofsd, runc)")
    runc_path = ensure_runc()
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="capsa-bl-", dir="/tmp"))
    bundle = make_bundle(work)
    capsa = Runtime("capsa", [sys.executable, "-m", "capsa"], work / "capsa", bundle, work / "capsa.log")
    (work / "unconfined.toml").write_text(UNCONFINED)
    unconfined = Runtime(
        "capsa-unconfined",
        [sys.executable, "-m", "capsa", "--config", str(work / "unconfined.toml")],
        work / "capsa-unconfined",
        bundle,
        work / "capsa-unconfined.log",
    )
    runc = Runtime("runc", [runc_path], work / "runc", bundle, work / "runc.log")
    try:
        for n in range(args.rounds):
            for runtime in (capsa, unconfined, runc):
                cid = f"bench{n}"
                try:
                    runtime.round(cid, args.settle)
                finally:
                    runtime.cleanup(cid)
            rounds = "; ".join(runtime.last_round() for runtime in (capsa, unconfined, runc))
            print(f"round {n + 1}: {rounds}", file=sys.stderr)
        report(capsa, runc, args.rounds)
        confinement_report(capsa, unconfined)
    finally:
        reap_orphans()
        left = [pid for pid in filter(str.isdigit, os.listdir("/proc")) if str(work).encode() in _cmdline(pid)]
        shutil.rmtree(work, ignore_errors=True)
    if left:
        raise SystemExit(f"processes outlived their containers: {', '.join(left)}")
    return 0


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
