"""cgroup.FileChanges: GetOOMEvent wakes when memory.events changes, not on a timer (inotify on plain files here)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from capsa.agent import cgroup


def test_a_change_wakes_the_waiter_and_silence_lets_it_sleep(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("oom_kill 0\n")

    async def scenario() -> tuple[float, float, float]:
        changes = cgroup.FileChanges(fallback=0.01)
        try:
            changes.watch(str(events))
            changes.watch(str(events))  # again: harmless
            changes.watch(str(tmp_path / "gone" / "memory.events"))  # a cgroup already removed
            started = time.monotonic()
            await changes.changed(timeout=0.3)  # nothing changed: the whole timeout
            quiet = time.monotonic() - started

            async def kill_later() -> None:
                await asyncio.sleep(0.1)
                events.write_text("oom_kill 1\n")

            started = time.monotonic()
            await asyncio.gather(changes.changed(timeout=10), kill_later())
            woken = time.monotonic() - started
            events.write_text("oom_kill 2\n")  # a change before the wait is not lost
            started = time.monotonic()
            await changes.changed(timeout=10)
            queued = time.monotonic() - started
            return quiet, woken, queued
        finally:
            changes.close()

    quiet, woken, queued = asyncio.run(scenario())
    assert quiet >= 0.29  # not a poll: silence waits out the timeout
    assert woken < 5 and queued < 5  # far below the timeout: woken by the change
