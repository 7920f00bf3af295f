"""What the VM tests share: a busybox bundle, a private state root, a way to call
capsa, and a check that nothing (process, mount, file) outlives a test."""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from capsa.cli.spec import default_spec
from capsa.config import load_config
from capsa.runtime.state import OWNER_LINK, SOCKET_ROOT

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "cat", "echo", "true", "false", "uname", "sleep", "kill", "grep", "wc", "head", "ls", "env", "id"]
APPLETS += ["stty", "hostname", "pwd", "tty"]


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

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "capsa", "--root", str(self.root), *args]

    def popen(
        self,
        *args: str,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """capsa with the stdio the caller chooses (what an engine hands `create` or `exec`); /dev/null by default.

        Not pipes unless the caller drains them: a shim inherits them and outlives the command.
        """
        return subprocess.Popen(
            self.argv(*args),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            cwd=self.bundle,
        )

    def state(self, container_id: str) -> dict[str, Any]:
        result = self("state", container_id)
        assert result.code == 0, result.stderr
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    def status(self, container_id: str) -> str:
        return str(self.state(container_id)["status"])


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


def socket_dirs(root: Path) -> set[str]:
    """The socket directories of the containers under ``root`` (runtime/state.py):
    named by a hash, each links back to its state directory."""
    found = set()
    try:
        entries = os.listdir(SOCKET_ROOT)
    except FileNotFoundError:
        return set()
    for entry in entries:
        try:
            owner = os.readlink(SOCKET_ROOT / entry / OWNER_LINK)
        except OSError:
            continue
        if Path(owner).parent == root:
            found.add(entry)
    return found


def kill_leftovers(root: Path) -> None:
    """End what a failed test left under ``root``, and remove its socket directories."""
    for name in socket_dirs(root):
        shutil.rmtree(SOCKET_ROOT / name, ignore_errors=True)
    needle = str(root).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"pytest" not in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this process a child subreaper, as conmon and containerd's runc shim are.

    `capsa create` exits and leaves the shim behind; with this, the shim (and
    any other orphan of ours) becomes our child, so its exit status can be
    read with waitpid, which is how an engine learns the container's status.
    Orphans still unreaped at the end are reaped; the flag is cleared again.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass


def wait_child(pid: int, timeout: float) -> int:
    """Wait for a child (or adopted orphan); its status as a shell reports it (128+N for signal N)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still runs after {timeout:.0f} s")
        time.sleep(0.05)


def vm_processes(capsa: Capsa, cid: str) -> dict[str, int]:
    """The host processes behind a container, from its state.json."""
    state = json.loads((capsa.root / cid / "state.json").read_text())
    return {
        "proxy": state["proxy_pid"],
        "qemu": state["hypervisor_pid"],
        "virtiofsd": state["virtiofsd_pid"],
        "shim": state["pid"],
    }


def is_running(pid: int) -> bool:
    """A live process (a zombie that nobody reaped yet is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ConsoleSocket:
    """The engine's end of `--console-socket`: receives the pty master over SCM_RIGHTS (runc docs/terminals.md)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)

    def receive(self, timeout: float = 60) -> tuple[str, int]:
        """The message body (the master's file name) and the master fd."""
        self._sock.settimeout(timeout)
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(timeout)
            fds = array.array("i")
            body, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        assert len(fds) == 1, f"expected one fd, got {list(fds)}"
        return body.decode(), fds[0]

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


def read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    """Read from ``fd`` until ``marker`` shows up; everything read so far."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} within {timeout:.0f} s; got {data[-500:]!r}")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the pty's other side is gone
                chunk = b""
            if not chunk:
                raise EOFError(f"EOF before {marker!r}; got {data[-500:]!r}")
            data += chunk
    return data


#: A scrape of capsa-monitor: (sample name, its labels) → value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def start_monitor(
    root: Path, log: Path, *, cache_seconds: float, agent_timeout: float, scrape_timeout: float
) -> tuple[subprocess.Popen[bytes], str]:
    """``capsa-monitor`` on an ephemeral port of 127.0.0.1, searching ``root`` too; its URL.

    Its stderr goes to ``log`` (a pipe nobody reads would fill and stop it);
    the first line there names the port it took.
    """
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "capsa.monitor",
                "--listen-address",
                "127.0.0.1:0",
                "--root",
                str(root),
                "--cache-seconds",
                str(cache_seconds),
                "--agent-timeout",
                str(agent_timeout),
                "--scrape-timeout",
                str(scrape_timeout),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while True:
        first = log.read_text(errors="replace").partition("\n")
        if first[1] and "serving http://127.0.0.1:" in first[0]:
            return proc, first[0].split("serving ", 1)[1].strip()
        if first[1] or proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"capsa-monitor did not start: {log.read_text(errors='replace')[-2000:]!r}")
        time.sleep(0.05)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=60) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
