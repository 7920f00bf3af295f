"""The shim v2's warning when the pod's host cgroup is too small for its VM (shim/v2/pod.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from capsa.config import Config
from capsa.runtime import hostcgroup
from capsa.runtime.hostcgroup import HostCgroup
from capsa.shim.v2 import pod as pod_module
from capsa.shim.v2.pod import Pod

OVERHEAD_MIB = 128


def make_pod(tmp_path: Path, limit: int | None, monkeypatch: pytest.MonkeyPatch) -> Pod:
    pod = Pod(Config(), "sandbox1", tmp_path, on_exit=lambda process: None)
    pod.host_cgroup = HostCgroup("/kubepods/pod1/sandbox1", {"/sys/fs/cgroup/memory": "/x"}, overhead_mib=OVERHEAD_MIB)
    monkeypatch.setattr(hostcgroup, "memory_limit_mib", lambda cgroup, hierarchies=None: limit)
    return pod


def test_a_pod_limit_below_the_vm_is_told_once_per_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pod = make_pod(tmp_path, 512, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=pod_module.log.name):
        pod._check_host_memory_limit(1024)
        pod._check_host_memory_limit(1024)
        pod._check_host_memory_limit(1280)  # the VM grew: told again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "(512 MiB)" in warnings[0] and "1024 MiB of guest memory" in warnings[0]
    assert "overhead.podFixed.memory" in warnings[0]


@pytest.mark.parametrize("limit", [None, 1024 + OVERHEAD_MIB])
def test_no_limit_or_room_enough_is_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, limit: int | None
) -> None:
    pod = make_pod(tmp_path, limit, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=pod_module.log.name):
        pod._check_host_memory_limit(1024)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_sandbox_cgroup_gets_the_vm_limits_and_they_grow_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the pause container's CPU weight or cpuset: the sandbox cgroup is bounded by the VM's size."""
    root = tmp_path / "cg"
    lines, files = [], {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.cfs_quota_us"}
    for number, controller in enumerate(files):
        (root / controller).mkdir(parents=True)
        lines.append(f"{40 + number} 31 0:{30 + number} / {root}/{controller} rw - cgroup cgroup rw,{controller}\n")
    hierarchies = hostcgroup.parse_mountinfo("".join(lines))
    made = hostcgroup.create("/kubepods/pod1/sandbox1", hierarchies, {})
    leaf = "kubepods/pod1/sandbox1"
    for controller, name in files.items():
        for each in (name, "cgroup.procs", "cpu.cfs_period_us", "cpu.shares"):
            (root / controller / leaf / each).write_text("")
    monkeypatch.setattr(hostcgroup, "setup", lambda path, cid, systemd: made)
    monkeypatch.setattr(hostcgroup, "host_hierarchies", lambda mountinfo=None: hierarchies)
    monkeypatch.setattr(hostcgroup, "accelerator_of", lambda config: "kvm")
    pod = Pod(Config(), "sandbox1", tmp_path / "run", on_exit=lambda process: None)
    sandbox_spec = {"linux": {"cgroupsPath": "/kubepods/pod1/sandbox1", "resources": {"cpu": {"shares": 2}}}}
    pod._enter_host_cgroup(sandbox_spec)
    try:
        assert (root / "memory" / leaf / "memory.limit_in_bytes").read_text() == str((1024 + 128) << 20)
        assert (root / "pids" / leaf / "pids.max").read_text() == str(hostcgroup.HOST_PIDS_MAX)
        assert (root / "cpu" / leaf / "cpu.cfs_quota_us").read_text() == "200000"
        assert (root / "cpu" / leaf / "cpu.shares").read_text() == ""  # the pause process's 2 is not the pod's
        pod._grow_host_limits(2, 1536)
        assert (root / "memory" / leaf / "memory.limit_in_bytes").read_text() == str((1536 + 128) << 20)
        assert (root / "cpu" / leaf / "cpu.cfs_quota_us").read_text() == "300000"
        assert HostCgroup.load(tmp_path / "run" / pod_module.HOST_CGROUP_FILE).memory_mib == 1536
    finally:
        pod.host_cgroup.leave({})
