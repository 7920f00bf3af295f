#!/usr/bin/env python3
"""Cold `capsa run ... true` against bare QEMU booting the same guest, side by side.

Each round runs, back to back on the same machine:

- the floor: bare QEMU (no devices beyond what the boot needs) with the same
  kernel, initrd and accelerator, told to run an init that does not exist, so
  the kernel boots, unpacks the initrd, fails to find init and panics; with
  ``panic=-1`` and ``-no-reboot`` QEMU then exits.  That is "booting the
  kernel and image to its init" and nothing else.
- capsa: ``capsa run`` of a busybox bundle running ``true``, a fresh VM
  each time, with ``CAPSA_TIMINGS`` set so capsa reports where the time went.

It prints the medians, their ratio, and the median split of capsa's time:
Python start, accelerator and rootfs share, QEMU start, kernel boot (the
guest's uptime when /init started), agent start, container create and
start, the container's run, and teardown.  Run it as root after
scripts/setup.sh:  python3 bench/boot.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capsa.config import load_config
from capsa.hypervisor.accel import resolve_accelerator
from capsa.runtime.sandbox import FAST_BOOT_PARAMS


def make_bundle(root: Path) -> Path:
    bundle = root / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    os.symlink("busybox", bundle / "rootfs" / "bin" / "true")
    subprocess.run(["capsa", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["true"]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def floor_argv(accel: str) -> list[str]:
    config = load_config()
    hv = config.hypervisor
    cpu = "host" if accel == "kvm" else "max"
    cmdline = ["panic=-1", "quiet", "random.trust_cpu=on", *FAST_BOOT_PARAMS, "rdinit=/capsa-bench-no-init"]
    argv = [
        str(hv.path),
        "-machine",
        f"{hv.machine_type},accel={accel}",
        "-cpu",
        cpu,
        "-m",
        str(hv.default_memory_mib),
        "-smp",
        str(hv.default_vcpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(hv.kernel),
        "-append",
        " ".join(cmdline),
    ]
    if hv.image is None and hv.initrd is not None:
        argv += ["-initrd", str(hv.initrd)]
    return argv


def time_floor(accel: str) -> float:
    start = time.monotonic()
    subprocess.run(
        floor_argv(accel),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=120,
    )
    return time.monotonic() - start


def time_capsa(bundle: Path, root: Path, n: int) -> tuple[float, dict[str, float]]:
    timings_file = root / "timings.json"
    env = dict(os.environ, CAPSA_TIMINGS=str(timings_file))
    start = time.monotonic()
    proc = subprocess.run(
        ["capsa", "--root", str(root / "state"), "run", "--bundle", str(bundle), f"bench-{n}"],
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
        timeout=300,
    )
    total = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"capsa run failed with status {proc.returncode}")
    marks = json.loads(timings_file.read_text())
    return total, phases(start, total, marks)


def phases(start: float, total: float, t: dict[str, float]) -> dict[str, float]:
    """Durations of each phase, from the timestamps `capsa run` recorded."""
    boot = t["agent_ready"] - t["rootfs_shared"]
    kernel = t.get("guest_kernel_boot_s", 0.0)
    agent = t.get("guest_agent_start_s", 0.0)
    return {
        "python start + imports": t["invoked"] - start,
        "accelerator + rootfs share": t["rootfs_shared"] - t["invoked"],
        "QEMU start (to QMP)": t["hypervisor_started"] - t["rootfs_shared"],
        "kernel boot (guest uptime at /init)": kernel,
        "agent start (guest, /init to serving)": agent,
        "boot remainder (firmware, channel)": max(
            0.0, boot - (t["hypervisor_started"] - t["rootfs_shared"]) - kernel - agent
        ),
        "container create": t["container_created"] - t["agent_ready"],
        "container start": t["container_started"] - t["container_created"],
        "container run to exit": t["container_exited"] - t["container_started"],
        "teardown": t["sandbox_stopped"] - t["container_exited"],
        "process exit": total - (t["sandbox_stopped"] - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    accel = resolve_accelerator(load_config()).accelerator
    floors: list[float] = []
    runs: list[float] = []
    splits: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="capsa-bench-") as tmp:
        root = Path(tmp)
        bundle = make_bundle(root)
        time_floor(accel)  # warm the page cache for both sides
        for n in range(args.rounds):
            floors.append(time_floor(accel))
            total, split = time_capsa(bundle, root, n)
            runs.append(total)
            splits.append(split)
    floor = statistics.median(floors)
    capsa = statistics.median(runs)
    print(f"accelerator: {accel}, rounds: {args.rounds}")
    print(f"bare QEMU boot to init (floor): median {floor:.3f} s  (min {min(floors):.3f}, max {max(floors):.3f})")
    print(f"capsa run true (cold VM):       median {capsa:.3f} s  (min {min(runs):.3f}, max {max(runs):.3f})")
    print(f"ratio capsa / floor:            {capsa / floor:.2f}")
    print("where capsa's time goes (medians):")
    for name in splits[0]:
        print(f"  {name:40} {statistics.median(s[name] for s in splits):.3f} s")


if __name__ == "__main__":
    main()
