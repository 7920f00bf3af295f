"""The host end of a container's terminal, and ``--console-socket``.

When ``process.terminal`` is true, runc's contract (runc
``docs/terminals.md``) is that the runtime makes a pseudo-terminal and hands
its *master* to whoever listens on ``--console-socket``: one ``sendmsg`` on a
``SOCK_STREAM`` unix socket whose ancillary data is ``SCM_RIGHTS`` with the
single master fd, and whose body is the master's file name (runc
``libcontainer/utils`` ``SendFile``/``SendRawFd``: the name of the file the
master was opened from, ``/dev/ptmx`` for a pty from ``openpty``; receivers
such as conmon and containerd's go-runc read the name and ignore it).

In capsa the container's real terminal is a pty in the guest, where crun
gives the process its controlling terminal and the line discipline does
echo, signals and line editing.  The host pty made here only carries bytes
between the engine and the shim, so its slave is put in raw mode: a second
line discipline would echo twice and translate newlines twice.  The shim
takes the slave as its controlling terminal so that the kernel sends it
SIGWINCH when the engine resizes the master (TIOCSWINSZ on the master); it
then reads the size with :func:`window_size` and forwards it to the guest.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Iterator

from capsa.errors import CapsaError

PTMX_NAME = "/dev/ptmx"
"""What runc sends as the message body: the name of the master's file."""

MAX_NAME_LEN = 4096
"""runc's limit on that name (``utils.MaxNameLen``); receivers size their buffer by it."""

MAX_SOCKET_PATH = 107
"""The longest path ``connect`` takes: sun_path is 108 bytes with its NUL (unix(7))."""

_WINSIZE = struct.Struct("HHHH")  # struct winsize: ws_row, ws_col, ws_xpixel, ws_ypixel


def open_pty() -> tuple[int, int]:
    """A new pseudo-terminal ``(master, slave)``, slave in raw mode; both fds close-on-exec.

    ``os.openpty`` opens the slave with ``O_NOCTTY`` (glibc ``openpty``), so
    making it does not give the caller a controlling terminal by accident.
    """
    master, slave = os.openpty()
    try:
        make_raw(slave)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def make_raw(fd: int) -> None:
    """Apply glibc's ``cfmakeraw`` to the terminal: no echo, no line editing, no translation.

    Python 3.11's ``tty.setraw`` leaves IGNBRK, PARMRK, INLCR, IGNCR and
    ECHONL alone; cfmakeraw clears them, so a CR from the engine is not
    turned into a newline on its way to the guest.
    """
    try:
        attrs = termios.tcgetattr(fd)
        iflag, oflag, cflag, lflag = attrs[0], attrs[1], attrs[2], attrs[3]
        iflag &= ~(
            termios.IGNBRK
            | termios.BRKINT
            | termios.PARMRK
            | termios.ISTRIP
            | termios.INLCR
            | termios.IGNCR
            | termios.ICRNL
            | termios.IXON
        )
        oflag &= ~termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        cflag &= ~(termios.CSIZE | termios.PARENB)
        cflag |= termios.CS8
        attrs[0:4] = [iflag, oflag, cflag, lflag]
        cc = list(attrs[6])
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        attrs[6] = cc
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error as exc:
        raise CapsaError(f"cannot put the terminal in raw mode: {exc.args[-1]}") from exc


def connect_unix(sock: socket.socket, path: str) -> None:
    """``sock.connect(path)``, for a path of any length.

    ``sockaddr_un.sun_path`` holds 107 bytes and a NUL (unix(7)); engines
    pick the console socket's path and may pick a longer one.  Then the
    socket is reached through its directory, opened with ``O_PATH``, as
    ``/proc/self/fd/N/NAME``: the kernel resolves that path like any other,
    with the caller's own permissions on every component.
    """
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


def send_console(socket_path: str, master_fd: int, name: str = PTMX_NAME) -> None:
    """Hand ``master_fd`` to the listener on ``socket_path``, as runc does for ``--console-socket``.

    One message: body ``name``, ancillary data ``SCM_RIGHTS`` with the one
    fd.  The caller keeps its own copy of the fd and may close it afterwards.
    """
    encoded = name.encode()
    if not encoded or len(encoded) >= MAX_NAME_LEN:
        # An empty body would send no message at all on a stream socket.
        raise ValueError(f"console name must be 1 to {MAX_NAME_LEN - 1} bytes")
    rights = array.array("i", [master_fd])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            connect_unix(sock, socket_path)
            sent = sock.sendmsg([encoded], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights.tobytes())])
    except OSError as exc:
        raise CapsaError(f"cannot send the console to {socket_path}: {exc.strerror or exc}") from exc
    if sent != len(encoded):
        raise CapsaError(f"cannot send the console to {socket_path}: short write ({sent} of {len(encoded)} bytes)")


def take_controlling_terminal(slave_fd: int) -> None:
    """Make ``slave_fd`` the calling process's controlling terminal (setsid + TIOCSCTTY).

    A process can only acquire a controlling terminal as the leader of a
    session without one (credentials(7)), so the caller becomes a session
    leader first unless it already is one.  Afterwards the process is in the
    terminal's foreground process group and gets SIGWINCH when the master
    is resized.  Call it in the shim before anything else starts, since
    ``setsid`` fails for a process group leader.
    """
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
        fcntl.ioctl(slave_fd, termios.TIOCSCTTY, 0)
    except OSError as exc:
        raise CapsaError(f"cannot take the terminal as controlling terminal: {exc.strerror or exc}") from exc


def window_size(fd: int) -> tuple[int, int]:
    """The terminal's size as ``(rows, cols)`` (TIOCGWINSZ; either end of a pty answers)."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE.size))
    except OSError as exc:
        raise CapsaError(f"cannot read the terminal size: {exc.strerror or exc}") from exc
    rows, cols, _, _ = _WINSIZE.unpack(packed)
    return rows, cols


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """Resize the terminal (TIOCSWINSZ), e.g. to ``process.consoleSize`` before handing it out."""
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))
    except OSError as exc:
        raise CapsaError(f"cannot set the terminal size: {exc.strerror or exc}") from exc
    except struct.error as exc:
        raise ValueError(f"terminal size {rows}x{cols} out of range") from exc


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """Put the caller's terminal in raw mode: the guest's pty does the line discipline."""
    if fd is None or not os.isatty(fd):
        yield
        return
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
