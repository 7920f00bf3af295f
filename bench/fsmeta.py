#!/usr/bin/env python3
"""Small files, metadata, repeated reads and coherency on a container's shared filesystem, against the host.

bench/storage.py measured sequential 256 MiB transfers, where virtiofsd's
``cache=none`` beat the default ``cache=auto`` several times over.  Whether
the default should change also depends on the workloads a guest-side cache
is for, and on what each mode lets a container see while the host changes a
file.  This benchmark measures those, all targets side by side in one
invocation, rounds interleaved (the host is shared with other work):

- ``host``: the same busybox script on the host, in a host directory (the
  baseline of every ratio);
- ``virtio-fs cache=MODE rootfs`` / ``volume`` for MODE in auto, none, always
  (virtiofsd's ``-o cache=``, ``shared_fs.virtiofs_cache``): the container's
  rootfs, and a host directory bind-mounted into it, which is served by the
  bind-volume share (its own virtiofsd, with ``-o timeout=`` from
  ``shared_fs.virtiofs_volume_timeout``, default 0);
- ``virtio-fs cache=auto,timeout=0``: ``auto`` with virtiofsd's ``-o timeout=0``
  (no metadata caching in the guest; data still close-to-open) on both
  shares, the rootfs's too, through a wrapper script named as
  ``virtiofsd_path``;
- ``9p rootfs`` / ``volume``: the same with ``shared_fs.kind = "virtio-9p"``.

Per round and target, two containers (so the second starts with a cold
guest cache; the host drops its page cache in between):

1. *create*: 2000 files of 4 KiB in 20 directories (shell builtins only, so
   the time is the filesystem's, not fork's);
2. *use*: ``find | wc -l`` (cold), ``ls -lR`` (stat of every file; cold, then
   again warm), ``cat`` of every file (cold, warm); a 16 MiB file read 5 times
   with ``dd`` (the first cold, the next 4 warm: the page cache's benefit);
   an "application start": a busybox ``sh`` script that "imports" 300 module
   scripts of ~2 KiB from 20 packages along a 3-directory search path, probing
   with ``[ -f ]`` as an interpreter's import system does (about one miss per
   hit; cold, then warm).  Then the coherency check.

Coherency (VM targets; correctness, not speed): the container reads
``same`` and ``grow``, stats ``gone`` and probes the missing ``new`` (so its
caches hold data, attributes, a dentry and a negative dentry), says
``ready``; the host then rewrites ``same`` (same size), appends to ``grow``,
creates ``new`` and deletes ``gone``, and answers on the container's stdin;
the container reports what it sees at once and again 2 s later.  Then the
container writes a new file and overwrites one the host made; the host reads
both back at once.

Timing is inside the container as bench/storage.py does it, but from
``/proc/timer_list``'s ``now at N nsecs`` (CLOCK_MONOTONIC, read with the
shell's ``read`` builtin: no fork) rather than ``/proc/uptime``, whose 10 ms
steps are coarser than some of the host's figures; the benchmark's spec
unmasks ``/proc/timer_list`` (runc's default spec masks it), and
``/proc/uptime`` is the fallback.

Run as root after scripts/setup.sh, with capsa's Python:
/opt/capsa/venv/bin/python bench/fsmeta.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import BUSYBOX, config_with, drop_host_caches, make_bundle

from capsa.cli.spec import default_spec

APPLETS = ("sh", "cat", "echo", "rm", "find", "wc", "ls", "dd", "head", "tr", "sleep", "printf", "mkdir", "seq")
FILES_PER_DIR, DIRS, FILE_BYTES = 100, 20, 4096
BIG_MIB, BIG_READS = 16, 5
PACKAGES, MODULES_PER_PACKAGE, SEARCH_PATH = 20, 15, 3
TIMEOUT = 900.0  # one container's whole run, generous for TCG on a busy host

# Steps, in the order the script runs them, and their column headings.
STEPS = {
    "create": "create 2000",
    "find": "find, wc -l",
    "ls_cold": "ls -lR cold",
    "ls_warm": "ls -lR warm",
    "read_cold": "cat all cold",
    "read_warm": "cat all warm",
    "big_cold": "16M read 1",
    "big_warm": "16M reads 2-5",
    "app_cold": "app start cold",
    "app_warm": "app start warm",
}

SCRIPT = f"""
set -e
# CLOCK_MONOTONIC in ns: line 3 of /proc/timer_list is "now at N nsecs".
clock() {{
    if [ -r /proc/timer_list ]; then
        {{ read _l; read _l; read _a _b now _c; }} < /proc/timer_list
    else
        read now _c < /proc/uptime
        now="${{now%.*}}${{now#*.}}0000000"
    fi
}}
begin() {{ clock; t0=$now; }}
end() {{ clock; echo "time $1 $t0 $now"; }}
cd "$DIR"
if [ "$PHASE" = create ]; then
    data=$(head -c {FILE_BYTES} /dev/zero | tr '\\0' x)
    begin
    mkdir small
    d=0
    while [ $d -lt {DIRS} ]; do
        d=$((d + 1))
        mkdir small/d$d
        f=0
        while [ $f -lt {FILES_PER_DIR} ]; do
            f=$((f + 1))
            printf '%s' "$data" > small/d$d/f$f
        done
    done
    end create
    exit 0
fi
begin; n=$(find small | wc -l); end find
echo "count find $n"
begin; ls -lR small > /dev/null; end ls_cold
begin; ls -lR small > /dev/null; end ls_warm
begin; for d in small/*; do cat "$d"/*; done > /dev/null; end read_cold
begin; for d in small/*; do cat "$d"/*; done > /dev/null; end read_warm
i=0
while [ $i -lt {BIG_READS} ]; do
    i=$((i + 1))
    begin; dd if=big.dat of=/dev/null bs=1M 2> /dev/null; end big$i
done
begin; n=$(sh app/main.sh); end app_cold
echo "count app $n"
begin; n=$(sh app/main.sh); end app_warm
[ "$COH" = 1 ] || exit 0
cd coh
cat same grow > /dev/null
[ -e gone ] && [ ! -e new ] && ls > /dev/null
echo "coh ready"
read _line
look() {{
    s=$(cat same 2> /dev/null || echo ERROR)
    g=$(cat grow 2> /dev/null || echo ERROR)
    if [ -e new ]; then n=yes; else n=no; fi
    if [ -e gone ]; then o=yes; else o=no; fi
    echo "coh $1 same=$s grow=$g new=$n gone=$o"
}}
look now
sleep 2
look later
printf guest-new > from-guest
printf guest-bbbb > overwritten
[ ! -x /bin/mmapcheck ] || /bin/mmapcheck mapped
echo "coh written"
read _line
"""

# The application's entry point: import every module along the search path.
APP_MAIN = f"""
n=0
p=0
while [ $p -lt {PACKAGES} ]; do
    p=$((p + 1))
    m=0
    while [ $m -lt {MODULES_PER_PACKAGE} ]; do
        m=$((m + 1))
        for dir in app/lib1 app/lib2 app/lib3; do
            if [ -f $dir/pkg$p/mod$m.sh ]; then
                . $dir/pkg$p/mod$m.sh
                n=$((n + 1))
                break
            fi
        done
    done
done
echo $n
"""

# A shared writable mapping (what SQLite's WAL index, LMDB and other databases do): FUSE refuses
# MAP_SHARED on a file opened with direct I/O (fs/fuse/file.c, fuse_file_mmap: -ENODEV), which is
# what virtiofsd's cache=none asks for.  Built with the host's gcc when there is one.
MMAP_CHECK = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096) != 0) {
        printf("mmap %s\n", strerror(errno));
        return 0;
    }
    char *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        printf("mmap %s\n", strerror(errno));
        return 0;
    }
    memcpy(map, "guest-mmap", 10);
    msync(map, 4096, MS_SYNC);
    munmap(map, 4096);
    close(fd);
    printf("mmap ok\n");
    return 0;
}
"""

# What each coherency file holds before the host changes it, and after.
COH_BEFORE = {"same": "host-aaaa", "grow": "host-old", "gone": "host-gone", "overwritten": "host-aaaa"}
COH_HOST = {"same": "host-bbbb", "grow": "host-old-and-longer"}
EXPECTED_LOOK = "same=host-bbbb grow=host-old-and-longer new=yes gone=no"
EXPECTED_GUEST = {"from-guest": "guest-new", "overwritten": "guest-bbbb"}


@dataclass
class Target:
    name: str
    config: Path | None  # None: the host itself
    directory: str  # the target directory as the script sees it
    host_directory: Path  # the same directory from the host
    mounts: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=lambda: {step: [] for step in STEPS})
    coherency: list[str] = field(default_factory=list)  # one verdict line per round


def virtiofsd_wrapper(work: Path, option: str) -> Path:
    """An executable that runs Debian's virtiofsd with one more ``-o`` option (for ``virtiofsd_path``)."""
    wrapper = work / f"virtiofsd-{option.replace('=', '')}"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/lib/qemu/virtiofsd "$@" -o {option}\n')
    wrapper.chmod(0o755)
    return wrapper


def build_mmap_check(rootfs: Path, work: Path) -> None:
    """/bin/mmapcheck in the container's rootfs, a static binary (the rootfs has no libc); skipped without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        print("no gcc: the MAP_SHARED check is skipped", file=sys.stderr)
        return
    source = work / "mmapcheck.c"
    source.write_text(MMAP_CHECK)
    subprocess.run([gcc, "-static", "-O2", "-o", str(rootfs / "bin" / "mmapcheck"), str(source)], check=True)


def make_tree(directory: Path) -> None:
    """The 16 MiB file and the application tree, made by the host once per target."""
    directory.mkdir(parents=True)
    with (directory / "big.dat").open("wb") as big:
        big.write(os.urandom(BIG_MIB << 20))
    app = directory / "app"
    app.mkdir()
    (app / "main.sh").write_text(APP_MAIN)
    body = "".join(
        f"# line {line:02d} of a module: what an interpreter reads and parses on import\n" for line in range(24)
    )
    for package in range(1, PACKAGES + 1):
        # Packages spread over the search path: a third at each depth, so an import misses 0, 1 or 2 times.
        lib = app / f"lib{package % SEARCH_PATH + 1}" / f"pkg{package}"
        lib.mkdir(parents=True)
        for module in range(1, MODULES_PER_PACKAGE + 1):
            (lib / f"mod{module}.sh").write_text(f"{body}mod_{package}_{module}() {{ echo {package}.{module}; }}\n")


def reset_round(target: Target) -> None:
    """Remove the last round's small files; put the coherency files back as the container first sees them."""
    shutil.rmtree(target.host_directory / "small", ignore_errors=True)
    coh = target.host_directory / "coh"
    shutil.rmtree(coh, ignore_errors=True)
    coh.mkdir()
    for name, content in COH_BEFORE.items():
        (coh / name).write_text(content)


def container_command(target: Target, work: Path, bundle: Path, env: dict[str, str], cid: str) -> list[str]:
    assert target.config is not None
    spec = default_spec(["sh", "-c", SCRIPT], terminal=False)
    spec["process"]["env"] += [f"{key}={value}" for key, value in env.items()]
    spec["mounts"] += target.mounts
    spec["root"]["readonly"] = False  # the rootfs is a target
    spec["linux"]["maskedPaths"] = [path for path in spec["linux"]["maskedPaths"] if path != "/proc/timer_list"]
    (bundle / "config.json").write_text(json.dumps(spec))
    argv = [sys.executable, "-m", "capsa", "--root", str(work / "root"), "--config", str(target.config)]
    return [*argv, "run", "--bundle", str(bundle), cid]


class Container:
    """``capsa run`` of one container, its stdout read line by line without a buffer that could hide lines."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.deadline = time.monotonic() + TIMEOUT
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        self.pending = b""
        self.output: list[str] = []

    def read_line(self) -> str:
        """The container's next stdout line (kept in ``output`` too); an error at EOF or past the deadline."""
        assert self.proc.stdout is not None
        while b"\n" not in self.pending:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                raise RuntimeError("timed out waiting for the container")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"stdout closed after {self.output[-3:]}; {self.log.read_text(errors='replace')[-800:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        self.output.append(line.decode())
        return self.output[-1]

    def answer(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    def finish(self) -> str:
        """Read to EOF and reap; all of stdout, or an error with the end of capsa's stderr."""
        try:
            while True:
                self.read_line()
        except EOFError:
            pass
        status = self.proc.wait(timeout=max(self.deadline - time.monotonic(), 1.0))
        if status != 0:
            raise RuntimeError(f"exit status {status}: {self.log.read_text(errors='replace').strip()[-500:]}")
        return "\n".join(self.output) + "\n"

    def kill(self) -> None:
        """After a failure: end ``capsa run`` and delete the container it may have left."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        delete = [*self.argv[: self.argv.index("run")], "delete", "--force", self.argv[-1]]
        subprocess.run(delete, capture_output=True, check=False)


def coherency_dialogue(container: Container, target: Target) -> str:
    """Play the host's side of the coherency check; the verdict."""
    while not container.read_line().startswith("coh ready"):
        pass
    coh = target.host_directory / "coh"
    (coh / "same").write_text(COH_HOST["same"])
    with (coh / "grow").open("a") as grow:
        grow.write(COH_HOST["grow"].removeprefix(COH_BEFORE["grow"]))
    (coh / "new").write_text("host-new")
    (coh / "gone").unlink()
    container.answer()
    looks: dict[str, str] = {}
    mmap = "not checked"
    while not (line := container.read_line()).startswith("coh written"):
        words = line.split(maxsplit=2)
        if words[:1] == ["coh"]:
            looks[words[1]] = words[2].strip()
        if words[:1] == ["mmap"]:
            mmap = line.removeprefix("mmap ").strip()
    # The host reads what the container wrote, before letting it exit.
    guest = {name: (coh / name).read_text() if (coh / name).exists() else "(missing)" for name in EXPECTED_GUEST}
    container.answer()
    verdict = []
    for when in ("now", "later"):
        seen = looks.get(when, "(no report)")
        verdict.append(f"{when}: {'fresh' if seen == EXPECTED_LOOK else 'STALE ' + seen}")
    stale_host = [f"{name}={content!r}" for name, content in guest.items() if content != EXPECTED_GUEST[name]]
    verdict.append("host sees guest writes" if not stale_host else "host STALE " + " ".join(stale_host))
    if mmap == "ok":
        mapped = (coh / "mapped").read_bytes()[:10]
        mmap = "ok" if mapped == b"guest-mmap" else f"written but the host reads {mapped!r}"
    verdict.append(f"MAP_SHARED write: {mmap}")
    return "; ".join(verdict)


def run_phase(target: Target, work: Path, bundle: Path, phase: str, serial: int) -> str:
    """One container (or the host) running the script's ``phase``; its stdout."""
    env = {"PHASE": phase, "DIR": target.directory, "COH": "1" if target.config and phase == "use" else "0"}
    if target.config is None:
        result = subprocess.run(
            [str(BUSYBOX), "sh", "-c", SCRIPT],
            env={**env, "PATH": str(bundle / "rootfs" / "bin")},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"host {phase} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        return result.stdout
    container = Container(container_command(target, work, bundle, env, f"fm{serial}"), work / "run.log")
    try:
        if env["COH"] == "1":
            target.coherency.append(coherency_dialogue(container, target))
        return container.finish()
    except BaseException as error:
        container.kill()  # also on ^C: no VM outlives the benchmark
        if isinstance(error, (RuntimeError, EOFError, subprocess.TimeoutExpired)):
            raise RuntimeError(f"{target.name} {phase}: {error!r}") from error
        raise


def record(target: Target, output: str) -> None:
    """Fold one run's ``time STEP T0 T1`` lines (ns) into the target's seconds; check the counts."""
    times: dict[str, float] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "time":
            times[words[1]] = max(int(words[3]) - int(words[2]), 1) / 1e9
        if len(words) == 3 and words[0] == "count":
            expected = {"find": 1 + DIRS + DIRS * FILES_PER_DIR, "app": PACKAGES * MODULES_PER_PACKAGE}[words[1]]
            if int(words[2]) != expected:
                raise RuntimeError(f"{target.name}: {words[1]} counted {words[2]}, not {expected}")
    if "big1" in times:
        times["big_cold"] = times.pop("big1")
        times["big_warm"] = sum(times.pop(f"big{i}") for i in range(2, BIG_READS + 1))
    for step, seconds in times.items():
        target.seconds[step].append(seconds)


def report(targets: list[Target], rounds: int) -> None:
    host = targets[0]
    print(f"seconds, median of {rounds} rounds (x host: the target's time over the host's; higher is slower)")
    print("| target | " + " | ".join(STEPS.values()) + " |")
    print("|---|" + "---|" * len(STEPS))
    for target in targets:
        cells = []
        for step in STEPS:
            median = statistics.median(target.seconds[step])
            ratio = median / statistics.median(host.seconds[step])
            cells.append(
                f"{median:.3f}"
                if target is host
                else f"{median:.2f} ({ratio:.0f}x)"
                if ratio >= 10
                else f"{median:.2f} ({ratio:.1f}x)"
            )
        print(f"| {target.name} | " + " | ".join(cells) + " |")
    print("\nspread: min-max seconds over the rounds")
    print("| target | " + " | ".join(STEPS.values()) + " |")
    print("|---|" + "---|" * len(STEPS))
    for target in targets:
        cells = [f"{min(target.seconds[step]):.3g}-{max(target.seconds[step]):.3g}" for step in STEPS]
        print(f"| {target.name} | " + " | ".join(cells) + " |")
    print("\ncoherency (host changes while the container runs; container writes read by the host)")
    for target in targets[1:]:
        verdicts = sorted(set(target.coherency))
        for verdict in verdicts:
            print(f"- {target.name}: {verdict} ({target.coherency.count(verdict)}/{len(target.coherency)} rounds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], help="only the VM targets whose name holds this")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (QEMU, virtiofsd, dropping the page cache)")
    # Started in the background SIGINT may be ignored: make SIGTERM and SIGINT unwind, so the running VM is deleted.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # On the host's disk, not a tmpfs, as bench/storage.py: every target uses the same device.
    work = Path(tempfile.mkdtemp(prefix="capsa-fm-", dir="/var/tmp"))
    try:
        bundle = make_bundle(work, APPLETS)
        build_mmap_check(bundle / "rootfs", work)
        rootfs, volume = bundle / "rootfs" / "bench", work / "volume"
        volume.mkdir()
        bind = {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}
        targets = [Target("host", None, str(work / "host"), work / "host")]
        configs = [
            (f"virtio-fs cache={cache}", config_with(work, "virtio-fs", cache)) for cache in ("auto", "none", "always")
        ]
        timeout0 = virtiofsd_wrapper(work, "timeout=0")
        configs.append(("virtio-fs cache=auto,timeout=0", config_with(work, "virtio-fs", "auto", timeout0)))
        configs.append(("9p", config_with(work, "virtio-9p")))
        for index, (name, config) in enumerate(configs):
            targets.append(Target(f"{name} rootfs", config, f"/bench/t{index}", rootfs / f"t{index}"))
            targets.append(Target(f"{name} volume", config, f"/vol/t{index}", volume / f"t{index}", [bind]))
        if args.only:
            targets = targets[:1] + [t for t in targets[1:] if any(word in t.name for word in args.only)]
        for target in targets:
            make_tree(target.host_directory)
        serial = 0
        for round_ in range(args.rounds):
            for target in targets:
                for attempt in (1, 2):
                    # A VM that dies on this shared host should not cost the other targets' rounds: one retry.
                    try:
                        reset_round(target)
                        serial += 1
                        create = run_phase(target, work, bundle, "create", serial)
                        drop_host_caches()
                        serial += 1
                        use = run_phase(target, work, bundle, "use", serial)
                        break
                    except RuntimeError as error:
                        print(f"round {round_ + 1}: {target.name}: attempt {attempt} failed: {error}", file=sys.stderr)
                        if target.config is not None and len(target.coherency) > round_:
                            target.coherency.pop()
                        if attempt == 2:
                            raise
                record(target, create)
                record(target, use)
                summary = ", ".join(f"{step} {values[-1]:.2f}" for step, values in target.seconds.items())
                print(f"round {round_ + 1}: {target.name}: {summary}", file=sys.stderr)
                if target.coherency:
                    print(f"round {round_ + 1}: {target.name}: {target.coherency[-1]}", file=sys.stderr)
        report(targets, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
