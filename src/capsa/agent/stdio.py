"""The stdio of container processes, owned by the agent.

Each process gets pipes the agent holds the other end of (or a pty master
that crun passes over the console socket when ``process.terminal`` is set).
Output is read continuously into a bounded per-stream buffer, so what a
short-lived container prints before the host asks for it is kept; once the
buffer is full the agent stops reading (the pipe fills, the writer blocks)
until the host drains it.  ``read`` blocks until at least one byte or EOF,
the contract of ReadStdout/ReadStderr in agent.proto.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from dataclasses import dataclass, field

from capsa.errors import WrongState

log = logging.getLogger("capsa.agent")

OUTPUT_BUFFER_LIMIT = 1 << 20
READ_CHUNK = 65536
DEFAULT_READ_SIZE = 65536
# VEOF of a terminal in canonical mode (^D): the only "close" a pty has.
TTY_EOF = b"\x04"


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
    """Wait until ``fd`` is writable (or readable) by the event loop's poller."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class StreamClosed(WrongState):
    """Writing to a stdin that was closed, by the host or by the process."""


class OutputStream:
    """stdout or stderr of one process (or its pty master), buffered."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, limit: int = OUTPUT_BUFFER_LIMIT) -> None:
        self._loop = loop
        self._fd: int | None = fd
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._reading = False
        self._waiters: list[asyncio.Future[None]] = []
        #: Set once a read returned end of file (or the stream was closed):
        #: the reader has had everything.
        self.drained = asyncio.Event()
        os.set_blocking(fd, False)
        self._resume()

    @property
    def eof(self) -> bool:
        """True once the writers are gone and everything buffered was read."""
        return self._eof and not self._buffer

    def _resume(self) -> None:
        if self._fd is not None and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._fd is not None and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            # A pty master reads EIO once the last slave fd is closed: that
            # is the terminal's end of file.  Any other error ends the stream
            # too (raising here would only make the event loop call again).
            if exc.errno != errno.EIO:
                log.warning("reading container output failed: %s", exc)
            chunk = b""
        if chunk:
            self._buffer += chunk
            if len(self._buffer) >= self._limit:
                self._pause()
        else:
            self._eof = True
            self._close_fd()
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def read(self, size: int = DEFAULT_READ_SIZE) -> bytes:
        """Up to ``size`` bytes, blocking until at least one; b"" is EOF."""
        if size <= 0:
            size = DEFAULT_READ_SIZE
        while not self._buffer and not self._eof:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        if len(self._buffer) < self._limit:
            self._resume()
        if not data:
            self.drained.set()
        return data

    def _close_fd(self) -> None:
        self._pause()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Stop reading and drop what is buffered; pending reads see EOF."""
        self._close_fd()
        self._eof = True
        self._buffer.clear()
        self.drained.set()
        self._wake()


class InputStream:
    """stdin of one process: the write end of its pipe, or the pty master."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, is_tty: bool = False) -> None:
        self._loop = loop
        self._fd: int | None = fd
        self._is_tty = is_tty
        os.set_blocking(fd, False)

    @property
    def closed(self) -> bool:
        return self._fd is None

    async def write(self, data: bytes) -> int:
        """Write all of ``data``; returns its length."""
        view = memoryview(data)
        while view:
            if self._fd is None:
                raise StreamClosed("stdin is closed")
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await self._writable()
                continue
            except (BrokenPipeError, OSError) as exc:
                if isinstance(exc, BrokenPipeError) or exc.errno == errno.EIO:
                    raise StreamClosed("the process closed its stdin") from exc
                raise
            view = view[written:]
        return len(data)

    async def _writable(self) -> None:
        assert self._fd is not None
        await wait_fd(self._loop, self._fd, writable=True)

    def close(self) -> None:
        """Give the process end of file on stdin.

        A pipe is closed.  A pty cannot be half-closed: the terminal's EOF
        character is written instead, which a reader in canonical mode sees
        as end of file (what a user's ^D does).
        """
        if self._fd is None:
            return
        if self._is_tty:
            with contextlib.suppress(OSError):
                os.write(self._fd, TTY_EOF)
        os.close(self._fd)
        self._fd = None


@dataclass(eq=False)
class ProcessIO:
    """The agent's ends of one process's stdio."""

    stdin: InputStream
    stdout: OutputStream
    stderr: OutputStream | None  # None with a terminal: the pty carries both
    tty: int | None = None  # the pty master, kept for TIOCSWINSZ

    def resize(self, rows: int, columns: int) -> None:
        """TIOCSWINSZ on the pty (tty_ioctl(4)); the kernel sends SIGWINCH."""
        if self.tty is None:
            raise WrongState("the process has no terminal")
        fcntl.ioctl(self.tty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def close(self) -> None:
        self.stdin.close()
        self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()
        if self.tty is not None:
            os.close(self.tty)
            self.tty = None


@dataclass
class Pipes:
    """Fresh stdio pipes for a process crun is about to start.

    The ``child_*`` ends go to crun (and through it to the container); the
    agent closes its copies once crun ran, so EOF on stdout/stderr means
    the container side is gone.
    """

    child_stdin: int
    child_stdout: int
    child_stderr: int
    parent_stdin: int
    parent_stdout: int
    parent_stderr: int
    _closed: set[int] = field(default_factory=set)

    @classmethod
    def open(cls) -> Pipes:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        return cls(stdin_r, stdout_w, stderr_w, stdin_w, stdout_r, stderr_r)

    def close_child_ends(self) -> None:
        for fd in (self.child_stdin, self.child_stdout, self.child_stderr):
            self._close(fd)

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in (self.parent_stdin, self.parent_stdout, self.parent_stderr):
            self._close(fd)

    def _close(self, fd: int) -> None:
        if fd not in self._closed:
            self._closed.add(fd)
            os.close(fd)

    def into_io(self, loop: asyncio.AbstractEventLoop) -> ProcessIO:
        """Hand the agent's ends over to a ProcessIO (which then owns them)."""
        self.close_child_ends()
        self._closed.update((self.parent_stdin, self.parent_stdout, self.parent_stderr))
        return ProcessIO(
            stdin=InputStream(loop, self.parent_stdin),
            stdout=OutputStream(loop, self.parent_stdout),
            stderr=OutputStream(loop, self.parent_stderr),
        )


def terminal_io(loop: asyncio.AbstractEventLoop, master: int) -> ProcessIO:
    """ProcessIO over a pty master: output and input share it, no stderr."""
    return ProcessIO(
        stdin=InputStream(loop, os.dup(master), is_tty=True),
        stdout=OutputStream(loop, os.dup(master)),
        stderr=None,
        tty=master,
    )


class ConsoleSocket:
    """The ``--console-socket`` crun sends the pty master to.

    runtime-spec (runc's console socket protocol, which crun follows): the
    runtime connects to this AF_UNIX socket and sends the master fd as
    SCM_RIGHTS ancillary data.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    async def receive(self) -> int:
        """Accept crun's connection and return the fd it passed."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                except BlockingIOError:
                    await wait_fd(loop, conn.fileno(), writable=False)
                    continue
                if not fds:
                    raise OSError(errno.EPROTO, "crun closed the console socket without sending a terminal")
                for extra in fds[1:]:
                    os.close(extra)
                return fds[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
