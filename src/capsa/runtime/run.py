"""``run``: create, start and wait for one container in a fresh VM.

The order matters for "bad input leaves nothing behind": everything that can
be checked on the host (the ID, the bundle, the spec, the executable, the
guest files) is checked before the state directory is claimed; after the
claim, every exit path goes through :meth:`Sandbox.stop` and removes the
state directory.

The caller's stdio is the container's stdio: a thread reads stdin (it may be
a pipe, a file or a terminal, which asyncio cannot all watch) and forwards it
with ``WriteStdin``; ``ReadStdout``/``ReadStderr`` loops copy the container's
output to our stdout/stderr; ``WaitProcess`` gives the exit status, which
becomes ours.  Signals sent to ``capsa run`` are forwarded to the container's
process, as runc does for a foreground container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.config import Config
from capsa.errors import AgentError, CapsaError
from capsa.protocols import agent_pb2 as pb
from capsa.runtime.agent_client import AgentClient
from capsa.runtime.bundle import Bundle
from capsa.runtime.sandbox import ROOTFS_TAG, Sandbox, SandboxSpec, check_guest_files, run_dir_ok
from capsa.runtime.state import ContainerState, StateStore, Status

log = logging.getLogger("capsa.run")

# runc forwards every signal to a foreground container except these.
_NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGKILL, signal.SIGSTOP}
FORWARDED_SIGNALS = tuple(
    s for s in signal.valid_signals() if isinstance(s, signal.Signals) and s not in _NOT_FORWARDED
)
TIMINGS_ENV = "CAPSA_TIMINGS"


@dataclass
class RunRequest:
    container_id: str
    bundle: Bundle
    pid_file: Path | None = None
    debug: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    # Called once the container's process runs (`run -d` returns then).
    on_started: Callable[[], None] | None = None


def container_request(container_id: str, bundle: Bundle, shared_fs: str) -> pb.CreateContainerRequest:
    """The spec goes to the agent as the engine wrote it; the agent points root.path at the share."""
    driver, fstype = ("9p", "9p") if shared_fs == "virtio-9p" else ("virtiofs", "virtiofs")
    rootfs = pb.Storage(
        driver=driver,
        source=ROOTFS_TAG,
        fstype=fstype,
        mount_point=f"/run/capsa/containers/{container_id}/rootfs",
    )
    return pb.CreateContainerRequest(
        container_id=container_id,
        oci_spec_json=json.dumps(bundle.spec).encode(),
        rootfs=rootfs,
    )


def write_pid_file(path: Path, pid: int) -> None:
    """Atomically, as runc does: engines poll for the file and read it whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def run(config: Config, store: StateStore, request: RunRequest) -> int:
    """Run the container in the foreground; return its exit status."""
    request.timings["invoked"] = time.monotonic()
    check_guest_files(config)
    run_dir_ok(store.dir(request.container_id))
    run_dir = store.claim(request.container_id)
    try:
        state = ContainerState(
            id=request.container_id,
            bundle=str(request.bundle.path),
            rootfs=str(request.bundle.rootfs),
            pid=os.getpid(),
            annotations=request.bundle.annotations,
        )
        store.save(state)
        if request.pid_file is not None:
            write_pid_file(request.pid_file, os.getpid())
        return asyncio.run(_run(config, store, state, request, run_dir))
    finally:
        store.remove(request.container_id)
        _write_timings(request.timings)


async def _run(config: Config, store: StateStore, state: ContainerState, request: RunRequest, run_dir: Path) -> int:
    bundle = request.bundle
    spec = SandboxSpec(
        id=request.container_id,
        run_dir=run_dir,
        rootfs=bundle.rootfs,
        hostname=str(bundle.spec.get("hostname", "")),
    )
    sandbox = Sandbox(config, spec, debug=request.debug, timings=request.timings)
    loop = asyncio.get_running_loop()
    pending_signals: list[int] = []
    for signum in FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, pending_signals.append, signum)
    try:
        agent = await sandbox.start()
        if pending_signals:
            # Interrupted while the VM booted: there is no process to give it to.
            raise CapsaError(f"interrupted by signal {pending_signals[0]} before the container started")
        await agent.create_container(container_request(request.container_id, bundle, config.shared_fs.kind))
        state.status = Status.CREATED
        if sandbox.hypervisor is not None and sandbox.hypervisor.pid is not None:
            state.hypervisor_pid = sandbox.hypervisor.pid
        if sandbox.virtiofsd is not None and sandbox.virtiofsd.pid is not None:
            state.virtiofsd_pid = sandbox.virtiofsd.pid
        store.save(state)
        request.timings["container_created"] = time.monotonic()
        if request.debug or os.environ.get(TIMINGS_ENV):
            details = await agent.guest_details()
            request.timings["guest_kernel_boot_s"] = details.kernel_boot_seconds
            request.timings["guest_agent_start_s"] = details.agent_start_seconds
        await agent.start_container(request.container_id)
        state.status = Status.RUNNING
        store.save(state)
        request.timings["container_started"] = time.monotonic()
        if request.on_started is not None:
            request.on_started()
        status = await relay(agent, request.container_id, bundle.terminal, loop, pending_signals)
        request.timings["container_exited"] = time.monotonic()
        return status
    finally:
        for signum in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signum)
        await sandbox.stop()
        request.timings["sandbox_stopped"] = time.monotonic()


async def relay(
    agent: AgentClient,
    container_id: str,
    terminal: bool,
    loop: asyncio.AbstractEventLoop,
    pending_signals: list[int],
) -> int:
    """Copy stdio both ways and forward signals until the process exits; return its status."""

    async def copy_out(read: Callable[[str], Any], fd: int) -> None:
        while True:
            data: bytes = await read(container_id)
            if not data:
                return
            await loop.run_in_executor(None, _write_all, fd, data)

    async def forward_signals() -> None:
        wake = asyncio.Event()

        def received(signum: int) -> None:
            pending_signals.append(signum)
            wake.set()

        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
            loop.add_signal_handler(sig, received, sig)
        while True:
            while pending_signals:
                with contextlib.suppress(AgentError):
                    await agent.signal_process(container_id, "", pending_signals.pop(0))
            wake.clear()
            await wake.wait()

    async def forward_winch() -> None:
        changed = asyncio.Event()
        loop.add_signal_handler(signal.SIGWINCH, changed.set)
        try:
            while True:
                rows, columns = _terminal_size()
                with contextlib.suppress(AgentError):
                    await agent.tty_win_resize(container_id, "", rows, columns)
                changed.clear()
                await changed.wait()
        finally:
            loop.remove_signal_handler(signal.SIGWINCH)

    stdin = StdinPump(loop, agent, container_id)
    helpers = [asyncio.ensure_future(forward_signals())]
    raw = terminal and os.isatty(0)
    if raw:
        helpers.append(asyncio.ensure_future(forward_winch()))
    outputs = [asyncio.ensure_future(copy_out(agent.read_stdout, 1))]
    if not terminal:
        outputs.append(asyncio.ensure_future(copy_out(agent.read_stderr, 2)))
    with _raw_terminal(raw):
        stdin.start()
        try:
            result = await agent.wait_process(container_id)
            # Output written just before exit is still in flight: drain it.
            await asyncio.gather(*outputs)
        finally:
            stdin.stop()
            for task in helpers + outputs:
                task.cancel()
            for task in helpers + outputs:
                with contextlib.suppress(asyncio.CancelledError, CapsaError):
                    await task
    return int(result.status)


class StdinPump:
    """Forwards our stdin to the container from a thread.

    stdin may be a regular file, a pipe or a terminal; a thread reading it
    with plain ``read(2)`` works for all of them.  The thread hands chunks to
    the event loop, which sends them in order; EOF becomes ``CloseStdin``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, agent: AgentClient, container_id: str) -> None:
        self._loop = loop
        self._agent = agent
        self._id = container_id
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        threading.Thread(target=self._read, name="capsa-stdin", daemon=True).start()
        self._task = asyncio.ensure_future(self._send())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
            except (RuntimeError, asyncio.CancelledError, Exception):
                return
            if not data:
                return

    async def _send(self) -> None:
        with contextlib.suppress(AgentError):
            while True:
                data = await self._queue.get()
                if not data:
                    await self._agent.close_stdin(self._id)
                    return
                await self._agent.write_stdin(self._id, "", data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            return
        view = view[written:]


def _terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size(0)
    return size.lines, size.columns


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Any:
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _write_timings(timings: dict[str, float]) -> None:
    """For bench/: the monotonic time of each phase, when CAPSA_TIMINGS names a file."""
    target = os.environ.get(TIMINGS_ENV)
    if not target:
        return
    with contextlib.suppress(OSError), open(target, "w") as f:
        json.dump(timings, f)
