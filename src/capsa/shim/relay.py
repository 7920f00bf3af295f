"""Relaying one guest process's stdio, signals and window size, until it exits.

The host side of a process is three file descriptors: the stdio the engine
gave ``capsa create``/``capsa exec`` (pipes, files, /dev/null), or the slave
side of a host pty whose master went to the engine over the console socket.
A thread reads stdin (it may be a pipe, a file or a terminal, which asyncio
cannot all watch) and forwards it with ``WriteStdin``; ``ReadStdout`` and
``ReadStderr`` loops copy the process's output out; signals that reach the
relaying process go to the guest process (``SignalProcess``), and SIGWINCH
becomes ``TtyWinResize``.  ``WaitProcess`` gives the exit status: the exit
code, or 128+N when signal N killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from capsa.errors import AgentError, CapsaError
from capsa.runtime.agent_client import AgentClient
from capsa.shim.console import window_size

#: The exit status of a process whose fate is unknown because its VM went away.
VM_LOST_STATUS = 255

# runc forwards every signal to a foreground container except these.
_NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE}
FORWARDED_SIGNALS = tuple(
    s for s in signal.valid_signals() if isinstance(s, signal.Signals) and s not in _NOT_FORWARDED
)


@dataclass(frozen=True)
class ProcessIO:
    """Where the guest process's stdio is on the host."""

    # A file descriptor, or the path of a FIFO that the stdin thread opens
    # (blocking until its writer comes; containerd's FIFOs), or "" for none.
    stdin: int | str = 0
    stdout: int = 1
    stderr: int = 2
    terminal: bool = False
    # A terminal whose size is the guest pty's size (SIGWINCH: read it again).
    winsize_fd: int | None = None
    # The signals this process receives go to the guest process (capsa-shim).
    forward_signals: bool = True


async def relay(agent: AgentClient, container_id: str, exec_id: str, io: ProcessIO) -> int:
    """Copy stdio both ways and forward signals until the process exits; return its status."""
    loop = asyncio.get_running_loop()

    async def copy_out(read: Callable[[str, str], Awaitable[bytes]], fd: int) -> None:
        while True:
            data = await read(container_id, exec_id)
            if not data:
                return
            await loop.run_in_executor(None, write_all, fd, data)

    async def forward_signals() -> None:
        pending: list[int] = []
        wake = asyncio.Event()

        def received(signum: int) -> None:
            pending.append(signum)
            wake.set()

        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, received, sig)
        try:
            while True:
                while pending:
                    with contextlib.suppress(AgentError):
                        await agent.signal_process(container_id, exec_id, pending.pop(0))
                wake.clear()
                await wake.wait()
        finally:
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)

    async def forward_winch(fd: int) -> None:
        changed = asyncio.Event()
        loop.add_signal_handler(signal.SIGWINCH, changed.set)
        try:
            while True:
                rows, columns = window_size(fd)
                if rows and columns:
                    with contextlib.suppress(AgentError):
                        await agent.tty_win_resize(container_id, exec_id, rows, columns)
                changed.clear()
                await changed.wait()
        finally:
            loop.remove_signal_handler(signal.SIGWINCH)

    stdin = StdinPump(loop, agent, container_id, exec_id, io.stdin)
    helpers = [asyncio.ensure_future(forward_signals())] if io.forward_signals else []
    if io.terminal and io.winsize_fd is not None:
        helpers.append(asyncio.ensure_future(forward_winch(io.winsize_fd)))
    outputs = [asyncio.ensure_future(copy_out(agent.read_stdout, io.stdout))]
    if not io.terminal:
        outputs.append(asyncio.ensure_future(copy_out(agent.read_stderr, io.stderr)))
    stdin.start()
    try:
        result = await agent.wait_process(container_id, exec_id)
        # Output written just before exit is still in flight: drain it.
        await asyncio.gather(*outputs)
    finally:
        stdin.stop()
        for task in helpers + outputs:
            task.cancel()
        for task in helpers + outputs:
            with contextlib.suppress(asyncio.CancelledError, CapsaError):
                await task
    return int(result.status)


class StdinPump:
    """Forwards a host file descriptor to the process's stdin from a thread.

    The thread hands chunks to the event loop, which sends them in order;
    EOF (or EIO: the engine closed the pty master) becomes ``CloseStdin``.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, agent: AgentClient, container_id: str, exec_id: str, fd: int | str
    ):
        self._loop = loop
        self._agent = agent
        self._id = container_id
        self._exec_id = exec_id
        self._fd = fd
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        threading.Thread(target=self._read, name="capsa-stdin", daemon=True).start()
        self._task = asyncio.ensure_future(self._send())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _read(self) -> None:
        fd = self._fd
        opened = isinstance(fd, str)
        if isinstance(fd, str):
            try:
                fd = os.open(fd, os.O_RDONLY | os.O_CLOEXEC) if fd else -1
            except OSError:
                fd = -1
        try:
            while True:
                try:
                    data = os.read(fd, 65536) if fd >= 0 else b""
                except OSError:
                    data = b""
                try:
                    asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
                except (RuntimeError, asyncio.CancelledError, Exception):
                    return
                if not data:
                    return
        finally:
            if opened and fd >= 0:
                os.close(fd)

    async def _send(self) -> None:
        with contextlib.suppress(AgentError):
            while True:
                data = await self._queue.get()
                if not data:
                    await self._agent.close_stdin(self._id, self._exec_id)
                    return
                await self._agent.write_stdin(self._id, self._exec_id, data)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except (BrokenPipeError, OSError):
            return  # the reader went away: the output has nowhere to go
        view = view[written:]


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
