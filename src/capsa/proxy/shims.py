"""What capsa-proxy serves on ``shim.sock``: the relay of each process a capsa-shim stands for.

The protocol is shim/link.py's.  For each shim that connects: its three
stdio descriptors, its request (an ``exec``'s process is started in the
guest here), ``ok`` or the error, then :func:`capsa.shim.relay.relay` with
the shim's signals and window changes as its controls, and finally the
exit status, sent after our copies of the stdio are closed.

When the VM goes away under a relay (the agent connection closes), the
status is :data:`~capsa.shim.link.VM_LOST_STATUS`; once the proxy has
stopped and recorded why the VM stopped by itself (:data:`STOPPED_FILE`,
a guest panic...), that reason is written on the process's stderr, which
is what an engine shows with the exit status, before the status goes out.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from capsa.agent.stdio import wait_fd
from capsa.errors import AgentError, AgentGone, CapsaError
from capsa.proxy.launch import read_stopped
from capsa.shim import link
from capsa.shim.relay import Control, ProcessIO, relay, write_all

if TYPE_CHECKING:
    from capsa.proxy.proxy import Proxy

log = logging.getLogger("capsa.proxy")

#: The descriptors a shim sends: its stdin, stdout and stderr.
STDIO_FDS = 3
#: How long, after the proxy stopped its VM, a relay still waits to tell its shim.
CLOSE_TIMEOUT = 10.0


class ShimRelays:
    """The listener on ``shim.sock`` and the relays of the shims that connected."""

    def __init__(self, proxy: Proxy, path: Path) -> None:
        self.proxy = proxy
        self.path = path
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._relays: set[asyncio.Task[None]] = set()
        # Set once the proxy stopped its VM and recorded why (Proxy.stop).
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept(listener))

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """After the proxy stopped: let every relay tell its shim how it ended (within ``timeout``), then stop."""
        self._stopped.set()
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._relays:
            await asyncio.wait(set(self._relays), timeout=timeout)
        for task in list(self._relays):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(listener)
            task = asyncio.ensure_future(self._serve(connection))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    async def _serve(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            lines = link.Lines()
            data, fds = await _receive_with_fds(loop, connection)
            pending = lines.feed(data)
            while not pending:
                data = await loop.sock_recv(connection, 65536)
                if not data:
                    return  # the shim went away before it asked
                pending = lines.feed(data)
            request = pending.pop(0)
            try:
                process = await self._take(request, fds)
            except (CapsaError, ValueError, TypeError) as exc:
                await loop.sock_sendall(connection, link.encode({"error": str(exc)}))
                return
            await loop.sock_sendall(connection, link.encode({"ok": True}))
            status = await self._relay(connection, lines, pending, process)
            if status is None:
                return
            # The engine sees the end of the process's pipes once the shim
            # exits: nothing of ours may keep them open past that.
            for fd in fds:
                os.close(fd)
            fds = []
            await loop.sock_sendall(connection, link.encode({"status": status}))
        except (OSError, ValueError) as exc:
            log.warning("a shim's connection failed: %s", exc)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            connection.close()

    async def _take(self, request: link.Message, fds: list[int]) -> tuple[str, str, ProcessIO]:
        """The process a shim stands for, started in the guest if it is an ``exec``'s."""
        if len(fds) != STDIO_FDS:
            raise ValueError(f"a shim sent {len(fds)} descriptors, not its stdin, stdout and stderr")
        container_id, exec_id = str(request["id"]), str(request.get("exec_id") or "")
        process = request.get("process")
        if process is not None:
            if not isinstance(process, dict):
                raise ValueError("the process is not a JSON object")
            await self.proxy.agent.exec_process(container_id, exec_id, process)
        io = ProcessIO(
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            terminal=bool(request.get("terminal")),
            winsize_fd=fds[0] if request.get("winch") else None,
            forward_signals=False,
        )
        return container_id, exec_id, io

    async def _relay(
        self,
        connection: socket.socket,
        lines: link.Lines,
        pending: list[link.Message],
        process: tuple[str, str, ProcessIO],
    ) -> int | None:
        """Relay until the process exits (its status) or the shim goes away (None)."""
        container_id, exec_id, io = process
        controls: asyncio.Queue[Control] = asyncio.Queue()
        relaying = asyncio.ensure_future(relay(self.proxy.agent, container_id, exec_id, io, controls))
        listening = asyncio.ensure_future(_follow(connection, lines, pending, controls))
        try:
            await asyncio.wait({relaying, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            shim_gone = not relaying.done()
            for task in (relaying, listening):
                task.cancel()
            for task in (relaying, listening):
                with contextlib.suppress(asyncio.CancelledError, CapsaError):
                    await task
        if shim_gone:
            log.info("the shim of %s %s went away: relay ended", container_id, exec_id or "(init)")
            return None
        try:
            return relaying.result()
        except AgentGone as exc:
            log.info("lost %s %s: %s", container_id, exec_id or "(init)", exc)
            stopped = await self._why_the_vm_stopped()
            if stopped is not None:
                write_all(io.stderr, f"capsa: the container's VM stopped: {stopped}\n".encode())
        except AgentError as exc:
            log.error("lost %s %s: %s", container_id, exec_id or "(init)", exc)
        return link.VM_LOST_STATUS

    async def _why_the_vm_stopped(self) -> str | None:
        """What the proxy recorded once its VM stopped by itself; None when it was asked to stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), CLOSE_TIMEOUT)
        return read_stopped(self.proxy.run_dir)


async def _follow(
    connection: socket.socket, lines: link.Lines, pending: list[link.Message], controls: asyncio.Queue[Control]
) -> None:
    """The shim's signals and window changes, onto ``controls``, until it goes away."""
    loop = asyncio.get_running_loop()
    while True:
        for message in pending:
            if message.get("winch"):
                controls.put_nowait(Control(winch=True))
            signum = message.get("signal")
            if isinstance(signum, int) and signum > 0:
                controls.put_nowait(Control(signal=signum))
        pending.clear()
        try:
            data = await loop.sock_recv(connection, 4096)
        except OSError:
            return
        if not data:
            return
        try:
            pending.extend(lines.feed(data))
        except ValueError as exc:
            log.warning("a shim sent what is not a message: %s", exc)
            return


async def _receive_with_fds(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> tuple[bytes, list[int]]:
    """The first bytes a shim sent and the descriptors that came with them (close-on-exec)."""
    space = socket.CMSG_SPACE(STDIO_FDS * array.array("i").itemsize)
    while True:
        try:
            data, ancillary, flags, _ = connection.recvmsg(65536, space, socket.MSG_CMSG_CLOEXEC)
            break
        except BlockingIOError:
            await wait_fd(loop, connection.fileno(), writable=False)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ValueError("a shim sent more descriptors than its stdio")
    return data, fds
