"""A client of the CRI streaming server's port forwarding, as the kubelet's WebSocket protocol has it.

The URL a CRI ``PortForward`` returns (``http://127.0.0.1:PORT/portforward/TOKEN``,
the token good for one use) is upgraded to a WebSocket (RFC 6455) with the
subprotocol ``v4.channel.k8s.io``.  Each forwarded port gets two channels,
data (2n) and error (2n+1); every message in either direction starts with
its channel's number, and the server's first message on each channel is
the port, as an unsigned 16-bit little-endian integer (kubelet
``pkg/kubelet/cri/streaming/portforward/websocket.go``, containerd's copy of
it).  The server closes the connection once the forwarded connection ended;
an error (the port could not be reached) arrives on the error channel first.

No WebSocket library is installed for the tests; the client side of the
protocol needed here (a handshake, masked binary frames out, unfragmented
or continued frames in, ping answered) is small enough to write out.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: RFC 6455 section 1.3: what the server hashes with the client's key.
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "v4.channel.k8s.io"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class Forwarded:
    """What came back over one port-forward connection."""

    #: The port each channel announced first (channel -> port).
    announced: dict[int, int] = field(default_factory=dict)
    data: bytes = b""
    error: bytes = b""
    #: Seconds from the upgrade to the server's close.
    seconds: float = 0.0


class PortForwardClient:
    def __init__(self, url: str, port: int, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname and parts.port, url
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self._buffer = b""
        self._handshake(parts.hostname, parts.port, f"{parts.path}?port={port}")

    def _handshake(self, host: str, port: int, target: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {target} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
                "\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"the streaming server closed during the upgrade: {self._buffer!r}"
            self._buffer += chunk
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode(errors="replace").split("\r\n")
        assert lines[0].split()[1] == "101", f"no WebSocket upgrade: {head!r}"
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, headers
        assert headers.get("sec-websocket-protocol") == SUBPROTOCOL, headers

    def send(self, data: bytes, channel: int = 0) -> None:
        """One binary message to ``channel`` (0: the first port's data)."""
        self._send_frame(OP_BINARY, bytes([channel]) + data)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        # RFC 6455 5.2: FIN, opcode; MASK bit and a masking key on every client frame.
        header = bytes([0x80 | opcode])
        length = len(payload)
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes | None:
        while len(self._buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _frame(self) -> tuple[int, bool, bytes] | None:
        head = self._read(2)
        if head is None:
            return None
        fin, opcode, length = bool(head[0] & 0x80), head[0] & 0x0F, head[1] & 0x7F
        if length in (126, 127):
            raw = self._read(2 if length == 126 else 8)
            if raw is None:
                return None
            (length,) = struct.unpack("!H" if len(raw) == 2 else "!Q", raw)
        mask = self._read(4) if head[1] & 0x80 else b""
        payload = self._read(length) if length else b""
        if payload is None or mask is None:
            return None
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, fin, payload

    def messages(self) -> list[bytes]:
        """Every message until the server closes (a close frame or the end of the connection)."""
        found: list[bytes] = []
        partial = b""
        while (frame := self._frame()) is not None:
            opcode, fin, payload = frame
            if opcode == OP_CLOSE:
                break
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
                continue
            if opcode in (OP_BINARY, OP_TEXT, OP_CONTINUATION):
                partial += payload
                if fin:
                    found.append(partial)
                    partial = b""
        return found

    def close(self) -> None:
        self.sock.close()


def forward(url: str, port: int, payload: bytes, timeout: float = 60.0) -> Forwarded:
    """Open ``url`` for ``port``, send ``payload`` on its data channel, collect what comes back until the close."""
    client = PortForwardClient(url, port, timeout)
    started = time.monotonic()
    try:
        if payload:
            client.send(payload)
        result = Forwarded()
        for message in client.messages():
            channel, body = message[0], message[1:]
            if channel not in result.announced and len(body) >= 2:
                # The first message on each channel is the port; data may follow in the same message.
                result.announced[channel] = struct.unpack("<H", body[:2])[0]
                body = body[2:]
            if channel == 0:
                result.data += body
            elif channel == 1:
                result.error += body
        result.seconds = time.monotonic() - started
        return result
    finally:
        client.close()
