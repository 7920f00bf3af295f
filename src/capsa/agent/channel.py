"""The agent channel: where the host's ttrpc connection reaches the agent.

- ``serial``: a virtio-serial port named ``capsa.agent`` (virtio spec 1.2,
  5.3 "Console Device", multiport).  The guest finds it through
  ``/sys/class/virtio-ports/vport*/name`` and opens ``/dev/vportNpM``.  A
  port is a single byte stream, not a listening socket: when the host side
  disconnects, reads return EOF (drivers/char/virtio_console.c returns 0
  while the host end is closed), so the agent closes the port, waits a
  little and opens it again for the next host client.
- ``vsock``: AF_VSOCK (vsock(7)) on ``capsa.vsock_port``, VMADDR_CID_ANY,
  one ttrpc connection per accepted socket.
- ``unix``: a unix socket, for running the agent on a host in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from capsa.agent.options import AgentOptions
from capsa.ttrpc.server import Server

log = logging.getLogger("capsa.agent")

VIRTIO_PORTS = "/sys/class/virtio-ports"
# The port appears when the host's port-add control message was handled,
# which can be after /init started; devtmpfs adds /dev/vportNpM right after.
PORT_APPEAR_TIMEOUT_SECONDS = 30.0
# Reopen delay after the host side went away: short first (a proxy that
# reconnects at once), then at most this, to not spin while nobody is there.
REOPEN_DELAY_MIN = 0.005
REOPEN_DELAY_MAX = 0.1


def find_port(name: str, ports_dir: str = VIRTIO_PORTS) -> str | None:
    """The device name (``vport1p1``) of the virtio-serial port called ``name``."""
    try:
        entries = sorted(os.listdir(ports_dir))
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(ports_dir, entry, "name"), encoding="utf-8") as file:
                if file.read().strip() == name:
                    return entry
        except OSError:
            continue
    return None


async def wait_for_port(name: str, ports_dir: str = VIRTIO_PORTS, dev_dir: str = "/dev") -> str:
    """The /dev path of the named port, once both sysfs and devtmpfs have it."""
    deadline = time.monotonic() + PORT_APPEAR_TIMEOUT_SECONDS
    delay = 0.001
    while True:
        device = find_port(name, ports_dir)
        if device is not None and os.path.exists(os.path.join(dev_dir, device)):
            return os.path.join(dev_dir, device)
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, f"no virtio-serial port named {name!r} under {ports_dir}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class Connections:
    """The live ttrpc connections, so a power-off can wait for their replies."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until the peer closes it."""
        self._writers.add(writer)
        try:
            await self._server.serve_connection(reader, writer)
        except (ConnectionError, OSError) as exc:
            log.debug("agent channel connection ended: %s", exc)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def flush(self, timeout: float) -> None:
        """Wait until every reply written so far left the agent (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(writer.transport.get_write_buffer_size() == 0 for writer in self._writers):
                return
            await asyncio.sleep(0.005)


class _PortWriterProtocol(asyncio.streams.FlowControlMixin):
    """Write-side protocol of a character device, with what StreamWriter needs.

    StreamWriter.wait_closed() asks its protocol for a close waiter, which
    only StreamReaderProtocol provides; the port's write side has no reader.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.read_side: asyncio.BaseTransport | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Closing the writer closes the port: the read side goes with it.
        if self.read_side is not None:
            self.read_side.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


class _PortReaderProtocol(asyncio.StreamReaderProtocol):
    """Read-side protocol of the port; counts what arrived.

    A port opened while no host is connected reads EOF at once: a session
    that carried no byte at all means "nobody there", not "host left".
    """

    received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)


async def _device_streams(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _PortReaderProtocol]:
    """asyncio streams over a character device, one transport per direction.

    The read and write transports each own an fd; the write side gets a
    dup(2) of the same open file (a virtio port can be opened only once).
    Closing the writer closes both.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    read_file = os.fdopen(fd, "rb", buffering=0)
    try:
        write_file = os.fdopen(os.dup(fd), "wb", buffering=0)
    except BaseException:
        read_file.close()
        raise
    try:
        read_side, read_protocol = await loop.connect_read_pipe(lambda: _PortReaderProtocol(reader), read_file)
    except BaseException:
        read_file.close()
        write_file.close()
        raise
    try:
        transport, protocol = await loop.connect_write_pipe(_PortWriterProtocol, write_file)
    except BaseException:
        read_side.close()
        write_file.close()
        raise
    protocol.read_side = read_side
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop), read_protocol


def _open_port(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)


async def serve_serial(path: str, connections: Connections, on_ready: Callable[[], None]) -> None:
    """Serve ttrpc on a virtio-serial port forever, one host connection at a time."""
    delay = REOPEN_DELAY_MIN
    ready = False
    while True:
        try:
            fd = _open_port(path)
        except OSError as exc:
            # EBUSY: the previous open file is still being torn down.
            if exc.errno != errno.EBUSY:
                raise
            await asyncio.sleep(delay)
            continue
        reader, writer, port = await _device_streams(fd)
        if not ready:
            ready = True
            on_ready()
        await connections.serve(reader, writer)
        if port.received:
            log.debug("host closed the agent channel; reopening %s", path)
            delay = REOPEN_DELAY_MIN
        else:
            delay = min(delay * 2, REOPEN_DELAY_MAX)
        await asyncio.sleep(delay)


async def serve_vsock(port: int, connections: Connections, on_ready: Callable[[], None]) -> None:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    listener = await asyncio.start_server(connections.serve, sock=sock)
    async with listener:
        on_ready()
        await listener.serve_forever()


async def serve_unix(path: str, connections: Connections, on_ready: Callable[[], None]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = await asyncio.start_unix_server(connections.serve, path=path)
    os.chmod(path, 0o600)
    try:
        async with listener:
            on_ready()
            await listener.serve_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def serve(options: AgentOptions, connections: Connections, on_ready: Callable[[], None]) -> None:
    """Serve the channel ``options`` names until cancelled."""
    if options.channel == "serial":
        path = await wait_for_port(options.port_name)
        log.debug("agent channel: virtio-serial %s", path)
        await serve_serial(path, connections, on_ready)
    elif options.channel == "vsock":
        log.debug("agent channel: vsock port %d", options.vsock_port)
        await serve_vsock(options.vsock_port, connections, on_ready)
    else:
        log.debug("agent channel: unix socket %s", options.listen_path)
        await serve_unix(options.listen_path, connections, on_ready)
