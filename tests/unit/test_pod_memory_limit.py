"""The shim v2's warning when the pod's host cgroup is too small for its VM (shim/v2/pod.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from capsa.config import Config
from capsa.runtime import hostcgroup
from capsa.runtime.hostcgroup import HostCgroup
from capsa.shim.v2 import pod as pod_module
from capsa.shim.v2.pod import VM_HOST_OVERHEAD_MIB, Pod


def make_pod(tmp_path: Path, limit: int | None, monkeypatch: pytest.MonkeyPatch) -> Pod:
    pod = Pod(Config(), "sandbox1", tmp_path, on_exit=lambda process: None)
    pod.host_cgroup = HostCgroup("/kubepods/pod1/sandbox1", {"/sys/fs/cgroup/memory": "/x"})
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


@pytest.mark.parametrize("limit", [None, 1024 + VM_HOST_OVERHEAD_MIB])
def test_no_limit_or_room_enough_is_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, limit: int | None
) -> None:
    pod = make_pod(tmp_path, limit, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=pod_module.log.name):
        pod._check_host_memory_limit(1024)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
