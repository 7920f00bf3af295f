"""Running a command (crun) from the agent: posix_spawn + the reaper.

``subprocess`` is not used: Popen.wait() calls waitpid on its own and would
race the agent's reaper for the child's status; posix_spawn is also cheaper
than fork in a Python process.  The child's status always arrives through
:class:`capsa.agent.reaper.Reaper`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from capsa.agent.reaper import Reaper, exit_status

# Python ignores SIGPIPE and SIGXFSZ for itself, and ignored signals survive
# exec(2): crun and the container would inherit them.  subprocess resets them
# for the same reason (restore_signals).
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Completed:
    """How a spawned command ended and what it wrote to the captured streams."""

    argv: tuple[str, ...]
    status: int  # shell convention: exit code, or 128 + signal
    signal: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.signal == 0

    def describe(self) -> str:
        if self.signal:
            return f"killed by signal {self.signal}"
        return f"exit status {self.status}"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PATH", _DEFAULT_PATH)
    return env


def spawn(argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
    """posix_spawn ``argv`` with the given fds as its 0, 1, 2; returns the PID.

    The agent's own fds are close-on-exec (Python's default), so the child
    gets exactly these three.
    """
    return os.posix_spawn(
        argv[0],
        argv,
        _environment(),
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ],
        setsigdef=_RESET_SIGNALS,
        setsigmask=(),
    )


def spawn_in_session(
    argv: list[str],
    env: Mapping[str, str],
    *,
    stdio: tuple[int, int, int] | None = None,
    terminal: str | None = None,
) -> int:
    """posix_spawn ``argv`` as the leader of a session of its own, with ``env`` alone; returns the PID.

    Its 0, 1 and 2 are ``stdio``, or the terminal whose path is
    ``terminal``: opened in the child after setsid(2) (glibc's posix_spawn
    runs POSIX_SPAWN_SETSID before the file actions), so it becomes the
    session's controlling terminal (credentials(7), "Sessions"), as a
    shell's job control and ^C need.  A command that cannot be executed
    raises OSError here: glibc reports the child's exec failure.
    """
    if terminal is not None:
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, terminal, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
    elif stdio is not None:
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    else:
        raise ValueError("spawn_in_session needs stdio or a terminal")
    return os.posix_spawn(
        argv[0], argv, dict(env), file_actions=actions, setsid=True, setsigdef=_RESET_SIGNALS, setsigmask=()
    )


class _Capture:
    """Reads a pipe while the child runs, without waiting for EOF.

    Waiting for EOF would hang when the child leaves a descendant holding
    the pipe (crun create's container init inherits crun's stdio).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._chunks: list[bytes] = []
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._drain)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._loop.remove_reader(self._fd)
                return
            self._chunks.append(chunk)

    def finish(self) -> bytes:
        self._drain()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        return b"".join(self._chunks)


async def run(
    argv: list[str],
    reaper: Reaper,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> Completed:
    """Run ``argv`` to completion.

    A stream given as an fd is handed to the child as is (the container's
    stdio for crun create/exec); one left as None is /dev/null for stdin and
    a captured pipe for stdout/stderr.
    """
    loop = asyncio.get_running_loop()
    opened: list[int] = []
    captures: list[_Capture | None] = [None, None]
    try:
        if stdin is None:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(stdin)
        child_out: list[int] = []
        for index, given in enumerate((stdout, stderr)):
            if given is not None:
                child_out.append(given)
                continue
            read_end, write_end = os.pipe()
            opened.append(write_end)
            captures[index] = _Capture(loop, read_end)
            child_out.append(write_end)
        pid = spawn(argv, stdin, child_out[0], child_out[1])
        exited = reaper.claim(pid, spawned_now=True)
    except BaseException:
        for capture in captures:
            if capture is not None:
                capture.finish()
        raise
    finally:
        for fd in opened:
            os.close(fd)
    try:
        wait_status = await exited
    finally:
        outputs = [capture.finish() if capture is not None else b"" for capture in captures]
    status, sig = exit_status(wait_status)
    return Completed(tuple(argv), status, sig, outputs[0], outputs[1])


def read_text(path: str) -> str:
    """A small file crun wrote (log, pid file); empty when it does not exist."""
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8", errors="replace") as file:
        return file.read()
    return ""
