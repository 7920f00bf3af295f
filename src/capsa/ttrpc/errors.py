"""Errors of the ttrpc layer, all under :class:`capsa.errors.CapsaError`.

Three families, kept apart because the caller reacts differently to each:

* :class:`StatusError` -- the call reached the other side and came back with
  a non-OK ``google.rpc.Status`` (or was failed locally with one, e.g. a
  deadline).  Handlers raise it to choose the status they answer with.
* :class:`ConnectionClosed` -- the connection is gone; says whether we closed
  it or the peer did (trio's "closed by you" vs "broken by the peer").
* :class:`LocalProtocolError` / :class:`RemoteProtocolError` -- somebody broke
  the ttrpc framing rules: this program misused the codec, or the peer sent
  something the protocol forbids (h11's split).
"""

from __future__ import annotations

import enum

from capsa.errors import CapsaError


class Code(enum.IntEnum):
    """The 17 status codes of ``google.rpc.Code``; ttrpc carries them unchanged.

    Numbering from googleapis ``google/rpc/code.proto`` (identical to gRPC's).
    """

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """The code for a number read off the wire; unknown numbers are UNKNOWN.

        gRPC does the same with codes outside the table, so a newer peer's
        code never turns into a crash here.
        """
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(CapsaError):
    """Base of every error raised by :mod:`capsa.ttrpc`."""


class StatusError(TtrpcError):
    """A call ended with a non-OK status.

    The client raises it when the reply's ``status.code`` is not OK (and for
    local failures that have a status, such as DEADLINE_EXCEEDED); a server
    handler raises it to answer its request with exactly this status.
    """

    def __init__(self, code: Code, message: str = "") -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message


class ConnectionClosed(TtrpcError):
    """The connection is closed: by this side (``by_peer`` False) or the peer."""

    def __init__(self, by_peer: bool, reason: str = "") -> None:
        who = "closed by the peer" if by_peer else "closed locally"
        super().__init__(f"ttrpc connection {who}: {reason}" if reason else f"ttrpc connection {who}")
        self.by_peer = by_peer
        self.reason = reason


class ProtocolError(TtrpcError):
    """Somebody broke the ttrpc protocol; see the two subclasses for who."""


class LocalProtocolError(ProtocolError):
    """This program misused the codec (sent on a closed stream, wrong role, ...)."""


class MessageTooLarge(LocalProtocolError):
    """A frame we were asked to send is over the 4 MiB payload limit.

    containerd refuses to send such a frame (``OversizedMessageErr``) and
    reports it as RESOURCE_EXHAUSTED with the same wording as the receiver's
    check; :attr:`message` is that wording, for use as a status message.
    """

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        self.message = f"message length {length} exceed maximum message size of {limit}"
        super().__init__(self.message)


class RemoteProtocolError(ProtocolError):
    """The peer sent something the ttrpc protocol does not allow."""
