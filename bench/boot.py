#!/usr/bin/env python3
"""`capsa run ... true` (cold and from a VM template) against bare QEMU booting the same guest.

Each round runs, back to back on the same machine:

- the floor: bare QEMU (no devices beyond what the boot needs) with the same
  kernel, guest image and accelerator, told to run an init that does not
  exist, so the kernel boots, mounts the root image (virtio-pmem; or unpacks
  the initrd when ``image = ""``), fails to find init and panics; with
  ``panic=-1`` and ``-no-reboot`` QEMU then exits.  That is "booting the
  kernel and image to its init" and nothing else.
- capsa cold: ``capsa run`` of a busybox bundle running ``true``, a fresh
  VM each time, with ``CAPSA_TIMINGS`` set so capsa reports where the time went.
- capsa template: the same with ``[hypervisor] boot = "template"`` (the
  configuration in effect plus that key), restoring a saved VM each time;
  the template is made once before the rounds, in a private cache
  directory, and that one-time cost is printed too.

It prints the medians, their ratios to the floor, and the median split of
capsa's time for each mode.  Run it as root after scripts/setup.sh:
python3 bench/boot.py [--rounds N] [--boot cold|template|both]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capsa.config import cache_dir, load_config, resolve_config_path
from capsa.hypervisor.accel import resolve_accelerator
from capsa.hypervisor.qemu import pmem_root_args
from capsa.runtime.sandbox import FAST_BOOT_PARAMS, ROOT_IMAGE_PARAMS


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
    cmdline = ["panic=-1", "quiet", "random.trust_cpu=on", *FAST_BOOT_PARAMS]
    image_bytes = hv.image.stat().st_size if hv.image is not None else 0
    if hv.image is not None:
        # The root image on virtio-pmem, as capsa maps it: the kernel mounts it, finds no init, panics.
        cmdline += [*ROOT_IMAGE_PARAMS, "init=/capsa-bench-no-init"]
    else:
        cmdline.append("rdinit=/capsa-bench-no-init")
    memory = str(hv.default_memory_mib)
    if hv.image is not None:
        memory += f",slots=1,maxmem={hv.default_memory_mib + (image_bytes >> 20)}M"
    argv = [
        str(hv.path),
        "-machine",
        f"{hv.machine_type},accel={accel}",
        "-cpu",
        cpu,
        "-m",
        memory,
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
    if hv.image is not None:
        argv += pmem_root_args(hv.image, image_bytes, hv.machine_type)
    elif hv.initrd is not None:
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


def config_with_boot(root: Path, boot: str) -> Path:
    """The configuration in effect, with ``[hypervisor] boot`` set to ``boot``."""
    return config_with_hypervisor(root, boot, {"boot": boot})


def config_with_hypervisor(root: Path, name: str, settings: dict[str, str]) -> Path:
    """The configuration in effect with the given ``[hypervisor]`` keys set (string values), as ``root/name.toml``."""
    path, _ = resolve_config_path(None)
    text = path.read_text() if path.exists() else ""
    keys = "|".join(re.escape(key) for key in settings)
    text = re.sub(rf"(?m)^({keys})\s*=.*$", "", text)
    lines = "\n".join(f'{key} = "{value}"' for key, value in settings.items())
    if re.search(r"(?m)^\[hypervisor\]", text):
        text = re.sub(r"(?m)^\[hypervisor\]\s*$", f"[hypervisor]\n{lines}", text, count=1)
    else:
        text += f"\n[hypervisor]\n{lines}\n"
    out = root / f"{name}.toml"
    out.write_text(text)
    return out


def time_capsa(bundle: Path, root: Path, n: int, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    timings_file = root / "timings.json"
    env = dict(env, CAPSA_TIMINGS=str(timings_file))
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
    if "template_failed" in marks:
        sys.exit("capsa run booted cold although boot = template (run it with --debug to see why)")
    split = template_phases(start, total, marks) if "template_restored" in marks else phases(start, total, marks)
    return total, split


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
        "container create (+ CreateSandbox)": t["container_created"] - t["agent_ready"],
        "container start": t["container_started"] - t["container_created"],
        "container run to exit": t["container_exited"] - t["container_started"],
        "teardown": t["sandbox_stopped"] - t["container_exited"],
        "process exit": total - (t["sandbox_stopped"] - start),
    }


def template_phases(start: float, total: float, t: dict[str, float]) -> dict[str, float]:
    """The same for a sandbox restored from a template (no kernel boot, no agent start)."""
    return {
        "python start + imports": t["invoked"] - start,
        "accelerator + template lookup": t["template_ready"] - t["invoked"],
        "rootfs share (virtiofsd)": t["rootfs_shared"] - t["template_ready"],
        "copy template RAM file (tmpfs)": t["template_memory_copied"] - t["rootfs_shared"],
        "QEMU start (to QMP)": t["hypervisor_started"] - t["template_memory_copied"],
        "restore device state + cont": t["template_restored"] - t["hypervisor_started"],
        "hot-plug virtio-fs + agent Check": t["agent_ready"] - t["template_restored"],
        "CreateSandbox (reseed, clock, fs probe)": t["sandbox_created"] - t["agent_ready"],
        "container create": t["container_created"] - t["sandbox_created"],
        "container start": t["container_started"] - t["container_created"],
        "container run to exit": t["container_exited"] - t["container_started"],
        "teardown": t["sandbox_stopped"] - t["container_exited"],
        "process exit": total - (t["sandbox_stopped"] - start),
    }


def report(label: str, runs: list[float], splits: list[dict[str, float]], floor: float) -> None:
    capsa = statistics.median(runs)
    spread = f"(min {min(runs):.3f}, max {max(runs):.3f})"
    print(f"capsa run true ({label}):{' ' * (15 - len(label))}median {capsa:.3f} s  {spread}")
    print(f"  ratio to the floor: {capsa / floor:.2f}")
    print(f"  where the time goes ({label}, medians):")
    for name in splits[0]:
        print(f"    {name:42} {statistics.median(s[name] for s in splits):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--boot", choices=("cold", "template", "both"), default="both")
    args = parser.parse_args()
    accel = resolve_accelerator(load_config()).accelerator
    modes = ["cold", "template"] if args.boot == "both" else [args.boot]
    floors: list[float] = []
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    splits: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="capsa-bench-") as tmp:
        root = Path(tmp)
        bundle = make_bundle(root)
        envs = {"cold": dict(os.environ, CAPSA_CONFIG=str(config_with_boot(root, "cold")))}
        if "template" in modes:
            cache = root / "cache"
            cache.mkdir()
            if (cache_dir() / "accel.json").exists():
                shutil.copy(cache_dir() / "accel.json", cache / "accel.json")
            envs["template"] = dict(
                os.environ, CAPSA_CONFIG=str(config_with_boot(root, "template")), CAPSA_CACHE_DIR=str(cache)
            )
            made, _ = time_capsa(bundle, root, 0, envs["template"])  # makes the template
            print(f"first template run (makes the template, then restores it): {made:.3f} s")
        time_floor(accel)  # warm the page cache for both sides
        for n in range(args.rounds):
            floors.append(time_floor(accel))
            for mode in modes:
                total, split = time_capsa(bundle, root, n, envs[mode])
                runs[mode].append(total)
                splits[mode].append(split)
    floor = statistics.median(floors)
    print(f"accelerator: {accel}, rounds: {args.rounds}")
    print(f"bare QEMU boot to init (floor): median {floor:.3f} s  (min {min(floors):.3f}, max {max(floors):.3f})")
    for mode in modes:
        report(mode, runs[mode], splits[mode], floor)


if __name__ == "__main__":
    main()
