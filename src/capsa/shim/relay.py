"""Relaying one guest process's stdio, signals and window size, until it exits.

The host side of a process is three file descriptors: the stdio the engine
gave ``capsa create``/``capsa exec`` (pipes, files, /dev/null), or the slave
side of a host pty whose master went to the engine over the console socket.
A thread reads stdin (it may be a pipe, a file or a terminal, which asyncio
cannot all watch) and forwards it with ``WriteStdin``; ``ReadStdout`` and
``ReadStderr`` loops copy the process's output out, each written by a
thread of the relay's own (a reader that stops reading blocks only its own
process, not the others a proxy or shim v2 relays); signals go to the guest
process (``SignalProcess``), and a changed window size becomes
``TtyWinResize``.  ``WaitProcess`` gives the exit status: the exit code, or
128+N when signal N killed it.

Signals and window changes come either to the relaying process itself
(``ProcessIO.forward_signals``: the debug console) or as :class:`Control`
items on a queue (the proxy, for a capsa-shim: shim/link.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from capsa.errors import AgentError, CapsaError
from capsa.runtime.agent_client import AgentClient
from capsa.shim.console import window_size
from capsa.shim.link import FORWARDED_SIGNALS


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
    # The signals this process receives go to the guest process (without a control queue).
    forward_signals: bool = True


@dataclass(frozen=True)
class Control:
    """For the guest process: a signal (``signal`` > 0), or the window size read again (``winch``)."""

    signal: int = 0
    winch: bool = False


async def relay(
    agent: AgentClient,
    container_id: str,
    exec_id: str,
    io: ProcessIO,
    controls: asyncio.Queue[Control] | None = None,
) -> int:
    """Copy stdio both ways and forward signals until the process exits; return its status.

    With ``controls``, signals and window changes are what arrives there;
    without, what this process receives (if ``io.forward_signals``).
    """
    loop = asyncio.get_running_loop()
    writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="capsa-out")

    async def copy_out(read: Callable[[str, str], Awaitable[bytes]], fd: int) -> None:
        while True:
            data = await read(container_id, exec_id)
            if not data:
                return
            await loop.run_in_executor(writers, write_all, fd, data)

    async def resize() -> None:
        if io.winsize_fd is None:
            return
        rows, columns = window_size(io.winsize_fd)
        if rows and columns:
            with contextlib.suppress(AgentError):
                await agent.tty_win_resize(container_id, exec_id, rows, columns)

    async def follow(queue: asyncio.Queue[Control]) -> None:
        await resize()
        while True:
            control = await queue.get()
            if control.winch:
                await resize()
            elif control.signal > 0:
                with contextlib.suppress(AgentError):
                    await agent.signal_process(container_id, exec_id, control.signal)

    queue = controls
    handled: list[int] = []
    if queue is None:
        queue = asyncio.Queue()
        if io.forward_signals:
            handled += FORWARDED_SIGNALS
        if io.terminal and io.winsize_fd is not None:
            handled.append(signal.SIGWINCH)
        for sig in handled:
            control = Control(winch=True) if sig == signal.SIGWINCH else Control(signal=sig)
            loop.add_signal_handler(sig, queue.put_nowait, control)

    stdin = StdinPump(loop, agent, container_id, exec_id, io.stdin)
    helpers = [asyncio.ensure_future(follow(queue))]
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
        for sig in handled:
            loop.remove_signal_handler(sig)
        for task in helpers + outputs:
            task.cancel()
        for task in helpers + outputs:
            with contextlib.suppress(asyncio.CancelledError, CapsaError):
                await task
        # A write to a reader that stopped reading stays blocked in its thread; nobody waits for it.
        writers.shutdown(wait=False)
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
        self._wake = -1

    def start(self) -> None:
        # Our end of a pipe whose other end the thread watches with stdin: stop() wakes it.
        wake, self._wake = os.pipe()
        threading.Thread(target=self._read, args=(wake,), name="capsa-stdin", daemon=True).start()
        self._task = asyncio.ensure_future(self._send())

    def stop(self) -> None:
        """Stop sending, and end the thread even if stdin never ends (a proxy outlives its processes)."""
        if self._task is not None:
            self._task.cancel()
        wake, self._wake = self._wake, -1
        if wake >= 0:
            with contextlib.suppress(OSError):
                os.write(wake, b"x")
            os.close(wake)

    def _read(self, wake: int) -> None:
        fd = self._fd
        opened = isinstance(fd, str)
        if isinstance(fd, str):
            try:
                fd = os.open(fd, os.O_RDONLY | os.O_CLOEXEC) if fd else -1
            except OSError:
                fd = -1
        try:
            while True:
                data = b""
                if fd >= 0:
                    try:
                        readable, _, _ = select.select([fd, wake], [], [])
                        if wake in readable:
                            return
                        data = os.read(fd, 65536)
                    except (OSError, ValueError):
                        data = b""
                try:
                    asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
                except (RuntimeError, asyncio.CancelledError, Exception):
                    return
                if not data:
                    return
        finally:
            os.close(wake)
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
