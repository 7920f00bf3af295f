"""ttrpc client over asyncio streams.

One background task reads the connection and feeds the sans-IO
:class:`~capsa.ttrpc.codec.Connection`; each call registers a future under its
stream id, writes its request frame and waits.  Many calls share one
connection and may complete in any order (containerd/ttrpc ``client.go``
multiplexes the same way).

Failure model:

* a non-OK reply status -> :class:`StatusError` with that code;
* ``timeout`` elapsed -> :class:`StatusError` DEADLINE_EXCEEDED, raised here
  without waiting for the server, which also gets the deadline as
  ``timeout_nano`` (as containerd derives it from the context deadline);
* the connection drops or is closed -> every pending call fails with
  :class:`ConnectionClosed` saying who closed it;
* the peer has left :data:`MAX_WRITE_BACKLOG` bytes unread -> a new call
  fails at once with :class:`StatusError` RESOURCE_EXHAUSTED.

The peer may be hostile (the proxy's peer is a guest's agent channel), so
nothing it sends grows this side without bound: the codec holds at most one
frame's payload (4 MiB) and skips larger ones unread, a reply only ever
resolves the call that opened its stream, what a peer sends that nobody
waits for is dropped, and the log lines such frames cause are counted, not
written one per frame (1st, 2nd, 4th, 8th... of each kind).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from types import TracebackType
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from capsa.ttrpc.codec import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Connection,
    DataReceived,
    Event,
    InvalidFrameReceived,
    OversizedFrame,
    ResponseReceived,
    Role,
    StrayFrameReceived,
    UnknownFrameReceived,
)
from capsa.ttrpc.errors import Code, ConnectionClosed, MessageTooLarge, RemoteProtocolError, StatusError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

READ_SIZE = 64 * 1024
MAX_WRITE_BACKLOG = 4 * (MAX_MESSAGE_SIZE + HEADER_SIZE)
"""Bytes written but not yet taken by the peer beyond which new calls fail.

A peer that stops reading would otherwise collect every later request in
the transport's buffer for as long as the connection lives; callers that
wait for ``drain`` each add one frame, so room for four of the largest
frames never refuses a peer that reads at all."""
_MAX_TIMEOUT_NANO = (1 << 63) - 1  # Request.timeout_nano is an int64


class Client:
    """A ttrpc client on one connection; create it inside a running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._connection = Connection(Role.CLIENT)
        self._pending: dict[int, asyncio.Future[ResponseReceived]] = {}
        # Why the connection ended, once it has: (by_peer, reason).
        self._closed: tuple[bool, str] | None = None
        # Frames the peer sent that nobody could use, by kind (for the log).
        self._dropped: dict[str, int] = {}
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name="ttrpc-client-reader")

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str]) -> Client:
        """Connect to a ttrpc server on a unix socket (OSError if that fails)."""
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        return cls(reader, writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once the connection ended, by either side."""
        return self._closed is not None

    async def wait_closed(self) -> None:
        """Return once the connection has ended: the peer's end of file (it exited, say) or :meth:`aclose`."""
        await asyncio.wait({self._read_task})

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """Send one unary request and return the reply's payload.

        Raises :class:`StatusError` (non-OK status, DEADLINE_EXCEEDED after
        ``timeout`` seconds, RESOURCE_EXHAUSTED for a request over 4 MiB) or
        :class:`ConnectionClosed`.
        """
        if self._closed is not None:
            raise self._closed_error()
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise StatusError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: timeout {timeout} s already expired")
            timeout_nano = min(max(int(timeout * 1e9), 1), _MAX_TIMEOUT_NANO)
        try:
            stream_id, frame = self._connection.send_request(
                service, method, payload, timeout_nano=timeout_nano, metadata=metadata or {}
            )
        except MessageTooLarge as exc:
            raise StatusError(Code.RESOURCE_EXHAUSTED, exc.message) from exc
        backlog = self._writer.transport.get_write_buffer_size()
        if backlog + len(frame) > MAX_WRITE_BACKLOG:
            self._connection.abandon(stream_id)
            raise StatusError(
                Code.RESOURCE_EXHAUSTED, f"{service}/{method}: the peer has not read the {backlog} bytes sent before"
            )
        reply: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = reply
        try:
            async with asyncio.timeout(timeout) as deadline:
                try:
                    self._writer.write(frame)
                    await self._writer.drain()
                except (ConnectionError, OSError) as exc:
                    self._connection_lost(True, f"write failed: {exc}")
                    raise self._closed_error() from exc
                response = await reply
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise StatusError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no reply within {timeout} s") from exc
        finally:
            self._pending.pop(stream_id, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # retrieved: it may have failed while we were leaving
            if not reply.done():
                # Timed out or cancelled: a late reply is dropped as stray.
                reply.cancel()
                self._connection.abandon(stream_id)
        if response.status_code != Code.OK:
            raise StatusError(Code.from_wire(response.status_code), response.status_message)
        return response.payload

    async def unary(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
    ) -> M:
        """:meth:`call` with protobuf messages in and out.

        A reply that does not decode as ``response_type`` raises
        :class:`StatusError` INTERNAL (what gRPC reports for it too).
        """
        payload = await self.call(service, method, request.SerializeToString(), timeout=timeout)
        try:
            return response_type.FromString(payload)
        except DecodeError as exc:
            name = response_type.DESCRIPTOR.full_name
            raise StatusError(Code.INTERNAL, f"{service}/{method}: reply is not a valid {name}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosed(by_peer=False)."""
        self._connection_lost(False, "the client was closed")
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        if self._writer.transport.get_write_buffer_size():
            # Requests the peer never took: nobody waits for their replies now,
            # and a graceful close would wait for a peer that may never read.
            self._writer.transport.abort()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError, NotImplementedError):
            # NotImplementedError: StreamWriters over pipes have no close waiter.
            await self._writer.wait_closed()

    # -- the reader task

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    self._connection_lost(True, f"read failed: {exc}")
                    return
                if not data:
                    events = self._connection.receive_eof()
                    self._dispatch(events)
                    self._connection_lost(True, "end of file")
                    return
                self._dispatch(self._connection.receive_data(data))
        except RemoteProtocolError as exc:
            self._connection_lost(True, str(exc))
        finally:
            # Whatever stopped the reader, no call may wait for a reply forever.
            self._connection_lost(True, "the connection reader stopped")

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ResponseReceived):
                self._resolve(event.stream_id, event)
            elif isinstance(event, OversizedFrame | InvalidFrameReceived):
                self._resolve(event.stream_id, StatusError(event.code, event.message))
            elif isinstance(event, StrayFrameReceived):
                self._note("stray", logging.DEBUG, "dropped frame on stream %d: %s", event.stream_id, event.reason)
            elif isinstance(event, UnknownFrameReceived):
                self._note(
                    "unknown",
                    logging.WARNING,
                    "skipped frame of unknown type %d on stream %d",
                    event.message_type,
                    event.stream_id,
                )
            elif isinstance(event, DataReceived):
                self._note(
                    "data",
                    logging.DEBUG,
                    "ignored %d bytes of data on stream %d (this client makes unary calls only)",
                    len(event.data),
                    event.stream_id,
                )
            # PeerClosed: _read_loop fails the pending calls next.

    def _note(self, kind: str, level: int, message: str, *args: object) -> None:
        """Log a frame that was dropped, for the 1st, 2nd, 4th, 8th... frame of its ``kind``.

        How many such frames come is the peer's choice; a line for each would
        let it fill this side's log (on ``/run``, a tmpfs: memory) at will.
        """
        count = self._dropped.get(kind, 0) + 1
        self._dropped[kind] = count
        if count & (count - 1) == 0:
            log.log(level, "ttrpc: " + message + " (%d such frames on this connection)", *args, count)

    def _resolve(self, stream_id: int, outcome: ResponseReceived | StatusError) -> None:
        reply = self._pending.get(stream_id)
        if reply is None or reply.done():
            return
        if isinstance(outcome, StatusError):
            reply.set_exception(outcome)
        else:
            reply.set_result(outcome)

    def _connection_lost(self, by_peer: bool, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = (by_peer, reason)
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(self._closed_error())

    def _closed_error(self) -> ConnectionClosed:
        # A fresh exception per raiser: one shared instance would collect
        # every caller's traceback.
        by_peer, reason = self._closed or (True, "")
        return ConnectionClosed(by_peer, reason)
