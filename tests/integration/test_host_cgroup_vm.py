"""The VM's host processes in the container's host cgroup (runtime/hostcgroup.py), with real VMs.

The cgroup the spec's ``linux.cgroupsPath`` names must hold the proxy, QEMU,
virtiofsd, the shim and exec shims, in every hierarchy (what engines' stats
read), and be gone after ``delete``, also when the VM or the proxy was
SIGKILLed first.  Its limits follow the spec and the VM's size, grow with
``update``, and an OOM there stays there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Capsa, is_running, vm_processes

from capsa.config import host_cpus, load_config, max_vcpus_for
from capsa.runtime import hostcgroup
from capsa.runtime.hostcgroup import HOST_PIDS_MAX, Layout, cpu_weight, parse_proc_cgroup

pytestmark = pytest.mark.vm

CGROUP_ROOT = Path("/sys/fs/cgroup")


def spec_with_cgroup(capsa: Capsa, cgroups_path: str) -> None:
    capsa.spec(["sleep", "600"])
    path = capsa.bundle / "config.json"
    spec = json.loads(path.read_text())
    spec["linux"]["cgroupsPath"] = cgroups_path
    path.write_text(json.dumps(spec))


def cgroups_of(pid: int) -> dict[str, str]:
    return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def directory(hierarchy: str, path: str) -> Path:
    """/sys/fs/cgroup/<hierarchy>/<path> on this host's layout."""
    if hierarchy:
        base = CGROUP_ROOT / hierarchy.removeprefix("name=")
    else:
        base = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
    return base / path.lstrip("/")


def assert_inside(pids: dict[str, int], expected: dict[str, str]) -> None:
    for name, pid in pids.items():
        assert cgroups_of(pid) == expected, f"{name} ({pid}) is elsewhere"


def test_processes_and_exec_shims_in_a_relative_cgroup(capsa: Capsa, tmp_path: Path) -> None:
    """A relative cgroupsPath is taken from the caller's own cgroup in each hierarchy (runc's fs driver)."""
    cid = "hc" + secrets.token_hex(3)
    relative = f"capsa-it-{cid}/c"
    spec_with_cgroup(capsa, relative)
    mine = cgroups_of(os.getpid())
    expected = {h: (p.rstrip("/") + "/" + relative) for h, p in mine.items()}
    dirs = [directory(h, p) for h, p in expected.items()]
    result = capsa.run(cid, "--detach")
    assert result.code == 0, result.stderr
    try:
        assert all(d.is_dir() for d in dirs), dirs
        assert_inside(vm_processes(capsa, cid), expected)
        # `capsa create` held the cgroup only while it started them.
        assert cgroups_of(os.getpid()) == mine
        pid_file = tmp_path / "exec.pid"
        result = capsa("exec", "--detach", "--pid-file", str(pid_file), cid, "sleep", "300")
        assert result.code == 0, result.stderr
        assert_inside({"exec shim": int(pid_file.read_text())}, expected)
    finally:
        result = capsa("delete", "--force", cid)
    assert result.code == 0, result.stderr
    assert [d for d in dirs if d.exists()] == []
    # The parent capsa made for it went too.
    assert [d.parent for d in dirs if d.parent.exists()] == []


@pytest.mark.parametrize("victim", ["qemu", "proxy"])
def test_removed_after_a_sigkill_and_delete_force(capsa: Capsa, victim: str) -> None:
    """An absolute cgroupfs path (QEMU killed), and systemd's slice:prefix:name (the proxy killed)."""
    cid = "hk" + secrets.token_hex(3)
    if victim == "qemu":
        flags: tuple[str, ...] = ()
        spec_with_cgroup(capsa, f"/capsa-it-{cid}/{cid}")
        cgroup, made_parent = f"/capsa-it-{cid}/{cid}", f"/capsa-it-{cid}"
    else:
        flags = ("--systemd-cgroup",)
        spec_with_cgroup(capsa, f"capsa-{cid}.slice:capsa:{cid}")
        cgroup, made_parent = f"/capsa.slice/capsa-{cid}.slice/capsa-{cid}.scope", f"/capsa.slice/capsa-{cid}.slice"
    hierarchies = cgroups_of(os.getpid())
    dirs = [directory(h, cgroup) for h in hierarchies]
    parents = [directory(h, made_parent) for h in hierarchies]
    result = capsa(*flags, "run", "--detach", "--bundle", str(capsa.bundle), cid)
    assert result.code == 0, result.stderr
    try:
        pids = vm_processes(capsa, cid)
        assert_inside(pids, dict.fromkeys(hierarchies, cgroup))
        os.kill(pids[victim], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while is_running(pids[victim]) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        result = capsa(*flags, "delete", "--force", cid)
    assert result.code == 0, result.stderr
    assert [d for d in dirs if d.exists()] == []
    assert not any(is_running(pid) for pid in pids.values())
    assert [d for d in parents if d.exists()] == []  # capsa made them for it


# -- limits ----------------------------------------------------------------------------------------

MiB = 1 << 20


def cgroup_files(state_dirs: dict[str, str]) -> dict[str, Path]:
    """controller → the container's directory where a tool reads that controller's files."""
    layout = hostcgroup.host_hierarchies()
    found: dict[str, Path] = {}
    for hierarchy in layout.joined():
        directory = state_dirs.get(hierarchy.mountpoint)
        if directory is None:
            continue
        if hierarchy.version == 1:
            for controller in hierarchy.controllers:
                found[controller] = Path(directory)
        elif layout.layout == Layout.UNIFIED:
            for controller in Path(directory, "cgroup.controllers").read_text().split():
                found[controller] = Path(directory)
    return found


def seen_limits(capsa: Capsa, cid: str) -> dict[str, str]:
    """The limits as a tool reading the host cgroup finds them, in cgroup v1's or v2's own files."""
    dirs = json.loads((capsa.root / cid / "state.json").read_text())["host_cgroup"]["dirs"]
    where = cgroup_files(dirs)
    v1_names = ["memory.limit_in_bytes", "pids.max", "cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"]
    v2_names = ["memory.max", "cpu.weight", "cpu.max", "cpuset.cpus", "cpuset.mems"]
    seen = {}
    for name in v1_names + v2_names:
        path = where.get(name.partition(".")[0], Path("/nonexistent")) / name
        if path.exists():
            seen[name] = path.read_text().strip()
    return seen


def v1() -> bool:
    return hostcgroup.host_hierarchies().layout != Layout.UNIFIED


def write_spec(capsa: Capsa, cgroups_path: str, resources: dict[str, object] | None = None) -> None:
    spec_with_cgroup(capsa, cgroups_path)
    path = capsa.bundle / "config.json"
    spec = json.loads(path.read_text())
    if resources is not None:
        spec["linux"]["resources"] = resources
    path.write_text(json.dumps(spec))


def test_limits_follow_the_spec_and_the_vm_and_grow_with_update(capsa: Capsa) -> None:
    cid = "hl" + secrets.token_hex(3)
    cgroup = f"/capsa-it-{cid}/{cid}"
    resources = {
        "memory": {"limit": 256 * MiB},
        "cpu": {"shares": 512, "quota": 50_000, "period": 100_000, "cpus": "0", "mems": "0"},
        "pids": {"limit": 100},
    }
    write_spec(capsa, cgroup, resources)
    config = load_config()
    hv = config.hypervisor
    overhead = hostcgroup.vmm_overhead_mib(hostcgroup.accelerator_of(config), exec_helpers=True)
    vcpus = min(hv.default_vcpus + 1, max_vcpus_for(hv, host_cpus()))  # ceil(50 ms / 100 ms) more
    result = capsa.run(cid, "--detach")
    assert result.code == 0, result.stderr
    try:
        memory = (hv.default_memory_mib + 256 + overhead) * MiB
        expected = {
            "pids.max": str(HOST_PIDS_MAX),  # the host's tasks, not the guest's 100 processes
            "cpuset.cpus": "0",
            "cpuset.mems": "0",
        }
        if v1():
            expected |= {
                "memory.limit_in_bytes": str(memory),
                "cpu.shares": "512",
                "cpu.cfs_period_us": "100000",
                "cpu.cfs_quota_us": str((vcpus + 1) * 100_000),
            }
        else:
            expected |= {
                "memory.max": str(memory),
                "cpu.weight": str(cpu_weight(512)),
                "cpu.max": f"{(vcpus + 1) * 100_000} 100000",
            }
        assert {k: v for k, v in seen_limits(capsa, cid).items() if k in expected} == expected
        # The VM grew at create to hold the spec's limit: the guest has more than its base.
        result = capsa("exec", cid, "head", "-1", "/proc/meminfo")
        assert result.code == 0, result.stderr
        assert int(result.stdout.split()[1]) > hv.default_memory_mib * 1024

        result = capsa("update", "--memory", "768m", "--cpu-share", "256", cid)
        assert result.code == 0, result.stderr
        seen = seen_limits(capsa, cid)
        grown = str((hv.default_memory_mib + 768 + overhead) * MiB)
        if v1():
            assert (seen["memory.limit_in_bytes"], seen["cpu.shares"]) == (grown, "256")
            assert seen["cpu.cfs_quota_us"] == str((vcpus + 1) * 100_000)  # the VM kept its vCPUs
        else:
            assert (seen["memory.max"], seen["cpu.weight"]) == (grown, str(cpu_weight(256)))
        assert seen["cpuset.cpus"] == "0"
    finally:
        result = capsa("delete", "--force", cid)
    assert result.code == 0, result.stderr


def test_no_limits_when_turned_off(capsa: Capsa, tmp_path: Path) -> None:
    cid = "hn" + secrets.token_hex(3)
    write_spec(capsa, f"/capsa-it-{cid}/{cid}", {"cpu": {"shares": 512}})
    config = tmp_path / "capsa.toml"
    config.write_text("[security]\ncgroup_limits = false\n")
    result = capsa("--config", str(config), "run", "--detach", "--bundle", str(capsa.bundle), cid)
    assert result.code == 0, result.stderr
    try:
        seen = seen_limits(capsa, cid)
        assert seen["pids.max"] == "max"
        if v1():
            assert int(seen["memory.limit_in_bytes"]) >= 1 << 62
            assert (seen["cpu.shares"], seen["cpu.cfs_quota_us"]) == ("1024", "-1")
        else:
            assert (seen["memory.max"], seen["cpu.max"].split()[0]) == ("max", "max")
    finally:
        result = capsa("delete", "--force", cid)
    assert result.code == 0, result.stderr


# Joins the cgroups named, then allocates 64 MiB at a time until killed; at the
# bound (MiB) it gives up, so that a cgroup without its limit cannot take the host.
HOG = """
import os, sys
for directory in sys.argv[2:]:
    with open(os.path.join(directory, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
held = []
while len(held) * 64 < int(sys.argv[1]):
    chunk = bytearray(64 << 20)
    for i in range(0, len(chunk), 4096):
        chunk[i] = 1
    held.append(chunk)
sys.exit(3)
"""


def memory_dir(capsa: Capsa, cid: str) -> Path:
    dirs = json.loads((capsa.root / cid / "state.json").read_text())["host_cgroup"]["dirs"]
    return cgroup_files(dirs)["memory"]


def oom_kills(directory: Path) -> int:
    """The OOM kills in the cgroup: v1 memory.oom_control, v2 memory.events."""
    name = "memory.oom_control" if (directory / "memory.oom_control").exists() else "memory.events"
    for line in (directory / name).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def hog(capsa: Capsa, cid: str) -> subprocess.Popen[bytes]:
    """A process in the container's host cgroup (every hierarchy) that allocates memory until it is killed."""
    dirs = json.loads((capsa.root / cid / "state.json").read_text())["host_cgroup"]["dirs"]
    seen = seen_limits(capsa, cid)
    limit = int(seen.get("memory.limit_in_bytes") or seen["memory.max"])
    assert limit < 1 << 40, f"no memory limit on {cid}'s host cgroup"
    bound = (limit >> 20) + 1024
    return subprocess.Popen([sys.executable, "-c", HOG, str(bound), *dirs.values()], stdin=subprocess.DEVNULL)


def qemu_of(capsa: Capsa, cid: str) -> int:
    """QEMU's host PID: the one qemu-system process in the container's host cgroup."""
    found = []
    for pid in (memory_dir(capsa, cid) / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                found.append(int(pid))
    (qemu,) = found
    return qemu


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def test_an_oom_in_the_host_cgroup_stays_there(capsa: Capsa) -> None:
    """A process in one sandbox's host cgroup that allocates without end is killed there; the VMs go on."""
    tag = secrets.token_hex(3)
    ids = ("ho" + tag, "hp" + tag)
    for cid in ids:
        write_spec(capsa, f"/capsa-it-{cid}/{cid}")
        result = capsa.run(cid, "--detach")
        assert result.code == 0, result.stderr
    hungry = None
    try:
        victim, other = (memory_dir(capsa, cid) for cid in ids)
        qemu = qemu_of(capsa, ids[0])
        hungry = hog(capsa, ids[0])
        assert hungry.wait(timeout=300) == -signal.SIGKILL
        assert oom_kills(victim) >= 1 and oom_kills(other) == 0
        # The VM was the smaller: it lives, and so does the other sandbox.
        assert is_running(qemu)
        for cid in ids:
            result = capsa("exec", cid, "echo", cid)
            assert (result.code, result.stdout) == (0, f"{cid}\n"), result.stderr
            assert capsa.status(cid) == "running"
    finally:
        if hungry is not None:
            stop(hungry)
        results = [capsa("delete", "--force", cid) for cid in ids]
    assert [r.code for r in results] == [0, 0], [r.stderr for r in results]


def test_a_vm_killed_by_its_host_limit_stops_and_deletes_clean(capsa: Capsa) -> None:
    """QEMU as the OOM victim: its oom_score_adj raised, the OOM killer takes it first, then the hog."""
    cid = "hq" + secrets.token_hex(3)
    cgroup = f"/capsa-it-{cid}/{cid}"
    write_spec(capsa, cgroup)
    result = capsa.run(cid, "--detach")
    assert result.code == 0, result.stderr
    hungry = None
    deleted = None
    try:
        pids = vm_processes(capsa, cid)
        qemu = qemu_of(capsa, cid)
        Path(f"/proc/{qemu}/oom_score_adj").write_text("1000")
        memory = memory_dir(capsa, cid)
        hungry = hog(capsa, cid)
        assert hungry.wait(timeout=300) == -signal.SIGKILL
        assert oom_kills(memory) >= 2
        deadline = time.monotonic() + 60
        while capsa.status(cid) != "stopped" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert capsa.status(cid) == "stopped"
        # The shim (the container's process for the engine) exited: the engine sees the exit.
        deadline = time.monotonic() + 30
        while is_running(pids["shim"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_running(pids["shim"]) and not is_running(qemu)
        deleted = capsa("delete", cid)
    finally:
        if hungry is not None:
            stop(hungry)
        if deleted is None or deleted.code != 0:
            capsa("delete", "--force", cid)
    assert deleted.code == 0, deleted.stderr
    assert not any(is_running(pid) for pid in pids.values())
    hierarchies = cgroups_of(os.getpid())
    assert [d for h in hierarchies if (d := directory(h, cgroup)).exists()] == []
