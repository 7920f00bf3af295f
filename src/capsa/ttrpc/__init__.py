"""ttrpc, wire-compatible with containerd/ttrpc: a sans-IO codec and asyncio client and server.

``codec`` frames and unframes bytes and keeps the stream bookkeeping, with no
I/O; ``client`` and ``server`` drive it over asyncio streams; ``errors`` holds
the status codes and the exception tree (under :class:`capsa.errors.CapsaError`).
"""

from capsa.ttrpc.client import Client
from capsa.ttrpc.codec import (
    MAX_MESSAGE_SIZE,
    Connection,
    DataReceived,
    Event,
    Flags,
    InvalidFrameReceived,
    MessageType,
    OversizedFrame,
    PeerClosed,
    RequestReceived,
    ResponseReceived,
    Role,
    StrayFrameReceived,
    UnknownFrameReceived,
)
from capsa.ttrpc.errors import (
    Code,
    ConnectionClosed,
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    StatusError,
    TtrpcError,
)
from capsa.ttrpc.server import Context, Method, Server, unary_method

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "Code",
    "Connection",
    "ConnectionClosed",
    "Context",
    "DataReceived",
    "Event",
    "Flags",
    "InvalidFrameReceived",
    "LocalProtocolError",
    "MessageTooLarge",
    "MessageType",
    "Method",
    "OversizedFrame",
    "PeerClosed",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestReceived",
    "ResponseReceived",
    "Role",
    "Server",
    "StatusError",
    "StrayFrameReceived",
    "TtrpcError",
    "UnknownFrameReceived",
    "unary_method",
]
