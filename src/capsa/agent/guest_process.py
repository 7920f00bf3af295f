"""Processes in the guest itself, outside every container: DebugConsole (agent.proto).

``capsa debug-console`` runs a command (by default a shell) for diagnosis
in the guest's own namespaces, cgroup and root, as root: where the agent
runs, so it sees the agent as PID 1, the guest's mounts and every
container's processes.  crun plays no part; the agent spawns the command
itself, as the leader of a new session, with three pipes or a pty of the
agent's own devpts (``/dev/pts``, ``newinstance``) as its controlling
terminal.

Such a process is named by container_id ``""`` and its exec_id in the
process calls that follow (WaitProcess, ReadStdout, WriteStdin,
SignalProcess, TtyWinResize...), so the host relays it exactly as an exec.
It is forgotten once the host has had all of it: its exit status
(WaitProcess answered) and its output to the end of file.  One whose host
went away before that stays, with its bounded output buffers, until the
sandbox goes.

The guest image has no shell of its own: the host supplies one (its static
busybox, through the rootfs share: capsa/runtime/debug_console.py).  A
sandbox allows DebugConsole only when CreateSandbox said the configuration
does; the agent policy can refuse it like any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from capsa.agent import spawn
from capsa.agent.container import Process, ProcessNotFound
from capsa.agent.reaper import Reaper, exit_status
from capsa.agent.stdio import Pipes, ProcessIO, terminal_io
from capsa.errors import ContainerExists, InvalidArgument, WrongState

log = logging.getLogger("capsa.agent")

#: What a debug console process finds in its environment unless the host says otherwise.
BASE_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/",
}
#: The longest exec_id a debug console process may have.
MAX_EXEC_ID = 128


def environment(requested: list[str]) -> dict[str, str]:
    """The process's environment: :data:`BASE_ENVIRONMENT` with the host's ``NAME=value`` items over it."""
    env = dict(BASE_ENVIRONMENT)
    for item in requested:
        name, sep, value = item.partition("=")
        if not sep or not name or "\0" in item:
            raise InvalidArgument(f"DebugConsole env {item!r}: expected NAME=value")
        env[name] = value
    return env


def check_command(exec_id: str, args: list[str]) -> None:
    """INVALID_ARGUMENT for a request no process can come of."""
    # The exec_id only names the process in later calls (no file is made
    # from it, unlike a container exec's).
    if not exec_id or len(exec_id) > MAX_EXEC_ID or not exec_id.isprintable():
        raise InvalidArgument(f"a debug console process needs an exec_id of 1 to {MAX_EXEC_ID} printable characters")
    if not args or not os.path.isabs(args[0]):
        raise InvalidArgument("DebugConsole needs a command whose first word is an absolute path in the guest")
    if any("\0" in arg for arg in args):
        raise InvalidArgument("DebugConsole: an argument holds a NUL byte")


class GuestProcesses:
    """The debug console processes of one sandbox, by exec_id."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._processes: dict[str, Process] = {}
        # Set once a WaitProcess has handed the host the process's status.
        self._collected: dict[str, asyncio.Event] = {}
        # One per process: forgets it once the host has had all of it.
        self._forgetting: set[asyncio.Task[None]] = set()

    def get(self, exec_id: str) -> Process:
        try:
            return self._processes[exec_id]
        except KeyError:
            raise ProcessNotFound(f"the guest has no debug console process {exec_id!r}") from None

    async def wait(self, exec_id: str) -> tuple[int, int]:
        """WaitProcess: the (status, signal) of the process, once it exited."""
        process = self.get(exec_id)
        status = await process.wait()
        collected = self._collected.get(exec_id)
        if collected is not None and self._processes.get(exec_id) is process:
            collected.set()
        return status

    def start(self, exec_id: str, args: list[str], env: list[str], terminal: bool) -> Process:
        """Spawn ``args`` with fresh stdio; the Process the host then relays."""
        check_command(exec_id, args)
        if exec_id in self._processes:
            raise ContainerExists(f"debug console process {exec_id} already exists")
        variables = environment(env)
        loop = asyncio.get_running_loop()
        io: ProcessIO
        if terminal:
            master, slave = os.openpty()
            try:
                pid = self._spawn(args, lambda: spawn.spawn_in_session(args, variables, terminal=os.ttyname(slave)))
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            # Claimed before the event loop runs again (Reaper.claim, spawned_now).
            exited = self._reaper.claim(pid, spawned_now=True)
            io = terminal_io(loop, master)
        else:
            pipes = Pipes.open()
            try:
                stdio = (pipes.child_stdin, pipes.child_stdout, pipes.child_stderr)
                pid = self._spawn(args, lambda: spawn.spawn_in_session(args, variables, stdio=stdio))
            except BaseException:
                pipes.close_all()
                raise
            exited = self._reaper.claim(pid, spawned_now=True)
            io = pipes.into_io(loop)
        status: asyncio.Future[tuple[int, int]] = loop.create_future()

        def on_reaped(raw: asyncio.Future[int]) -> None:
            if not raw.cancelled() and not status.done():
                status.set_result(exit_status(raw.result()))
                log.debug("debug console process %s (pid %d) exited: %s", exec_id, pid, status.result())

        exited.add_done_callback(on_reaped)
        process = Process("", exec_id, pid, io, status)
        self._processes[exec_id] = process
        self._collected[exec_id] = asyncio.Event()
        task = asyncio.ensure_future(self._forget_when_done(process))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)
        log.warning("debug console process %s started: %s", exec_id, " ".join(args))
        return process

    @staticmethod
    def _spawn(args: list[str], spawn_it: Callable[[], int]) -> int:
        try:
            return spawn_it()
        except OSError as exc:
            raise WrongState(f"cannot run {args[0]} in the guest: {exc.strerror or exc}") from exc

    async def _forget_when_done(self, process: Process) -> None:
        await self._collected[process.exec_id].wait()
        await process.io.stdout.drained.wait()
        if process.io.stderr is not None:
            await process.io.stderr.drained.wait()
        if self._processes.get(process.exec_id) is process:
            del self._processes[process.exec_id]
            del self._collected[process.exec_id]
        process.io.close()

    def kill_all(self) -> None:
        """DestroySandbox: every debug console process killed, its stdio closed."""
        for task in list(self._forgetting):
            task.cancel()
        processes, self._processes = list(self._processes.values()), {}
        self._collected.clear()
        for process in processes:
            if process.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            process.io.close()
