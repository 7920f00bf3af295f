"""``capsa debug-console`` in real guests: a command runs in the guest, outside the container,
when the configuration allows it, and is refused (one line, nothing started) when the
configuration or the agent policy says no."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest
from harness import Capsa

pytestmark = pytest.mark.vm

NO_DEBUG_CONSOLE = """\
version = 1

[[rule]]
name = "no-debug-console"
rpc = ["DebugConsole"]
action = "deny"
"""


def config(tmp_path: Path, debug_console: bool, policy: str | None = None) -> str:
    text = f"[runtime]\ndebug_console = {'true' if debug_console else 'false'}\n"
    if policy is not None:
        policy_file = tmp_path / "policy.toml"
        policy_file.write_text(policy)
        text += f'\n[agent]\npolicy = "{policy_file}"\n'
    path = tmp_path / f"configuration-{len(list(tmp_path.glob('configuration-*')))}.toml"
    path.write_text(text)
    return str(path)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def start_sleeper(capsa: Capsa, config_file: str, cid: str) -> None:
    capsa.spec(["sleep", "600"])
    created = capsa("--config", config_file, "create", "--bundle", str(capsa.bundle), cid)
    assert created.code == 0, created.stderr
    assert capsa("start", cid).code == 0


def test_a_command_runs_in_the_guest_outside_the_container(capsa: Capsa, tmp_path: Path) -> None:
    allowed = config(tmp_path, debug_console=True)
    start_sleeper(capsa, allowed, "dc1")
    try:
        # PID 1 here is the agent, not the container's sleep: this is the guest's PID namespace.
        init = capsa("--config", allowed, "debug-console", "dc1", "cat", "/proc/1/cmdline")
        assert init.code == 0, init.stderr
        assert init.stdout.split("\0")[:3] == ["/usr/bin/python3.11", "-SIB", "/init"]
        in_container = capsa("exec", "dc1", "cat", "/proc/1/cmdline")
        assert in_container.stdout.split("\0")[0] == "sleep"
        # The guest's mounts: the share the container's rootfs comes from.
        shared = capsa("--config", allowed, "debug-console", "dc1", "ls", "/run/capsa/shared")
        assert "dc1" in shared.stdout.split()
        # The status is the command's; stdin that is not a terminal is a pipe.
        assert capsa("--config", allowed, "debug-console", "dc1", "sh", "-c", "exit 7").code == 7
        piped = capsa("--config", allowed, "debug-console", "dc1", input="uname -r; echo $((6*7))\n")
        assert piped.code == 0, piped.stderr
        assert piped.stdout.splitlines()[1:] == ["42"]
        assert piped.stdout.endswith("42\n") and "capsa" in piped.stdout.splitlines()[0]
        # The shell came from the host and stays read-only there.
        busybox = "/run/capsa/shared/capsa:debug/busybox"
        refused_write = capsa("--config", allowed, "debug-console", "dc1", "chmod", "700", busybox)
        assert refused_write.code != 0 and "Read-only file system" in refused_write.stderr
        assert capsa.status("dc1") == "running"
    finally:
        capsa("delete", "--force", "dc1")


def test_a_terminal_when_stdin_is_one(capsa: Capsa, tmp_path: Path) -> None:
    allowed = config(tmp_path, debug_console=True)
    start_sleeper(capsa, allowed, "dc2")
    try:
        pid, fd = pty.fork()
        if pid == 0:  # the child: capsa with the pty as its terminal
            os.chdir(capsa.bundle)
            os.execv(sys.executable, capsa.argv("--config", allowed, "debug-console", "dc2"))
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        deadline = time.monotonic() + 60
        # Typed once the prompt is there: going raw, capsa flushes what was typed before.
        output = read_until(fd, b"debug-console:/# ", deadline)
        os.write(fd, b"tty; stty size; echo done-$((6*7)); exit 5\n")
        output += read_until(fd, b"done-42", deadline)
        status = reap(pid, deadline)
        os.close(fd)
        text = output.replace(b"\r", b"").decode(errors="replace")
        assert os.WEXITSTATUS(status) == 5, text
        assert "/dev/pts/" in text  # the guest's own pty
        assert "33 111" in text  # our window size
        assert "debug-console:/# " in text  # the prompt says where we are
    finally:
        capsa("delete", "--force", "dc2")


def read_until(fd: int, wanted: bytes, deadline: float) -> bytes:
    """What the terminal shows until ``wanted`` appears, it closes, or the deadline passes."""
    output = b""
    while wanted not in output and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            output += chunk
    return output


def reap(pid: int, deadline: float) -> int:
    """The child's wait status; past the deadline it is hung up on (SIGHUP ends the guest shell too)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, signal.SIGHUP)
    return os.waitpid(pid, 0)[1]


def test_refused_when_the_configuration_does_not_allow_it(capsa: Capsa, tmp_path: Path) -> None:
    off = config(tmp_path, debug_console=False)
    start_sleeper(capsa, off, "dc3")
    try:
        refused = capsa("--config", off, "debug-console", "dc3", "uname", "-r")
        assert refused.code != 0
        assert one_line(refused.stderr) == (
            "capsa: debug-console: the configuration does not allow it ([runtime] debug_console = false)"
        )
        # Allowing it later does not open a sandbox created without it: the guest refuses.
        on = config(tmp_path, debug_console=True)
        refused_by_guest = capsa("--config", on, "debug-console", "dc3", "uname", "-r")
        assert refused_by_guest.code != 0
        assert "the debug console is off in this sandbox" in one_line(refused_by_guest.stderr)
        assert refused_by_guest.stdout == ""
        assert capsa.status("dc3") == "running"
    finally:
        capsa("delete", "--force", "dc3")


def test_refused_by_an_agent_policy_that_denies_it(capsa: Capsa, tmp_path: Path) -> None:
    denied = config(tmp_path, debug_console=True, policy=NO_DEBUG_CONSOLE)
    start_sleeper(capsa, denied, "dc4")
    try:
        refused = capsa("--config", denied, "debug-console", "dc4", "uname", "-r")
        assert refused.code != 0
        assert refused.stdout == ""
        assert one_line(refused.stderr) == 'capsa: DebugConsole refused by the agent policy (rule "no-debug-console")'
        # The container is unaffected, and what the policy allows still works.
        assert capsa("exec", "dc4", "echo", "still").stdout == "still\n"
    finally:
        capsa("delete", "--force", "dc4")
