"""Logs a guest can make the host write: bounded in size, read as fast as they come.

A guest writes its console (``hvc0``, or ``ttyS0`` with ``--debug``) as
fast as it likes, and root in a privileged container can reach it
(``mknod /dev/hvc0 c 229 0``).  A hostile guest kernel can also make QEMU
and virtiofsd complain on their stderr at will (bad descriptors, bad FUSE
requests).  A helper writing either to a file would let the guest fill
the host's disk, or its RAM where the file is on tmpfs.  So no helper gets
a file: each gets one end of a socket pair, and the VM's owner reads the
other end (:func:`pump`) into :class:`BoundedLog`, which keeps the file
under ``limit`` bytes: when a write would pass it, the file starts over
with a marker line, so the newest output, the last words before a crash
that error messages quote, is always there.

The pump reads as fast as the helper delivers, on purpose.  A reader that
holds back makes QEMU throttle the console port, and the guest's virtio
console driver waits for the host with the port's lock held: tried with a
256 KiB/s reader, the flooding guest's agent did not answer a
SignalProcess within 60 s.  What a flood costs the host is the reader's
CPU, which runs in the sandbox's host cgroup and so under its CPU limit.
The flooding guest itself stays slow (under TCG with one vCPU it answers
an exec only after tens of seconds): that is its own share it spends.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsa.hypervisor.journal import ConsoleJournal

#: The size bound of each log.
DEFAULT_LIMIT = 1 << 20
DROPPED = b"\n[capsa: earlier output dropped to keep this log bounded]\n"


class BoundedLog:
    """An append-only file that never grows past ``limit`` bytes (its newest bytes are kept)."""

    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 2 * len(DROPPED):
            raise ValueError(f"log limit {limit} is too small")
        self.path = path
        self.limit = limit
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.limit:
            # Start over: the marker, then as much of the newest bytes as fit.
            tail = data[-(self.limit - len(DROPPED)) :]
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, DROPPED + tail)
            self._size = len(DROPPED) + len(tail)
            return
        os.write(self._fd, data)
        self._size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def pump(sock: socket.socket, log: BoundedLog, journal: ConsoleJournal | None = None) -> None:
    """Copy what the guest writes on ``sock`` into ``log`` (and line by line to ``journal``) until QEMU closes it.

    The journal never holds the pump up: its sender drops what journald
    cannot take at once (:mod:`capsa.hypervisor.journal`).
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except OSError:
                return
            if not data:
                return
            log.write(data)
            if journal is not None:
                journal.feed(data)
    finally:
        log.close()
        sock.close()
        if journal is not None:
            journal.close()
