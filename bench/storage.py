#!/usr/bin/env python3
"""Storage throughput: sequential write then read of a 256 MiB file, capsa against the host, side by side.

Targets, all in one invocation, on the same host disk:

- ``host``: a directory on the host, written and read by the host itself
  (the baseline every ratio is against);
- ``virtio-fs rootfs`` / ``virtio-fs volume``: a capsa container's rootfs
  and a bind-mounted host directory, shared with the VM by virtio-fs
  (``shared_fs.kind = "virtio-fs"``, the default);
- ``9p rootfs`` / ``9p volume``: the same with ``shared_fs.kind =
  "virtio-9p"`` (a configuration file of the benchmark's own, in its temp dir);
- ``virtio-blk volume``: a raw ext4 image file on the host disk, attached as
  a block volume (a mount of type ext4 whose source is the image).
- with ``--virtiofs-cache MODE``: the virtio-fs rootfs and volume again
  with ``shared_fs.virtiofs_cache = MODE`` (virtiofsd's ``-o cache=``).

Each round and target: ``dd if=/dev/zero bs=1M count=256 conv=fsync`` (the
write counts until the data is on the host's disk), then the host drops its
page cache (``/proc/sys/vm/drop_caches``), then ``dd of=/dev/null`` reads the
file back in a *new* container, whose VM has a cold cache of its own.  The
same busybox ``sh`` script does the work on the host and in the containers,
and times each ``dd`` with ``/proc/uptime`` (10 ms steps; seconds-long runs),
so the VM's boot is not in the figures.  Under TCG (these hosts) the guest's
CPU is emulated, so the VM's figures include the cost of running the guest
kernel's copy loops in QEMU's translator.

Prints the median MiB/s of N rounds and the ratio to the host's.  Run as
root after scripts/setup.sh, with capsa's Python:
/opt/capsa/venv/bin/python bench/storage.py [--rounds N] [--size-mib M] [--virtiofs-cache none ...]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.cli.spec import default_spec
from capsa.config import DEFAULT_CONFIG_PATH

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "dd", "cut", "echo", "rm", "sync", "cat")

# One dd, timed by /proc/uptime; prints "<phase> <seconds>".
SCRIPT = """
set -e
t0=$(cut -d' ' -f1 /proc/uptime)
if [ "$PHASE" = write ]; then
    rm -f "$FILE"
    dd if=/dev/zero of="$FILE" bs=1M count="$COUNT" conv=fsync
else
    dd if="$FILE" of=/dev/null bs=1M
fi
t1=$(cut -d' ' -f1 /proc/uptime)
echo "$PHASE $t0 $t1"
"""


@dataclass
class Target:
    name: str
    config: Path | None  # None: the host itself
    directory: str  # where the file goes (a path in the container, or on the host)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    write: list[float] = field(default_factory=list)  # MiB/s per round
    read: list[float] = field(default_factory=list)


def make_bundle(work: Path, applets: tuple[str, ...] = APPLETS) -> Path:
    """A bundle directory whose rootfs is busybox with ``applets`` linked in /bin (bench/fsmeta.py needs more)."""
    bundle = work / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in applets:
        os.symlink("busybox", rootfs / "bin" / applet)
    for name in ("proc", "sys", "dev", "tmp", "etc", "bench", "vol", "blk"):
        (rootfs / name).mkdir()
    return bundle


def config_with(work: Path, kind: str, cache: str | None = None, virtiofsd: Path | None = None) -> Path:
    """The host's configuration with ``[shared_fs] kind`` (``virtiofs_cache``, ``virtiofsd_path``) replaced.

    Written to the temp dir; bench/fsmeta.py passes a ``virtiofsd`` wrapper that adds an option.
    """
    source = Path(os.environ.get("CAPSA_CONFIG", DEFAULT_CONFIG_PATH))
    lines = source.read_text().splitlines() if source.exists() else []
    wanted = {"kind": kind, **({"virtiofs_cache": cache} if cache is not None else {})}
    if virtiofsd is not None:
        wanted["virtiofsd_path"] = str(virtiofsd)
    section, done = "", set()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
            continue
        key = re.match(r"(\w+)\s*=", stripped)
        if section == "[shared_fs]" and key and key.group(1) in wanted:
            lines[index] = f'{key.group(1)} = "{wanted[key.group(1)]}"'
            done.add(key.group(1))
    missing = [f'{key} = "{value}"' for key, value in wanted.items() if key not in done]
    if missing and "[shared_fs]" in lines:
        at = lines.index("[shared_fs]") + 1
        lines[at:at] = missing
    elif missing:
        lines += ["[shared_fs]", *missing]
    path = work / f"configuration-{kind}-{cache or 'default'}{'-' + virtiofsd.name if virtiofsd else ''}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def drop_host_caches() -> None:
    """Write back, then drop the host's page cache (Documentation/admin-guide/sysctl/vm.rst, drop_caches)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def parse_seconds(output: str, phase: str) -> float:
    for line in output.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == phase:
            return max(float(words[2]) - float(words[1]), 0.01)
    raise RuntimeError(f"no {phase} timing in the output: {output[-500:]!r}")


def run_phase(target: Target, work: Path, bundle: Path, phase: str, count: int, serial: int) -> float:
    """One dd on the target; its duration in seconds."""
    path = f"{target.directory}/bench.dat"
    env = {"PHASE": phase, "FILE": path, "COUNT": str(count)}
    if target.config is None:
        result = subprocess.run(
            [str(BUSYBOX), "sh", "-c", SCRIPT], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
        )
    else:
        spec = default_spec(["sh", "-c", SCRIPT], terminal=False)
        spec["process"]["env"] += [f"{key}={value}" for key, value in env.items()]
        spec["mounts"] += target.mounts
        spec["root"]["readonly"] = False  # the rootfs is a target
        (bundle / "config.json").write_text(json.dumps(spec))
        cid = f"st{serial}"
        argv = [sys.executable, "-m", "capsa", "--root", str(work / "root"), "--config", str(target.config)]
        result = subprocess.run([*argv, "run", "--bundle", str(bundle), cid], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{target.name} {phase} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return parse_seconds(result.stdout, phase)


def make_image(path: Path, size_mib: int) -> None:
    with path.open("wb") as image:
        image.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)


def report(targets: list[Target], size_mib: int, rounds: int) -> None:
    host = targets[0]
    host_write, host_read = statistics.median(host.write), statistics.median(host.read)
    print(f"sequential {size_mib} MiB, dd bs=1M; write with conv=fsync, read after dropping caches; median of {rounds}")
    print(f"{'target':<29} {'write MiB/s':>12} {'x host':>7} {'read MiB/s':>11} {'x host':>7}")
    for target in targets:
        write, read = statistics.median(target.write), statistics.median(target.read)
        print(f"{target.name:<29} {write:>12.1f} {write / host_write:>7.2f} {read:>11.1f} {read / host_read:>7.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument(
        "--virtiofs-cache",
        action="append",
        default=[],
        choices=("auto", "always", "none"),
        help="also measure virtio-fs rootfs and volume with this shared_fs.virtiofs_cache (repeatable)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (QEMU, virtiofsd, dropping the page cache)")
    # On the host's disk, not a tmpfs: every target writes to the same device.
    work = Path(tempfile.mkdtemp(prefix="capsa-st-", dir="/var/tmp"))
    try:
        bundle = make_bundle(work)
        volume = work / "volume"
        volume.mkdir()
        host_dir = work / "host"
        host_dir.mkdir()
        image = work / "disk.img"
        make_image(image, args.size_mib * 2)
        bind = {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}
        blk = {"destination": "/blk", "type": "ext4", "source": str(image), "options": ["rw"]}
        virtio_fs, nine_p = config_with(work, "virtio-fs"), config_with(work, "virtio-9p")
        targets = [
            Target("host", None, str(host_dir)),
            Target("virtio-fs rootfs", virtio_fs, "/bench"),
            Target("virtio-fs volume", virtio_fs, "/vol", [bind]),
            Target("9p rootfs", nine_p, "/bench"),
            Target("9p volume", nine_p, "/vol", [bind]),
            Target("virtio-blk volume", virtio_fs, "/blk", [blk]),
        ]
        for cache in args.virtiofs_cache:
            config = config_with(work, "virtio-fs", cache)
            targets += [
                Target(f"virtio-fs cache={cache} rootfs", config, "/bench"),
                Target(f"virtio-fs cache={cache} volume", config, "/vol", [bind]),
            ]
        serial = 0
        for round_ in range(args.rounds):
            for target in targets:
                serial += 1
                seconds = run_phase(target, work, bundle, "write", args.size_mib, serial)
                target.write.append(args.size_mib / seconds)
                drop_host_caches()
                serial += 1
                seconds = run_phase(target, work, bundle, "read", args.size_mib, serial)
                target.read.append(args.size_mib / seconds)
                print(
                    f"round {round_ + 1}: {target.name}: write {target.write[-1]:.1f} MiB/s, "
                    f"read {target.read[-1]:.1f} MiB/s",
                    file=sys.stderr,
                )
        report(targets, args.size_mib, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
