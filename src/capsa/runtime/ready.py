"""The helper's side of runtime/daemon.py: what a started proxy or shim says back, and its name.

Kept apart from daemon.py, which starts helpers (subprocess and its
imports), so that a helper that lives as long as its container imports
only this: capsa-shim is one process per container and per ``exec``, and
each module it imports is memory it holds for that long.
"""

from __future__ import annotations

import contextlib
import os


def set_process_name(name: str) -> None:
    """Show as ``name`` in ps/top (the kernel's comm, 15 bytes), not as one more python3.

    Called from the main thread, whose name ps shows for the process.
    """
    with contextlib.suppress(OSError), open("/proc/thread-self/comm", "wb") as comm:
        comm.write(name.encode()[:15])


def wait_go(fd: int) -> bool:
    """The helper's side of ``--go-fd``: block until released (True) or abandoned (False, EOF)."""
    if fd < 0:
        return True
    try:
        return os.read(fd, 1) == b"g"
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


class ReadyPipe:
    """The child's side: send the one line to whoever started us."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _send(self, line: str) -> bool:
        if self._fd < 0:
            return True
        try:
            os.write(self._fd, line.replace("\n", " ").encode() + b"\n")
            delivered = True
        except OSError:
            delivered = False
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        return delivered

    def ok(self) -> bool:
        """Say we are ready; False if nobody heard it (our starter died while we started:
        a create killed halfway, whose helpers must not live on without a state)."""
        return self._send("ok")

    def fail(self, message: str) -> None:
        self._send(message or "failed to start")
