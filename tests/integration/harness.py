"""What the VM tests share: a busybox bundle, a private state root, a way to call
capsa, and a check that nothing (process, mount, file) outlives a test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        # Files, not pipes, for stdout and stderr: a detached container keeps
        # the stdio it was given (as with runc), and must not hold us up.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(
                [sys.executable, "-m", "capsa", "--root", str(self.root), *args],
                input=input.encode() if input is not None else None,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                cwd=self.bundle,
            )
            out.seek(0)
            err.seek(0)
            return Result(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"))

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
