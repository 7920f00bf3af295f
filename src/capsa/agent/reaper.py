"""Collecting the exit status of every child of the agent.

As PID 1 every orphan of the guest becomes the agent's child: crun's
container init processes (crun exits right after ``create``), detached
``exec`` processes, and whatever those leave behind.  A SIGCHLD handler runs
``waitpid(-1, WNOHANG)`` until no zombie is left and hands each status to
whoever claimed that PID.  A status nobody claimed yet is kept for a while:
the container process can exit before the agent has read its PID from crun's
pid file.

asyncio's own child watchers are never used: they call waitpid on their own
and would race with this reaper for the same statuses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import OrderedDict

# A status nobody claims within this long belongs to a process nobody will
# ask about (a crun helper, a grandchild); keeping it longer only risks
# handing it to a later process that reused the PID.
UNCLAIMED_TTL_SECONDS = 120.0
UNCLAIMED_MAX = 4096


def exit_status(wait_status: int) -> tuple[int, int]:
    """(status, signal) in the shell convention of WaitProcessResponse.

    Exit code N gives (N, 0); death by signal N gives (128 + N, N).
    """
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, sig
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status), 0
    # waitpid without WUNTRACED/WCONTINUED reports only terminations.
    raise ValueError(f"not a termination status: {wait_status:#x}")


class Reaper:
    """Owns waitpid for the whole agent; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._claims: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: OrderedDict[int, tuple[float, int]] = OrderedDict()
        self._installed = False

    def install(self) -> None:
        """Start reaping on SIGCHLD, and reap what already exited."""
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._installed = True
        self.reap()

    def uninstall(self) -> None:
        if self._installed:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._installed = False

    def reap(self) -> None:
        """Collect every terminated child (the SIGCHLD handler)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._deliver(pid, status)

    def claim(self, pid: int, *, spawned_now: bool = False) -> asyncio.Future[int]:
        """A future for the raw wait status of ``pid``.

        ``spawned_now`` says the caller spawned ``pid`` without yielding to
        the event loop since: no status can have been reaped for it yet, so
        a kept one belongs to an earlier process with the same PID.
        """
        if pid in self._claims:
            raise RuntimeError(f"pid {pid} is already claimed")
        future: asyncio.Future[int] = self._loop.create_future()
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and not spawned_now:
            future.set_result(kept[1])
        else:
            self._claims[pid] = future
            future.add_done_callback(lambda _: self._drop_claim(pid, future))
        return future

    async def wait(self, pid: int, *, spawned_now: bool = False) -> int:
        return await self.claim(pid, spawned_now=spawned_now)

    def _drop_claim(self, pid: int, future: asyncio.Future[int]) -> None:
        # A cancelled claim must not swallow the status of a later process.
        if self._claims.get(pid) is future:
            del self._claims[pid]

    def _deliver(self, pid: int, status: int) -> None:
        future = self._claims.pop(pid, None)
        if future is not None and not future.done():
            future.set_result(status)
            return
        now = time.monotonic()
        self._unclaimed[pid] = (now, status)
        self._unclaimed.move_to_end(pid)
        while self._unclaimed:
            oldest_pid, (reaped_at, _) = next(iter(self._unclaimed.items()))
            if len(self._unclaimed) <= UNCLAIMED_MAX and now - reaped_at < UNCLAIMED_TTL_SECONDS:
                break
            del self._unclaimed[oldest_pid]
