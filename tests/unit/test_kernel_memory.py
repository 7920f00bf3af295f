"""Kernel memory limits (config-linux.md "Memory": kernel, kernelTCP) are dropped with a warning,
as runc does on cgroup v2, instead of crun in the cgroup v2 guest refusing the whole container."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.spec import default_spec
from capsa.runtime.bundle import load_bundle
from capsa.runtime.resources import check_resources

MiB = 1 << 20


def make_bundle(tmp_path: Path, spec: dict[str, Any]) -> Path:
    (tmp_path / "rootfs" / "bin").mkdir(parents=True)
    (tmp_path / "rootfs" / "bin" / "sh").write_bytes(b"\x7fELF")
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


def test_a_bundle_with_kernel_memory_loads_without_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = default_spec(["sh"], terminal=False)
    spec["linux"]["resources"] = {"memory": {"limit": 256 * MiB, "kernel": 64 * MiB, "kernelTCP": 32 * MiB}}
    with caplog.at_level(logging.WARNING):
        bundle = load_bundle(make_bundle(tmp_path, spec))
    assert bundle.spec["linux"]["resources"] == {"memory": {"limit": 256 * MiB}}
    assert "memory.kernel and memory.kernelTCP ignored" in caplog.text
    # The engine's file is the engine's.
    assert json.loads((tmp_path / "config.json").read_text())["linux"]["resources"]["memory"]["kernel"] == 64 * MiB


def test_a_bundle_without_kernel_memory_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = default_spec(["sh"], terminal=False)
    spec["linux"]["resources"] = {"memory": {"limit": 256 * MiB}}
    with caplog.at_level(logging.WARNING):
        load_bundle(make_bundle(tmp_path, spec))
    assert caplog.records == []


def test_update_resources_drop_kernel_memory(caplog: pytest.LogCaptureFixture) -> None:
    given = {"memory": {"kernel": 64 * MiB, "limit": 128 * MiB}, "cpu": {"shares": 10}}
    with caplog.at_level(logging.WARNING):
        checked = check_resources(given)
    assert checked == {"memory": {"limit": 128 * MiB}, "cpu": {"shares": 10}}
    assert given["memory"]["kernel"] == 64 * MiB  # not modified
    assert "memory.kernel ignored" in caplog.text
