"""ttrpc framing and stream bookkeeping, sans-IO: bytes in, events out.

The wire format is containerd/ttrpc's (``PROTOCOL.md``, ``channel.go``).  Every
frame is a 10-byte header followed by its payload::

    +----------------+----------------+---------+---------+-----------------+
    | length (u32 BE)| stream id (u32 | type u8 | flags u8| payload (length)|
    |                | BE)            |         |         |                 |
    +----------------+----------------+---------+---------+-----------------+

type 1 = request (payload: ``ttrpc.Request``), 2 = response (payload:
``ttrpc.Response``), 3 = data (payload: the service's own message).  Flags:
0x1 remote-closed, 0x2 remote-open, 0x4 no-data.  Payloads are at most 4 MiB
(``messageLengthMax = 4 << 20``).  Clients open streams with odd ids, 1, 3,
5, ...; server-initiated (even) streams are not part of the protocol yet.

:class:`Connection` holds one side of one connection and does no I/O: feed it
what the transport read (:meth:`Connection.receive_data`, then
:meth:`Connection.receive_eof`), and write whatever its ``send_*`` methods
return.  It never raises for something the peer can do on one stream:
containerd answers such frames and keeps the connection, so they come out as
events (:class:`InvalidFrameReceived`, :class:`OversizedFrame`,
:class:`StrayFrameReceived`, :class:`UnknownFrameReceived`) that the I/O layer
acts on.  :class:`RemoteProtocolError` is left for what breaks the connection
itself (closing it in the middle of a frame); :class:`LocalProtocolError` for
misuse by this program.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from capsa.protocols import ttrpc_pb2
from capsa.ttrpc.errors import Code, LocalProtocolError, MessageTooLarge, RemoteProtocolError

HEADER = struct.Struct(">IIBB")
"""length, stream id, message type, flags -- big-endian, 10 bytes (channel.go)."""
HEADER_SIZE = HEADER.size
MAX_MESSAGE_SIZE = 4 << 20
"""containerd's ``messageLengthMax``: the largest payload either side accepts."""
MAX_STREAM_ID = (1 << 32) - 1


class MessageType(enum.IntEnum):
    """The frame types of PROTOCOL.md "Message Types"."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """Frame flags; their meaning depends on the frame type (PROTOCOL.md)."""

    NONE = 0
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


_KNOWN_FLAGS = Flags.REMOTE_CLOSED | Flags.REMOTE_OPEN | Flags.NO_DATA


class Role(enum.Enum):
    """Which end of the connection a :class:`Connection` plays."""

    CLIENT = "client"
    SERVER = "server"


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """(server) The client opened ``stream_id`` with a request.

    ``metadata`` keeps the wire's key/value pairs in order, duplicates
    included (containerd's ``MD`` is a multimap).  ``timeout_nano`` is 0 when
    the client set no deadline.  Flags 0 (or REMOTE_CLOSED) mean a unary
    request; REMOTE_OPEN means data frames from the client follow.
    """

    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = ()
    flags: Flags = Flags.NONE


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """(client) The server finished ``stream_id`` with a response.

    ``status_code`` is the raw number from ``google.rpc.Status`` (0 = OK);
    :meth:`Code.from_wire` maps it to a :class:`Code`.
    """

    stream_id: int
    status_code: int
    status_message: str
    payload: bytes
    status_details: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A data frame on an open stream.

    ``no_data`` is the NO_DATA flag (the frame only carries flags, ``data`` is
    empty); ``remote_closed`` means the peer will send no more data on it.
    """

    stream_id: int
    data: bytes
    remote_closed: bool = False
    no_data: bool = False


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame announced a payload over :data:`MAX_MESSAGE_SIZE`; its bytes are skipped.

    containerd's ``channel.recv`` discards the payload and fails just that
    stream with RESOURCE_EXHAUSTED.  Server role: answer the stream with
    :attr:`code` and :attr:`message` (the codec allows that one response).
    Client role: the call on that stream failed; the codec forgot the stream.
    """

    stream_id: int
    message_type: int
    length: int

    @property
    def code(self) -> Code:
        return Code.RESOURCE_EXHAUSTED

    @property
    def message(self) -> str:
        # containerd's wording, verbatim (channel.go, OversizedMessageError).
        return f"message length {self.length} exceed maximum message size of {MAX_MESSAGE_SIZE}"


@dataclass(frozen=True, slots=True)
class InvalidFrameReceived:
    """A frame broke the protocol on one stream; the connection goes on.

    Server role (containerd's ``serveConn``): an even stream id, a request
    whose id does not increase, a request that does not decode, data on a
    stream that is not open.  Answer the stream with :attr:`code` and
    :attr:`reason`; the codec allows that one response.
    Client role: the response on an open stream did not decode; the call on
    that stream failed with :attr:`code` and the codec forgot the stream.
    """

    stream_id: int
    message_type: int
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class StrayFrameReceived:
    """A well-formed frame that has nothing to act on; it was dropped.

    A response for a stream the client is not waiting on (a call that timed
    out, say), data after the peer closed its side, a response sent to a
    server.  containerd logs these and goes on; so do we.
    """

    stream_id: int
    message_type: int
    reason: str


@dataclass(frozen=True, slots=True)
class UnknownFrameReceived:
    """A frame of a type this codec does not know; its payload was skipped.

    containerd ignores such frames "for future compat" (server.go).
    """

    stream_id: int
    message_type: int
    flags: int
    length: int


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer closed the connection; ``open_streams`` never finished."""

    open_streams: tuple[int, ...]


Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | OversizedFrame
    | InvalidFrameReceived
    | StrayFrameReceived
    | UnknownFrameReceived
    | PeerClosed
)


# ---------------------------------------------------------------- connection


@dataclass(slots=True)
class _Stream:
    """Per-stream state of PROTOCOL.md "Streaming", from this side's view."""

    local_closed: bool
    remote_closed: bool


def encode_frame(stream_id: int, message_type: int, flags: int, payload: bytes) -> bytes:
    """One frame: the 10-byte header then ``payload`` (refuses over 4 MiB)."""
    if len(payload) > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(len(payload), MAX_MESSAGE_SIZE)
    return HEADER.pack(len(payload), stream_id, message_type, flags) + payload


class Connection:
    """One side (:class:`Role`) of one ttrpc connection, without I/O.

    All stream bookkeeping lives here: which streams are open and which side
    of each is closed, the next client stream id, the highest id the server
    has seen, and the answers the server owes for frames it rejected.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._buffer = bytearray()
        # Bytes of an oversized payload still to skip: they are never buffered.
        self._discard = 0
        self._eof = False
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1
        self._last_stream_id = 0
        # Server: streams whose rejected frame still needs its error response.
        self._owed: dict[int, int] = {}

    @property
    def open_streams(self) -> frozenset[int]:
        """Ids of the streams that have not finished."""
        return frozenset(self._streams)

    # -- receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the transport; return every complete frame's event.

        Partial frames are kept until the rest arrives; several frames in one
        chunk give several events, in order.  Never raises for anything the
        peer sends (see the module docstring).
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after receive_eof()")
        events: list[Event] = []
        view = memoryview(data)
        if self._discard:
            skipped = min(self._discard, len(view))
            self._discard -= skipped
            view = view[skipped:]
        self._buffer += view
        while len(self._buffer) >= HEADER_SIZE:
            length, stream_id, message_type, flags = HEADER.unpack_from(self._buffer)
            if length > MAX_MESSAGE_SIZE:
                del self._buffer[:HEADER_SIZE]
                skipped = min(length, len(self._buffer))
                del self._buffer[:skipped]
                self._discard = length - skipped
                events.append(self._oversized(stream_id, message_type, length))
                continue
            end = HEADER_SIZE + length
            if len(self._buffer) < end:
                break
            # One copy out of the buffer (slicing the bytearray first would make
            # two): with a 4 MiB frame from the peer, that is 4 MiB less held.
            with memoryview(self._buffer) as buffer:
                payload = bytes(buffer[HEADER_SIZE:end])
            del self._buffer[:end]
            if self.role is Role.SERVER:
                events.append(self._server_frame(stream_id, message_type, flags, payload))
            else:
                events.append(self._client_frame(stream_id, message_type, flags, payload))
        return events

    def receive_eof(self) -> list[Event]:
        """The transport reached end of file: the peer closed the connection.

        Raises :class:`RemoteProtocolError` if it closed in the middle of a frame.
        """
        if self._eof:
            return []
        self._eof = True
        if self._buffer or self._discard:
            pending = len(self._buffer) + self._discard
            raise RemoteProtocolError(f"connection closed in the middle of a frame ({pending} bytes missing or unread)")
        return [PeerClosed(tuple(sorted(self._streams)))]

    def _oversized(self, stream_id: int, message_type: int, length: int) -> OversizedFrame:
        if self.role is Role.SERVER:
            self._owe(stream_id)
        else:
            self._streams.pop(stream_id, None)
        return OversizedFrame(stream_id, message_type, length)

    def _owe(self, stream_id: int) -> None:
        self._owed[stream_id] = self._owed.get(stream_id, 0) + 1

    def _reject(self, stream_id: int, message_type: int, message: str) -> InvalidFrameReceived:
        # The server answers every rejected frame on its stream (server.go sendStatus).
        self._owe(stream_id)
        return InvalidFrameReceived(stream_id, message_type, Code.INVALID_ARGUMENT, message)

    def _server_frame(self, stream_id: int, message_type: int, flags: int, payload: bytes) -> Event:
        # The checks and their order follow containerd's serveConn: parity
        # first (for every frame type), then per-type rules.
        if stream_id % 2 != 1:
            return self._reject(stream_id, message_type, "StreamID must be odd for client initiated streams")
        if message_type == MessageType.REQUEST:
            if stream_id <= self._last_stream_id:
                return self._reject(stream_id, message_type, "StreamID cannot be re-used and must increment")
            self._last_stream_id = stream_id
            try:
                request = ttrpc_pb2.Request.FromString(payload)
            except DecodeError as exc:
                return self._reject(stream_id, message_type, f"unmarshal request error: {exc}")
            self._streams[stream_id] = _Stream(local_closed=False, remote_closed=not flags & Flags.REMOTE_OPEN)
            return RequestReceived(
                stream_id=stream_id,
                service=request.service,
                method=request.method,
                payload=request.payload,
                timeout_nano=request.timeout_nano,
                metadata=tuple((kv.key, kv.value) for kv in request.metadata),
                flags=Flags(flags & _KNOWN_FLAGS),
            )
        if message_type == MessageType.DATA:
            stream = self._streams.get(stream_id)
            if stream is None:
                return self._reject(stream_id, message_type, "StreamID is no longer active")
            return self._data(stream_id, stream, flags, payload)
        if message_type == MessageType.RESPONSE:
            return StrayFrameReceived(stream_id, message_type, "a client sent a response frame")
        return UnknownFrameReceived(stream_id, message_type, flags, len(payload))

    def _client_frame(self, stream_id: int, message_type: int, flags: int, payload: bytes) -> Event:
        if message_type == MessageType.RESPONSE:
            if self._streams.pop(stream_id, None) is None:
                return StrayFrameReceived(stream_id, message_type, "response on a stream that is not open")
            try:
                response = ttrpc_pb2.Response.FromString(payload)
            except DecodeError as exc:
                return InvalidFrameReceived(stream_id, message_type, Code.INTERNAL, f"cannot decode response: {exc}")
            return ResponseReceived(
                stream_id=stream_id,
                status_code=response.status.code,
                status_message=response.status.message,
                payload=response.payload,
                status_details=tuple(response.status.details),
            )
        if message_type == MessageType.DATA:
            stream = self._streams.get(stream_id)
            if stream is None:
                return StrayFrameReceived(stream_id, message_type, "data on a stream that is not open")
            return self._data(stream_id, stream, flags, payload)
        if message_type == MessageType.REQUEST:
            return StrayFrameReceived(stream_id, message_type, "server-initiated streams are not supported")
        return UnknownFrameReceived(stream_id, message_type, flags, len(payload))

    def _data(self, stream_id: int, stream: _Stream, flags: int, payload: bytes) -> Event:
        if stream.remote_closed:
            return StrayFrameReceived(stream_id, MessageType.DATA, "data after the peer closed its side of the stream")
        closing = bool(flags & Flags.REMOTE_CLOSED)
        no_data = bool(flags & Flags.NO_DATA)
        if closing:
            stream.remote_closed = True
            # A client's stream ends only with the server's final frame; a
            # server's ends with its own response (PROTOCOL.md "Streaming").
            if self.role is Role.CLIENT and stream.local_closed:
                del self._streams[stream_id]
        return DataReceived(stream_id, b"" if no_data else payload, remote_closed=closing, no_data=no_data)

    # -- sending

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        flags: Flags = Flags.NONE,
    ) -> tuple[int, bytes]:
        """Open a new stream with a request; return its id and the frame to send.

        Flags NONE make a unary call (PROTOCOL.md: "a request with empty flags
        indicates a unary request"); REMOTE_OPEN keeps our side open for
        :meth:`send_data`.  Raises :class:`MessageTooLarge` (nothing changes)
        when the encoded request exceeds 4 MiB.
        """
        self._require(Role.CLIENT, "send_request")
        if flags & ~(Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED) or flags == Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED:
            raise LocalProtocolError(f"invalid request flags {flags!r}")
        if self._next_stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this connection; open a new one")
        pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
        request = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=timeout_nano,
            metadata=[ttrpc_pb2.KeyValue(key=key, value=value) for key, value in pairs],
        )
        stream_id = self._next_stream_id
        frame = encode_frame(stream_id, MessageType.REQUEST, flags, request.SerializeToString())
        self._next_stream_id += 2
        self._streams[stream_id] = _Stream(local_closed=not flags & Flags.REMOTE_OPEN, remote_closed=False)
        return stream_id, frame

    def send_response(
        self, stream_id: int, *, status_code: int = Code.OK, status_message: str = "", payload: bytes = b""
    ) -> bytes:
        """Finish ``stream_id`` with a response; return the frame to send.

        Allowed on an open stream and, once each, on a stream whose frame was
        rejected (:class:`InvalidFrameReceived`, :class:`OversizedFrame`).
        Raises :class:`MessageTooLarge` (nothing changes) over 4 MiB, so the
        caller can answer with an error status instead.
        """
        self._require(Role.SERVER, "send_response")
        owed = self._owed.get(stream_id, 0)
        if not owed and stream_id not in self._streams:
            raise LocalProtocolError(f"no open stream {stream_id} to respond on")
        # containerd always sets status, so an OK reply carries an empty
        # Status (field 1, length 0); doing the same keeps bytes identical.
        response = ttrpc_pb2.Response(
            status=ttrpc_pb2.Status(code=int(status_code), message=status_message), payload=payload
        )
        frame = encode_frame(stream_id, MessageType.RESPONSE, 0, response.SerializeToString())
        if owed:
            if owed == 1:
                del self._owed[stream_id]
            else:
                self._owed[stream_id] = owed - 1
        else:
            del self._streams[stream_id]
        return frame

    def send_data(self, stream_id: int, data: bytes | None, *, close: bool = False) -> bytes:
        """A data frame on an open stream (``data`` None sets NO_DATA).

        ``close`` sets REMOTE_CLOSED: our side of the stream is done.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"no open stream {stream_id} to send data on")
        if stream.local_closed:
            raise LocalProtocolError(f"stream {stream_id} is closed for sending")
        flags = (Flags.REMOTE_CLOSED if close else Flags.NONE) | (Flags.NO_DATA if data is None else Flags.NONE)
        frame = encode_frame(stream_id, MessageType.DATA, flags, data or b"")
        if close:
            stream.local_closed = True
            # The server has no final response to send after closing its side
            # when the client already closed its own (PROTOCOL.md diagrams).
            if self.role is Role.SERVER and stream.remote_closed:
                del self._streams[stream_id]
        return frame

    def abandon(self, stream_id: int) -> None:
        """Forget an open stream (a call that timed out or was cancelled).

        A later frame for it arrives as :class:`StrayFrameReceived`.
        """
        self._streams.pop(stream_id, None)

    def _require(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise LocalProtocolError(f"{what}() is for the {role.value} side of a connection")
