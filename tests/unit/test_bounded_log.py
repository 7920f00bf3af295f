"""The guest console's log: bounded, its newest bytes kept, a flood slowed to a rate."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from capsa.hypervisor.bounded_log import DROPPED, BoundedLog, pump


def test_the_log_keeps_its_newest_bytes_under_the_limit(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "console.log", limit=4096)
    for n in range(2000):
        log.write(f"line {n}\n".encode())
    log.close()
    text = (tmp_path / "console.log").read_bytes()
    assert len(text) <= 4096
    assert text.startswith(DROPPED)
    assert text.endswith(b"line 1999\n")  # the last words are what errors quote


def test_small_output_is_kept_whole(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "console.log", limit=4096)
    log.write(b"Linux version 6.1\n")
    log.close()
    assert (tmp_path / "console.log").read_bytes() == b"Linux version 6.1\n"
    assert (tmp_path / "console.log").stat().st_mode & 0o777 == 0o600


def test_a_flood_is_read_as_fast_as_it_comes_and_stays_bounded(tmp_path: Path) -> None:
    # A reader that holds back would stall the guest (see the module docstring).
    ours, theirs = socket.socketpair()
    log = BoundedLog(tmp_path / "console.log", limit=64 << 10)
    total = 8 << 20

    def flood() -> None:
        sent = 0
        while sent < total:
            sent += theirs.send(b"x" * 65536)
        theirs.close()

    writer = threading.Thread(target=flood)
    writer.start()
    asyncio.run(asyncio.wait_for(pump(ours, log), 20))
    writer.join()
    assert (tmp_path / "console.log").stat().st_size <= 64 << 10
