"""TCP connections from the agent to the guest's loopback (agent.proto ``OpenTcpStream`` and friends).

The host's loopback relay (capsa/network/relay.py) carries each connection
made to ``localhost`` in the engine's network namespace (CRI ``PortForward``,
``kubectl port-forward``) over these calls.  The agent dials from its own
network namespace, which is the one a pod's containers share
(agent/crun.py), so ``127.0.0.1:PORT`` here is the pod's server, as it is
for containerd under runc.  The dialling follows containerd's: IPv4 first,
then IPv6.

A stream is a connection and the locks that keep one reader and one writer
on it at a time; the host's relay makes one ReadTcpStream and one
WriteTcpStream call at a time per stream anyway.  Reads block until data,
end of data (an empty reply) or an error; writes wait for the kernel to take
the data (backpressure reaches the host as a slow reply).  The number of
open streams is bounded: a host that forgets to close them cannot exhaust
the guest's sockets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass, field

from capsa.errors import CapsaError, InvalidArgument

log = logging.getLogger("capsa.agent")

#: containerd dials localhost as tcp4, then tcp6 (pkg/cri/server/sandbox_portforward_linux.go).
LOOPBACK = ("127.0.0.1", "::1")
MAX_STREAMS = 256
MAX_READ = 1 << 20
CONNECT_TIMEOUT = 10.0


class StreamNotFound(CapsaError):
    """No open stream has that ID (never opened, or closed)."""


class PortUnreachable(CapsaError):
    """Nothing accepted the connection on the guest's loopback (refused, or no such address)."""


class StreamBroken(CapsaError):
    """The connection failed under a read or write (reset by the guest's side)."""


class TooManyStreams(CapsaError):
    """The guest holds :data:`MAX_STREAMS` open streams already."""


@dataclass
class _Stream:
    port: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reading: asyncio.Lock = field(default_factory=asyncio.Lock)
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)


class TcpStreams:
    """The open streams of one agent."""

    def __init__(self, hosts: tuple[str, ...] = LOOPBACK, max_streams: int = MAX_STREAMS) -> None:
        self._hosts = hosts
        self._max = max_streams
        self._streams: dict[int, _Stream] = {}
        self._last_id = 0

    async def open(self, port: int) -> int:
        """Connect to ``port`` on the loopback; the new stream's ID."""
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port}: not a TCP port (1 to 65535)")
        if len(self._streams) >= self._max:
            raise TooManyStreams(f"{self._max} TCP streams are open in the guest already")
        failures: list[str] = []
        for host in self._hosts:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
            except TimeoutError:
                failures.append(f"{host}: no answer within {CONNECT_TIMEOUT:g} s")
            except OSError as exc:
                failures.append(f"{host}: {exc.strerror or exc}")
                if exc.errno not in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EAFNOSUPPORT):
                    log.debug("port %d on %s: %s", port, host, exc)
            else:
                self._last_id += 1
                self._streams[self._last_id] = _Stream(port, reader, writer)
                return self._last_id
        raise PortUnreachable(f"nothing accepts connections on port {port} in the guest ({'; '.join(failures)})")

    def _get(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFound(f"no TCP stream {stream_id} in the guest")
        return stream

    async def write(self, stream_id: int, data: bytes) -> int:
        stream = self._get(stream_id)
        async with stream.writing:
            try:
                stream.writer.write(data)
                await stream.writer.drain()
            except OSError as exc:
                raise StreamBroken(f"port {stream.port} in the guest: {exc.strerror or exc}") from exc
        return len(data)

    async def read(self, stream_id: int, size: int) -> bytes:
        """Up to ``size`` bytes (at least one), or ``b""`` at the end of the data."""
        stream = self._get(stream_id)
        async with stream.reading:
            try:
                return await stream.reader.read(min(max(size, 1), MAX_READ))
            except OSError as exc:
                raise StreamBroken(f"port {stream.port} in the guest: {exc.strerror or exc}") from exc

    def close(self, stream_id: int, write_only: bool = False) -> None:
        """Shut the sending side down (the guest's server reads EOF), or close and forget the stream."""
        stream = self._get(stream_id)
        if write_only:
            if stream.writer.can_write_eof() and not stream.writer.is_closing():
                try:
                    stream.writer.write_eof()
                except OSError as exc:
                    log.debug("port %d: shutdown: %s", stream.port, exc)
            return
        del self._streams[stream_id]
        # A read waiting on it ends with EOF once the transport is gone.
        stream.writer.close()

    def close_all(self) -> None:
        for stream_id in list(self._streams):
            self.close(stream_id)
