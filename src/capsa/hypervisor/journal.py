"""The guest console's lines to the host's journal, when systemd-journald runs.

journald's native protocol (systemd's "Native Journal Protocol",
https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): one AF_UNIX datagram per
entry, sent to ``/run/systemd/journal/socket``; the datagram is a list of
fields, each ``KEY=value\\n``, or, for a value holding a newline, ``KEY\\n``,
the value's length as a little-endian 64-bit integer, the value and
``\\n``.  Keys are uppercase letters, digits and underscores, not starting
with ``_`` (those are the journal's own trusted fields) and at most 64
bytes (systemd.journal-fields(7)).  No library: the protocol is this
small, and sd_journal_send would add a dependency to every proxy.

:func:`entry`, :class:`LineSplitter` and :class:`RateLimit` are pure;
:class:`JournalSender` is the thin I/O.  A sender never blocks the console
pump: the socket is non-blocking and an entry journald cannot take right
now (EAGAIN, a full receive queue; journald gone) is dropped and counted.
Each sandbox may send :data:`BURST` lines at once and :data:`RATE` a
second after that: journald runs outside the sandbox's host cgroup, and a
guest flooding its console must not make it work for the guest (journald's
own rate limit still has to receive each datagram it drops).  What is held
back is counted in one entry once lines flow again.  The console log file
(:mod:`capsa.hypervisor.bounded_log`) keeps every byte regardless.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from capsa.hypervisor.guest_console import PANIC_MARK as _PANIC_TEXT

log = logging.getLogger("capsa.journal")

#: Where journald listens for native entries (sd_journal_sendv's address).
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
#: SYSLOG_IDENTIFIER of the guest console's entries: ``journalctl -t capsa-guest``.
GUEST_IDENTIFIER = "capsa-guest"
#: The field naming the sandbox: ``journalctl CAPSA_SANDBOX=<id>``.
SANDBOX_FIELD = "CAPSA_SANDBOX"
#: A console line longer than this is sent in pieces of this size.
MAX_LINE = 4096
#: syslog(3) priorities: a kernel panic line is an emergency, anything else informational.
PRIORITY_EMERG, PRIORITY_INFO = 0, 6
PANIC_MARK = _PANIC_TEXT.encode()
#: Console lines a sandbox may send to the journal at once, and per second after that.
BURST = 2000
RATE = 200.0

_KEY = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


def entry(fields: Mapping[str, str | bytes]) -> bytes:
    """One journal entry in the native protocol; ValueError for a key journald would refuse."""
    parts: list[bytes] = []
    for key, value in fields.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"journal field {key!r}: want uppercase letters, digits and '_', not first")
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        name = key.encode("ascii")
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


def console_entry(line: bytes, sandbox_id: str) -> bytes:
    """The entry for one line of a sandbox's guest console."""
    return entry(
        {
            "MESSAGE": line,
            "PRIORITY": str(PRIORITY_EMERG if PANIC_MARK in line else PRIORITY_INFO),
            "SYSLOG_IDENTIFIER": GUEST_IDENTIFIER,
            SANDBOX_FIELD: sandbox_id,
        }
    )


class LineSplitter:
    """Bytes as they come from the console, out as whole lines (without ``\\r\\n``).

    A partial line waits for the rest, up to :data:`MAX_LINE` bytes; beyond
    that it goes out in pieces, so a guest that never sends a newline
    cannot make the pump hold more.  Blank lines are dropped.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._partial += data
        *complete, rest = bytes(self._partial).split(b"\n")
        lines: list[bytes] = []
        for line in complete:
            lines += self._pieces(line.rstrip(b"\r"))
        while len(rest) > self._max:
            lines.append(rest[: self._max])
            rest = rest[self._max :]
        self._partial = bytearray(rest)
        return [line for line in lines if line.strip()]

    def _pieces(self, line: bytes) -> list[bytes]:
        return [line[i : i + self._max] for i in range(0, len(line), self._max)] or [b""]

    def flush(self) -> list[bytes]:
        """What is left of an unfinished last line."""
        rest, self._partial = bytes(self._partial).rstrip(b"\r"), bytearray()
        return [rest] if rest.strip() else []


class RateLimit:
    """A token bucket: ``burst`` at once, then ``rate`` a second; ``clock`` in seconds."""

    def __init__(self, rate: float = RATE, burst: int = BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def journald_running(path: Path = JOURNAL_SOCKET) -> bool:
    """journald's socket is there (its unit creates it; it is gone when journald does not run)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class JournalSender:
    """Sends entries to journald without ever blocking; see the module docstring."""

    def __init__(self, path: Path = JOURNAL_SOCKET) -> None:
        self.path = path
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def send(self, data: bytes) -> bool:
        """Send one entry; False when it was dropped (journald busy or gone, or the entry too big)."""
        try:
            self._sock.sendto(data, os.fspath(self.path))
        except OSError as exc:
            # EAGAIN: journald's queue is full; ECONNREFUSED, ENOENT: it went
            # away; EMSGSIZE, ENOBUFS: too big now.  The log file has it all.
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:
                log.debug("journal: dropped %d console line(s) so far (%s)", self.dropped, exc.strerror)
            return False
        return True

    def close(self) -> None:
        self._sock.close()


class ConsoleJournal:
    """One sandbox's guest console, line by line, to the journal."""

    def __init__(self, sandbox_id: str, sender: JournalSender, limit: RateLimit | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.sender = sender
        self._lines = LineSplitter()
        self._limit = limit if limit is not None else RateLimit()
        #: Lines held back by the rate limit since the last one sent.
        self.held_back = 0

    @classmethod
    def open(cls, sandbox_id: str, path: Path = JOURNAL_SOCKET) -> ConsoleJournal | None:
        """None when journald does not run here (the console log file is all there is)."""
        if not journald_running(path):
            return None
        try:
            return cls(sandbox_id, JournalSender(path))
        except OSError as exc:
            log.warning("cannot send the guest console to the journal: %s", exc.strerror)
            return None

    def feed(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            self._send(line)

    def _send(self, line: bytes) -> None:
        if not self._limit.take():
            self.held_back += 1
            return
        if self.held_back:
            note = f"[capsa: {self.held_back} console lines not sent to the journal (rate limit); console.log has them]"
            self.sender.send(console_entry(note.encode(), self.sandbox_id))
            self.held_back = 0
        self.sender.send(console_entry(line, self.sandbox_id))

    def close(self) -> None:
        for line in self._lines.flush():
            self._send(line)
        with contextlib.suppress(OSError):
            self.sender.close()
