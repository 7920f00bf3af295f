"""The guest console's log: bounded, its newest bytes kept, a flood slowed to a rate."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

from capsa.hypervisor.console_log import DROPPED, ConsoleLog, pump


def test_the_log_keeps_its_newest_bytes_under_the_limit(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", limit=4096)
    for n in range(2000):
        log.write(f"line {n}\n".encode())
    log.close()
    text = (tmp_path / "console.log").read_bytes()
    assert len(text) <= 4096
    assert text.startswith(DROPPED)
    assert text.endswith(b"line 1999\n")  # the last words are what errors quote


def test_small_output_is_kept_whole(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", limit=4096)
    log.write(b"Linux version 6.1\n")
    log.close()
    assert (tmp_path / "console.log").read_bytes() == b"Linux version 6.1\n"
    assert (tmp_path / "console.log").stat().st_mode & 0o777 == 0o600


def test_a_flood_is_read_at_the_rate_and_the_writer_waits(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    log = ConsoleLog(tmp_path / "console.log", limit=64 << 10)
    sent = 0
    stop = time.monotonic() + 1.0

    def flood() -> None:
        nonlocal sent
        theirs.settimeout(0.05)
        while time.monotonic() < stop:
            try:
                sent += theirs.send(b"x" * 4096)
            except TimeoutError:
                continue  # the reader is behind: the writer waits, as QEMU's console port does
        theirs.close()

    writer = threading.Thread(target=flood)
    writer.start()
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(pump(ours, log, rate=100_000), 20))
    elapsed = time.monotonic() - started
    writer.join()
    # About 100 kB/s read, whatever the writer wanted (the socket buffers hold the rest).
    assert sent < 100_000 * elapsed + 2 * 1024 * 1024
    assert (tmp_path / "console.log").stat().st_size <= 64 << 10
