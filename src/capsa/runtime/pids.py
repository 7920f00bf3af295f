"""Is the process we recorded still the one running?

A PID in ``state.json`` outlives its process: the kernel may hand the number
to a new process.  Each recorded PID is paired with the process's start time
(field 22 of ``/proc/PID/stat``, in clock ticks since boot), and a process
counts as alive only if both match and it is not a zombie (a shim whose
parent, conmon or containerd's shim, has not reaped it yet has exited).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    """True while ``pid`` is the process that started at ``started``."""
    now = start_time(pid)
    return now is not None and (started == 0 or now == started)


def wait_gone(pid: int, started: int, timeout: float) -> bool:
    """Poll until the process is gone (it need not be our child); True if it went in time."""
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill(pid: int, started: int, signum: int = signal.SIGKILL) -> None:
    """Signal the recorded process if it is still the same one."""
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
