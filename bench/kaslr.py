#!/usr/bin/env python3
"""What KASLR costs a cold boot: the guest's bzImage against its PVH vmlinux, side by side.

The same kernel build boots two ways.  ``-kernel vmlinux`` enters the ELF
through its PVH note, straight into the 64-bit kernel at its link address.
``-kernel bzImage`` goes through SeaBIOS's Linux loader, the real-mode
setup and the decompressor (LZ4), which also picks a random address for the
kernel (KASLR) and applies the relocations.  capsa boots the bzImage.

Each round runs, interleaved, with each kernel:

- the floor: bare QEMU booting the kernel and initrd to a missing init
  (``boot.py``'s floor, the kernel swapped);
- ``capsa run true`` with ``[hypervisor] boot = "cold"``, and the part of
  it from QEMU answering QMP to the agent answering ``Check`` (firmware,
  kernel, agent start).

Then, ``--template-rounds`` times with each kernel, a template is made in an
empty cache (the first ``capsa run`` with ``boot = "template"``): what a
template rotation (``template_max_clones``, ``template_max_age``) costs
the sandbox that makes it.  Prints medians and the bzImage/vmlinux ratios.
Run it as root after scripts/setup.sh:
python3 bench/kaslr.py [--rounds N] [--template-rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from boot import config_with_hypervisor, floor_argv, make_bundle, time_capsa

from capsa.config import cache_dir, guest_dir, load_config
from capsa.hypervisor.accel import resolve_accelerator

KERNELS = ("vmlinux", "bzImage")


def config_with(root: Path, boot: str, kernel: Path) -> Path:
    """The configuration in effect with ``[hypervisor] boot`` and ``kernel`` set."""
    return config_with_hypervisor(root, f"{boot}-{kernel.name}", {"boot": boot, "kernel": str(kernel)})


def time_floor(accel: str, kernel: Path) -> float:
    argv = floor_argv(accel)
    argv[argv.index("-kernel") + 1] = str(kernel)
    start = time.monotonic()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return time.monotonic() - start


def line(label: str, values: dict[str, list[float]]) -> None:
    medians = {kernel: statistics.median(values[kernel]) for kernel in KERNELS}
    shown = "  ".join(f"{kernel} {medians[kernel]:.3f} s (min {min(values[kernel]):.3f})" for kernel in KERNELS)
    print(f"{label:44} {shown}  ratio {medians['bzImage'] / medians['vmlinux']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--template-rounds", type=int, default=3)
    args = parser.parse_args()
    accel = resolve_accelerator(load_config()).accelerator
    kernels = {name: guest_dir() / name for name in KERNELS}
    for path in kernels.values():
        if not path.exists():
            raise SystemExit(f"{path} is missing: run guest/kernel/build.py")
    floors: dict[str, list[float]] = {k: [] for k in KERNELS}
    runs: dict[str, list[float]] = {k: [] for k in KERNELS}
    guest_boot: dict[str, list[float]] = {k: [] for k in KERNELS}
    making: dict[str, list[float]] = {k: [] for k in KERNELS}
    with tempfile.TemporaryDirectory(prefix="capsa-bench-") as tmp:
        root = Path(tmp)
        bundle = make_bundle(root)
        cold = {k: dict(os.environ, CAPSA_CONFIG=str(config_with(root, "cold", kernels[k]))) for k in KERNELS}
        for kernel in KERNELS:  # warm the page cache and the accelerator verdict of both
            time_floor(accel, kernels[kernel])
            time_capsa(bundle, root, 0, cold[kernel])
        for n in range(args.rounds):
            for kernel in KERNELS if n % 2 else reversed(KERNELS):
                floors[kernel].append(time_floor(accel, kernels[kernel]))
                total, split = time_capsa(bundle, root, n, cold[kernel])
                runs[kernel].append(total)
                # boot.phases: the boot less QEMU's start (the guest's own split is not recorded).
                guest_boot[kernel].append(split["boot remainder (firmware, channel)"])
        for n in range(args.template_rounds):
            for kernel in KERNELS if n % 2 else reversed(KERNELS):
                cache = root / f"cache-{kernel}-{n}"
                cache.mkdir()
                if (cache_dir() / "accel.json").exists():
                    shutil.copy(cache_dir() / "accel.json", cache / "accel.json")
                env = dict(
                    os.environ,
                    CAPSA_CONFIG=str(config_with(root, "template", kernels[kernel])),
                    CAPSA_CACHE_DIR=str(cache),
                )
                _, split = time_capsa(bundle, root, 100 + n, env)
                making[kernel].append(split["accelerator + template lookup"])
                shutil.rmtree(cache)
    print(f"accelerator: {accel}, rounds: {args.rounds}, template rounds: {args.template_rounds}")
    line("bare QEMU boot to init (floor)", floors)
    line("guest boot (QMP up to agent Check)", guest_boot)
    line("capsa run true, cold", runs)
    if args.template_rounds:
        line("making a template (its sandbox waits)", making)


if __name__ == "__main__":
    main()
