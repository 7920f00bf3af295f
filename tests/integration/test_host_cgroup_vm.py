"""The VM's host processes in the container's host cgroup (runtime/hostcgroup.py), with real VMs.

The cgroup the spec's ``linux.cgroupsPath`` names must hold the proxy, QEMU,
virtiofsd, the shim and exec shims, in every hierarchy (what engines' stats
read), and be gone after ``delete``, also when the VM or the proxy was
SIGKILLed first.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
from harness import Capsa, is_running, vm_processes

from capsa.runtime.hostcgroup import parse_proc_cgroup

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
