"""Fixtures for tests that boot real VMs."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Capsa, guest_ready, kill_leftovers, leftovers, make_rootfs, socket_dirs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = guest_ready()
    if reason is None:
        return
    if os.environ.get("CI"):
        # In CI a missing guest is a broken setup, not a reason to pass quietly.
        raise pytest.UsageError(f"VM tests cannot run: {reason}")
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def capsa() -> Iterator[Capsa]:
    # A state root as long as an engine's may be (Docker's is 95 bytes with
    # the ID): whatever the root, the VM's unix sockets must work.
    work = Path(tempfile.mkdtemp(prefix="capsa-t-", dir="/tmp"))
    root = work / "docker" / "runtime-runc" / "moby" / ("r" * 64)
    root.parent.mkdir(parents=True)  # tests keep files beside the root
    bundle = work / "b"
    make_rootfs(bundle / "rootfs")
    client = Capsa(root=root, bundle=bundle)
    try:
        yield client
        deadline = time.monotonic() + 10
        while (leftovers(root) or socket_dirs(root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(root) == []
        assert socket_dirs(root) == set()
    finally:
        kill_leftovers(root)
        shutil.rmtree(work, ignore_errors=True)
