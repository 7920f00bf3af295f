"""The line between a capsa-shim and its VM's proxy: ``shim.sock`` in the socket directory.

A shim stands for one process in the guest, but the proxy does the work:
the shim hands it the process's host stdio and then only passes on what
reaches the shim itself, so that the process a container engine watches
is a small one (no asyncio, no protobuf: about a third of a shim that
relayed by itself) while the proxy, which is there anyway, relays.

One connection per process, newline-terminated JSON objects both ways:

1. shim -> proxy, with its stdin, stdout and stderr as ``SCM_RIGHTS``
   (three descriptors, the same one three times for a pty): ``{"id": ID,
   "exec_id": E, "process": {...} or null, "terminal": bool, "winch":
   bool}``.  ``process`` is an ``exec``'s OCI process, which the proxy
   starts in the guest; ``winch``: stdin is a terminal whose size is the
   guest pty's.
2. proxy -> shim: ``{"ok": true}`` once the process is there to relay, or
   ``{"error": "why"}``.
3. shim -> proxy, any number: ``{"signal": N}`` (a signal the shim got,
   for the process) and ``{"winch": true}`` (the terminal changed size).
4. proxy -> shim, last: ``{"status": N}`` once the process exited and its
   output is written out, after the proxy closed its copies of the stdio.
   The proxy closing without it means the VM is gone: :data:`VM_LOST_STATUS`.

A shim that goes away (killed) ends the relay: the proxy closes its
copies of the stdio, so the engine's pipes see their end as they did.
"""

from __future__ import annotations

import json
import signal

SOCKET_NAME = "shim.sock"

#: One message: a JSON object (no typing.Any: importing typing is memory a shim would hold).
Message = dict[str, object]

#: The exit status of a process whose fate is unknown because its VM went away.
VM_LOST_STATUS = 255

#: The longest message either side accepts (an exec's process, with its environment).
MAX_MESSAGE = 1 << 20

# runc forwards every signal to a foreground container except these.
_NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE}
FORWARDED_SIGNALS = tuple(
    s for s in signal.valid_signals() if isinstance(s, signal.Signals) and s not in _NOT_FORWARDED
)


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """One message; ValueError when it is not a JSON object."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


class Lines:
    """Splits a byte stream into messages (sans-IO: bytes in, messages out)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Message]:
        """The messages ``data`` completes; ValueError on a malformed or oversized one."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_MESSAGE:
            raise ValueError(f"a message longer than {MAX_MESSAGE} bytes")
        return [decode(line) for line in lines if line.strip()]
