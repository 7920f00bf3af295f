"""The host pty and --console-socket: real ptys, real unix sockets, a real child for SIGWINCH."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import termios
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsa.errors import CapsaError
from capsa.shim.console import PTMX_NAME, open_pty, send_console, set_window_size, window_size


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = open_pty()
    yield master, slave
    os.close(master)
    os.close(slave)


def read_some(fd: int, timeout: float = 5.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "nothing to read"
    return os.read(fd, 4096)


def nothing_to_read(fd: int) -> bool:
    ready, _, _ = select.select([fd], [], [], 0.2)
    return not ready


def test_slave_is_raw(pty: tuple[int, int]) -> None:
    master, slave = pty
    iflag, oflag, cflag, lflag, *_ = termios.tcgetattr(slave)
    assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN | termios.ECHONL)
    assert not iflag & (termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON | termios.ISTRIP)
    assert not oflag & termios.OPOST
    assert cflag & termios.CSIZE == termios.CS8
    # Behaviour, not just flags: CR and ^C pass through untouched, nothing is echoed back.
    os.write(master, b"a\r\x03b")
    data = b""
    while len(data) < 4:
        data += read_some(slave)
    assert data == b"a\r\x03b"
    assert nothing_to_read(master)
    os.write(slave, b"x\n")
    assert read_some(master) == b"x\n"  # no OPOST: no \r\n translation


def test_fds_are_not_inherited(pty: tuple[int, int]) -> None:
    assert not os.get_inheritable(pty[0])
    assert not os.get_inheritable(pty[1])


def test_send_console_hands_over_a_working_master(tmp_path: Path, pty: tuple[int, int]) -> None:
    master, slave = pty
    path = str(tmp_path / "console.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        send_console(path, master, PTMX_NAME)
        conn, _ = listener.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    assert message == b"/dev/ptmx"
    assert len(fds) == 1
    received = fds[0]
    try:
        assert os.isatty(received)
        os.write(received, b"to the container")
        assert read_some(slave) == b"to the container"
        os.write(slave, b"from the container")
        assert read_some(received) == b"from the container"
    finally:
        os.close(received)


def test_send_console_reaches_a_socket_past_the_sun_path_limit(tmp_path: Path, pty: tuple[int, int]) -> None:
    # An engine may put its console socket under a directory of any length.
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    path = deep / "console.sock"
    assert len(str(path)) > 240
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        # The test binds it the same way, through its directory.
        fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
        try:
            listener.bind(f"/proc/self/fd/{fd}/console.sock")
        finally:
            os.close(fd)
        listener.listen(1)
        send_console(str(path), pty[0], PTMX_NAME)
        conn, _ = listener.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    assert message == b"/dev/ptmx"
    assert len(fds) == 1
    os.close(fds[0])


def test_send_console_error_is_one_line(tmp_path: Path, pty: tuple[int, int]) -> None:
    missing = str(tmp_path / "missing.sock")
    with pytest.raises(CapsaError) as info:
        send_console(missing, pty[0], PTMX_NAME)
    assert str(info.value) == f"cannot send the console to {missing}: No such file or directory"


def test_send_console_refuses_an_empty_name(tmp_path: Path, pty: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        send_console(str(tmp_path / "x.sock"), pty[0], "")


def test_window_size_round_trip(pty: tuple[int, int]) -> None:
    master, slave = pty
    set_window_size(master, 33, 120)
    assert window_size(slave) == (33, 120)
    assert window_size(master) == (33, 120)


def test_window_size_of_a_non_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f, pytest.raises(CapsaError, match="cannot read the terminal size"):
        window_size(f.fileno())


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from capsa.shim.console import take_controlling_terminal, window_size
    slave, report = int(sys.argv[1]), int(sys.argv[2])
    got = []
    signal.signal(signal.SIGWINCH, lambda *_: got.append(window_size(slave)))
    take_controlling_terminal(slave)
    assert os.getsid(0) == os.getpid()
    assert os.tcgetpgrp(slave) == os.getpgrp()
    os.write(report, b"ready\\n")
    while not got:
        signal.pause()
    rows, cols = got[0]
    os.write(report, f"{rows} {cols}\\n".encode())
    """
)


def test_sigwinch_reaches_the_process_that_took_the_terminal(pty: tuple[int, int]) -> None:
    master, slave = pty
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(slave), str(write_end)],
        pass_fds=(slave, write_end),
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as report:
            assert report.readline() == b"ready\n", child.stderr.read() if child.stderr else b""
            set_window_size(master, 40, 100)
            assert report.readline() == b"40 100\n"
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr:
            child.stderr.close()


def test_open_pty_gives_no_controlling_terminal() -> None:
    # A session leader without a terminal would acquire one by opening a tty without O_NOCTTY.
    code = textwrap.dedent(
        """
        import os
        from capsa.shim.console import open_pty
        os.setsid()
        open_pty()
        try:
            os.open("/dev/tty", os.O_RDWR)
        except OSError:
            raise SystemExit(0)
        raise SystemExit("open_pty gave us a controlling terminal")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_take_controlling_terminal_error_is_capsa_error() -> None:
    code = textwrap.dedent(
        """
        import os, sys
        from capsa.errors import CapsaError
        from capsa.shim.console import take_controlling_terminal
        r, w = os.pipe()
        try:
            take_controlling_terminal(r)
        except CapsaError as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "cannot take the terminal as controlling terminal: Inappropriate ioctl for device"
