"""Fixtures for tests that boot real VMs: a busybox bundle, a private state root,
and a check that nothing (process, mount, file) outlives a test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.spec import default_spec
from capsa.config import load_config

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "cat", "echo", "true", "false", "uname", "sleep", "kill", "grep", "wc", "head", "ls", "env", "id"]


def guest_ready() -> str | None:
    """Why VM tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    config = load_config()
    for path in (config.hypervisor.kernel, config.hypervisor.image or config.hypervisor.initrd, config.hypervisor.path):
        if path is None or not path.exists():
            return f"{path} is missing: run scripts/setup.sh"
    if not BUSYBOX.exists():
        return "busybox-static is not installed"
    return None


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


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@dataclass
class Capsa:
    root: Path
    bundle: Path

    def spec(self, args: list[str], **process: Any) -> None:
        spec = default_spec(args, terminal=False)
        spec["process"].update(process)
        (self.bundle / "config.json").write_text(json.dumps(spec))

    def __call__(self, *args: str, input: str | None = None, timeout: float = 180) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "capsa", "--root", str(self.root), *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.bundle,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def run(self, container_id: str, *args: str, input: str | None = None) -> Result:
        return self("run", "--bundle", str(self.bundle), *args, container_id, input=input)


def make_rootfs(rootfs: Path) -> None:
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir()


def leftovers(root: Path) -> list[str]:
    """Processes, mounts and files under the state root that should be gone."""
    found: list[str] = []
    needle = str(root)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and "pytest" not in cmdline:
            found.append(f"process {pid}: {cmdline[:200]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if needle in line:
            found.append(f"mount: {line}")
    if root.exists():
        found += [f"file: {p}" for p in root.rglob("*")]
    return found


def kill_leftovers(root: Path) -> None:
    needle = str(root).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"pytest" not in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def capsa() -> Iterator[Capsa]:
    # Short paths: the VM's unix sockets live under the state root.
    work = Path(tempfile.mkdtemp(prefix="capsa-t-", dir="/tmp"))
    root = work / "r"
    bundle = work / "b"
    make_rootfs(bundle / "rootfs")
    client = Capsa(root=root, bundle=bundle)
    try:
        yield client
        deadline = time.monotonic() + 10
        while leftovers(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(root) == []
    finally:
        kill_leftovers(root)
        shutil.rmtree(work, ignore_errors=True)
