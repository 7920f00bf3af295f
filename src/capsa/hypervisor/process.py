"""Starting and ending the long-lived helper processes of a VM (QEMU, virtiofsd).

Both are started the same way: stdin from /dev/null, stdout and stderr into a
socket whose other end the VM's owner (the process that lives as long as
the VM) reads into a bounded log file (hypervisor/bounded_log.py: a guest
can make either helper write without end), a session of their own so a
terminal's Ctrl-C reaches capsa rather than the VMM, and optionally
``PR_SET_PDEATHSIG=SIGKILL`` so that a killed foreground ``capsa run`` does
not leave them behind.  Both are ended the same way: a polite signal or
request, a bounded wait, SIGKILL, reap.

This module only does process I/O; what to run is built elsewhere by pure
functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import CapsaError
from capsa.hypervisor.bounded_log import BoundedLog, pump

# prctl(2): PR_SET_PDEATHSIG = 1 (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies.

    The kernel's notion of parent here is the *thread* that forked, so spawn
    from the event loop's thread, not from an executor thread that may exit.
    The parent can die between fork and prctl; then the child is already
    orphaned, which the re-check of the parent PID catches.  A child in a
    PID namespace of its own (hypervisor/jail.py) sees its parent, outside
    it, as PID 0, and an orphan as the namespace's init.
    """
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() not in (parent, 0):
            os._exit(127)

    return hook


@dataclass
class Helper:
    """A started helper process and the task copying its output into its log."""

    proc: asyncio.subprocess.Process
    output: asyncio.Future[None]

    async def output_closed(self, timeout: float = 2.0) -> None:
        """Wait until everything the helper wrote is in its log (it closed its end), at most ``timeout`` s."""
        await settled(self.output, timeout)


async def settled(work: asyncio.Future[None], timeout: float) -> None:
    """Wait at most ``timeout`` s for ``work`` (a log's pump) to end, leaving it running if it does not."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(work), timeout)


async def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    error: type[CapsaError],
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = False,
    confine: Callable[[Callable[[], None] | None], Callable[[], None]] | None = None,
) -> Helper:
    """Start ``argv`` with its output in ``log_path`` (emptied first, so its last line is about this run).

    ``confine``, given the die-with-parent hook (or None), returns the
    child's whole ``preexec_fn`` (hypervisor/jail.py: the jail first, then
    that hook, which a change of uid would undo).  Raises ``error`` (the
    caller's part of the exception tree) when the program cannot be
    executed at all.
    """
    what = Path(argv[0]).name
    try:
        log = BoundedLog(log_path)
    except OSError as exc:
        raise error(f"cannot open log file {log_path} for {what}: {exc.strerror}") from exc
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.shutdown(socket.SHUT_WR)
    death_hook = die_with_parent_hook() if die_with_parent else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=theirs.fileno(),
            stderr=theirs.fileno(),
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=confine(death_hook) if confine is not None else death_hook,
        )
    except OSError as exc:
        ours.close()
        log.close()
        raise error(f"cannot execute {argv[0]}: {exc.strerror}") from exc
    except BaseException:
        ours.close()
        log.close()
        raise
    finally:
        theirs.close()
    return Helper(proc, asyncio.ensure_future(pump(ours, log)))


async def terminate(
    proc: asyncio.subprocess.Process,
    timeout: float,
    ask: Callable[[], None] | None = None,
) -> int:
    """End ``proc`` and reap it; return its exit status.

    ``ask`` requests a clean exit (default: SIGTERM); after ``timeout``
    seconds the process gets SIGKILL.  Already-exited processes are only
    reaped, so this is safe to call more than once.
    """
    if proc.returncode is None:
        try:
            if ask is not None:
                ask()
            else:
                proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()


def last_line(log_path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line a helper wrote: its own words on why it failed."""
    try:
        with log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")
