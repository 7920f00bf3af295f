"""The guest console's log on the host: bounded in size, and a flood slowed down.

A guest writes its console (``hvc0``, or ``ttyS0`` with ``--debug``) as
fast as it likes, and root in a privileged container can reach it
(``mknod /dev/hvc0 c 229 0``).  QEMU writing that to a file would let the
guest fill the host's disk, or its RAM where the file is on tmpfs.  So QEMU
gets one end of a socket pair for the console, and the VM's owner reads the
other end (:func:`pump`):

- :class:`ConsoleLog` keeps the file under ``limit`` bytes: when a write
  would pass it, the older half is dropped (the file is rewritten with its
  newest bytes after a marker line), so the last words before a crash, which
  error messages quote, are always there.
- :func:`pump` reads at most ``rate`` bytes a second on average.  A guest
  writing faster finds the socket full: QEMU throttles the console port, and
  the guest's writes wait (virtio-serial flow control): the flood slows the
  guest, not the host.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

#: The console log's size bound, and the sustained rate a guest may write it at.
DEFAULT_LIMIT = 1 << 20
DEFAULT_RATE = 256 << 10
DROPPED = b"\n[capsa: earlier console output dropped to keep this log bounded]\n"


class ConsoleLog:
    """An append-only file that never grows past ``limit`` bytes (its newest bytes are kept)."""

    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 2 * len(DROPPED):
            raise ValueError(f"console log limit {limit} is too small")
        self.path = path
        self.limit = limit
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.limit:
            self._drop_older(data)
            return
        os.write(self._fd, data)
        self._size += len(data)

    def _drop_older(self, data: bytes) -> None:
        keep = self.limit // 2
        with open(self.path, "rb") as f:
            old = f.read()
        tail = (old + data)[-(keep - len(DROPPED)) :]
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, DROPPED + tail)
        self._size = len(DROPPED) + len(tail)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def pump(sock: socket.socket, log: ConsoleLog, rate: int = DEFAULT_RATE) -> None:
    """Copy what the guest writes on ``sock`` into ``log`` until QEMU closes it, at most ``rate`` B/s."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    budget = float(rate)
    last = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            budget = min(float(rate), budget + (now - last) * rate)
            last = now
            if budget <= 0:
                await asyncio.sleep(-budget / rate + 0.01)
                continue
            try:
                data = await loop.sock_recv(sock, min(65536, max(1, int(budget))))
            except OSError:
                return
            if not data:
                return
            budget -= len(data)
            log.write(data)
    finally:
        log.close()
        sock.close()
