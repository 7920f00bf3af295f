"""Starting capsa's own long-lived processes (proxy, shim) and hearing back.

Both are started the same way: ``python -m capsa.<part>`` in a session of
their own, told the write end of a pipe (``--ready-fd N``), on which they
send exactly one line: ``ok`` once they serve, or the one-line reason they
cannot.  The caller waits for that line (or their death, or a timeout), so
that its own exit status and error message tell the whole story.  The
helper's side of that line is runtime/ready.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import CapsaError
from capsa.runtime import pids


@dataclass(frozen=True)
class Started:
    pid: int
    start_time: int
    process: subprocess.Popen[bytes]


def start(
    module: str,
    args: Sequence[str],
    *,
    output: Path,
    timeout: float,
    inherit_stdio: bool = False,
) -> Started:
    """Run ``python -m module args --ready-fd N``; return once it said ``ok``.

    ``inherit_stdio``: the child keeps our stdin, stdout and stderr (a shim
    relays the container's stdio through them); otherwise stdin is /dev/null
    and stdout/stderr go to ``output``, so that no pipe of the engine's stays
    open in a process that outlives the container.
    """
    pending = spawn(module, args, output=output, inherit_stdio=inherit_stdio, held=False)
    return pending.wait_ready(timeout)


class Pending:
    """A helper started and, if ``held``, waiting for :meth:`release` before it does anything that shows.

    Python's start and capsa's imports take a tenth of a second or more;
    a caller with other work to wait for (the container's create in the
    guest) starts the helper first and releases it when that work is done
    (``--go-fd N``: the helper reads one byte, and exits quietly at EOF).
    """

    def __init__(self, name: str, output: Path, proc: subprocess.Popen[bytes], ready_fd: int, go_fd: int) -> None:
        self._name = name
        self._output = output
        self._proc = proc
        self._ready_fd = ready_fd
        self._go_fd = go_fd
        self.started = Started(proc.pid, pids.start_time(proc.pid) or 0, proc)

    def release(self) -> None:
        """Let a held helper go on (a no-op for one that was not held)."""
        if self._go_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._go_fd, b"g")
            os.close(self._go_fd)
            self._go_fd = -1

    def abandon(self, timeout: float = 5.0) -> None:
        """The work it waited for failed: the helper exits without a trace (EOF on its go pipe), or is killed."""
        if self._go_fd >= 0:
            os.close(self._go_fd)
            self._go_fd = -1
        with contextlib.suppress(OSError):
            os.close(self._ready_fd)
        self._ready_fd = -1
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()

    def wait_ready(self, timeout: float) -> Started:
        """Release it, then return once it said ``ok``; its one-line reason (a CapsaError) if not."""
        self.release()
        proc = self._proc
        try:
            line = read_line(self._ready_fd, timeout)
        finally:
            os.close(self._ready_fd)
            self._ready_fd = -1
        if line == "ok":
            return self.started
        try:
            # No line at all: it died before it could say why (a usage error, an
            # import error), or it hangs.  Its output file goes with the state
            # directory, so its last line goes into our message.
            exited: int | None = proc.wait(timeout=0 if line else 2)
        except subprocess.TimeoutExpired:
            exited = None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        if line:
            raise CapsaError(line)
        tail = last_line(self._output)
        why = f": {tail}" if tail else ""
        if exited is not None:
            raise CapsaError(f"capsa-{self._name} exited with status {exited} before it was ready{why}")
        raise CapsaError(f"capsa-{self._name} did not start within {timeout:.0f} s{why}")


def spawn(
    module: str,
    args: Sequence[str],
    *,
    output: Path,
    inherit_stdio: bool = False,
    held: bool = True,
) -> Pending:
    """Start ``python -m module args --ready-fd N [--go-fd M]``; see :class:`Pending` and :func:`start`."""
    read_end, write_end = os.pipe()
    go_read, go_write = os.pipe() if held else (-1, -1)
    argv = [sys.executable, "-m", module, *args, "--ready-fd", str(write_end)]
    passed = [write_end]
    if held:
        argv += ["--go-fd", str(go_read)]
        passed.append(go_read)
    name = module.rsplit(".", 1)[-1]
    log_fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        if inherit_stdio:
            proc = subprocess.Popen(argv, pass_fds=passed, start_new_session=True)
        else:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=passed,
                start_new_session=True,
            )
    except OSError as exc:
        for fd in (read_end, go_write):
            if fd >= 0:
                os.close(fd)
        raise CapsaError(f"cannot start capsa-{name}: {exc.strerror}") from exc
    finally:
        for fd in (write_end, go_read, log_fd):
            if fd >= 0:
                os.close(fd)
    return Pending(name, output, proc, read_end, go_write)


def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a helper's output file, shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:limit] if lines else ""


def read_line(fd: int, timeout: float) -> str:
    """One line from ``fd``, or what arrived before EOF or the timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
