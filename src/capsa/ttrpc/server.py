"""ttrpc server over asyncio streams.

:meth:`Server.serve_connection` serves one connection given as a reader and
writer, so the transport can be anything asyncio streams wrap: a unix or
vsock socket on the host, a virtio-serial character device in the guest.

Behaviour matches containerd/ttrpc ``server.go``:

* every request runs in its own task, so a slow handler never blocks others;
* unknown service or method -> UNIMPLEMENTED ("service X" / "method Y");
* a handler raising :class:`StatusError` -> that status; any other
  exception -> INTERNAL with ``str(exc)`` (logged with its traceback);
* a request's ``timeout_nano`` becomes :attr:`Context.deadline`, and the
  handler is cancelled at that deadline and answered DEADLINE_EXCEEDED
  (containerd runs the handler under ``context.WithTimeout``);
* frames that break the protocol on one stream (even id, reused id,
  undecodable request, oversized payload) are answered on that stream with
  INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and the connection goes on;
* when the connection ends, handlers still running are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from capsa.ttrpc.codec import (
    Connection,
    DataReceived,
    Event,
    InvalidFrameReceived,
    OversizedFrame,
    PeerClosed,
    RequestReceived,
    Role,
    StrayFrameReceived,
    UnknownFrameReceived,
)
from capsa.ttrpc.errors import Code, MessageTooLarge, RemoteProtocolError, StatusError

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler knows about the request beyond its payload.

    ``metadata`` holds the request's key/value pairs (for a key sent more than
    once, the last value).  ``deadline`` is in the event loop's clock
    (``loop.time()``), None when the client set no timeout.
    """

    stream_id: int
    service: str
    method: str
    metadata: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None


Method = Callable[[bytes, Context], Awaitable[bytes]]
"""A handler on the wire level: request payload in, reply payload out."""


def unary_method(request_type: type[Req], handler: Callable[[Req, Context], Awaitable[Resp]]) -> Method:
    """Adapt a protobuf handler to a :data:`Method`.

    A payload that does not decode as ``request_type`` is answered
    INVALID_ARGUMENT without calling the handler.
    """

    async def method(payload: bytes, context: Context) -> bytes:
        try:
            request = request_type.FromString(payload)
        except DecodeError as exc:
            name = request_type.DESCRIPTOR.full_name
            raise StatusError(Code.INVALID_ARGUMENT, f"request is not a valid {name}: {exc}") from exc
        response = await handler(request, context)
        return response.SerializeToString()

    return method


class Server:
    """A registry of services and the loop that serves connections with them."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Method]] = {}

    def register_service(self, name: str, methods: Mapping[str, Method]) -> None:
        """Serve ``methods`` (method name -> handler) as service ``name``.

        Registering the same service twice is a programming error (containerd
        panics on it); it raises ValueError.
        """
        if name in self._services:
            raise ValueError(f"ttrpc service {name!r} is already registered")
        self._services[name] = dict(methods)

    async def serve_unix(self, path: str, mode: int = 0o600) -> asyncio.base_events.Server:
        """Listen on a unix socket at ``path``; each connection is served and then closed.

        The socket gets ``mode`` (connecting needs write permission, unix(7)):
        by default its owner's alone, whatever the umask.  Its directory
        must keep others out meanwhile: the mode is set just after bind.
        """
        server = await asyncio.start_unix_server(self._serve_and_close, path=os.fspath(path))
        try:
            os.chmod(path, mode)
        except OSError:
            server.close()
            raise
        return server

    async def _serve_and_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.serve_connection(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until the peer closes it (or it breaks).

        Returns normally at end of file and when the transport fails (the
        peer is gone either way; containerd treats EOF and ECONNRESET alike).
        Handlers still running are cancelled before it returns, and the
        writer is closed.
        """
        connection = Connection(Role.SERVER)
        # Handler tasks by stream id.  Not a TaskGroup: an error in this loop
        # must reach the caller as itself, not wrapped in an ExceptionGroup,
        # and the handlers never raise (every outcome becomes a response).
        handlers: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    log.debug("ttrpc: connection failed while reading: %s", exc)
                    return
                try:
                    events = connection.receive_data(data) if data else connection.receive_eof()
                except RemoteProtocolError as exc:
                    log.warning("ttrpc: %s", exc)
                    return
                for event in events:
                    self._on_event(event, connection, writer, handlers)
                if not data:
                    return
                await _drain(writer)
        finally:
            for task in handlers.values():
                task.cancel()
            await asyncio.gather(*handlers.values(), return_exceptions=True)
            writer.close()

    def _on_event(
        self,
        event: Event,
        connection: Connection,
        writer: asyncio.StreamWriter,
        handlers: dict[int, asyncio.Task[None]],
    ) -> None:
        if isinstance(event, RequestReceived):
            task = asyncio.get_running_loop().create_task(
                self._handle(event, connection, writer), name=f"ttrpc-{event.service}/{event.method}"
            )
            handlers[event.stream_id] = task
            task.add_done_callback(lambda _: handlers.pop(event.stream_id, None))
        elif isinstance(event, OversizedFrame | InvalidFrameReceived):
            log.warning("ttrpc: stream %d: %s", event.stream_id, event.message)
            frame = connection.send_response(event.stream_id, status_code=event.code, status_message=event.message)
            _write(writer, frame)
        elif isinstance(event, StrayFrameReceived):
            log.debug("ttrpc: dropped frame on stream %d: %s", event.stream_id, event.reason)
        elif isinstance(event, UnknownFrameReceived):
            log.warning("ttrpc: skipped frame of unknown type %d on stream %d", event.message_type, event.stream_id)
        elif isinstance(event, DataReceived):
            log.debug("ttrpc: ignored data on stream %d: only unary methods are served", event.stream_id)
        elif isinstance(event, PeerClosed):
            log.debug("ttrpc: peer closed the connection with %d streams open", len(event.open_streams))

    def _lookup(self, service: str, method: str) -> Method:
        # containerd's wording (services.go resolve).
        methods = self._services.get(service)
        if methods is None:
            raise StatusError(Code.UNIMPLEMENTED, f"service {service}")
        handler = methods.get(method)
        if handler is None:
            raise StatusError(Code.UNIMPLEMENTED, f"method {method}")
        return handler

    async def _handle(self, request: RequestReceived, connection: Connection, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        context = Context(
            stream_id=request.stream_id,
            service=request.service,
            method=request.method,
            metadata=dict(request.metadata),
            deadline=deadline,
        )
        code, message, payload = Code.OK, "", b""
        try:
            handler = self._lookup(request.service, request.method)
            async with asyncio.timeout_at(deadline) as timer:
                payload = await handler(request.payload, context)
        except StatusError as exc:
            code, message = exc.code, exc.message
        except TimeoutError as exc:
            if timer.expired():
                code, message = Code.DEADLINE_EXCEEDED, f"{request.method}: deadline exceeded"
            else:
                code, message = _internal(request, exc)
        except Exception as exc:
            code, message = _internal(request, exc)
        if code != Code.OK:
            payload = b""
        try:
            frame = connection.send_response(
                request.stream_id, status_code=code, status_message=message, payload=payload
            )
        except MessageTooLarge as exc:
            log.warning("ttrpc: %s/%s reply refused: %s", request.service, request.method, exc.message)
            frame = connection.send_response(
                request.stream_id, status_code=Code.RESOURCE_EXHAUSTED, status_message=exc.message
            )
        _write(writer, frame)
        await _drain(writer)


def _internal(request: RequestReceived, exc: BaseException) -> tuple[Code, str]:
    log.error("ttrpc: %s/%s failed", request.service, request.method, exc_info=exc)
    return Code.INTERNAL, str(exc) or type(exc).__name__


def _write(writer: asyncio.StreamWriter, frame: bytes) -> None:
    # Each frame goes out in a single write() so concurrent handlers never
    # interleave their bytes; a closing transport means the peer is gone.
    if not writer.is_closing():
        writer.write(frame)


async def _drain(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
