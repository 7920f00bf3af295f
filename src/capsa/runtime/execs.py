"""Extra processes in a running container (runc ``exec``), and waiting on shims.

An exec gets a shim of its own, like the container's init: it inherits the
stdio of ``capsa exec`` (or sends a pty over ``--console-socket``), starts
the process through the proxy (``ExecProcess``), relays, and exits with the
process's status.  ``--detach`` returns once the process runs; the shim's
PID goes to ``--pid-file``.  In the foreground, ``capsa exec`` waits for its
shim and passes on the signals it receives, as runc does.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa.errors import CapsaError, WrongState
from capsa.runtime import daemon
from capsa.runtime.container import current_status
from capsa.runtime.hostcgroup import HostCgroup
from capsa.runtime.ids import validate_id
from capsa.runtime.lifecycle import SHIM_START_TIMEOUT, Runtime, check_pid_file, write_pid_file
from capsa.runtime.state import Status
from capsa.shim.link import FORWARDED_SIGNALS


@dataclass
class ExecRequest:
    container_id: str
    process: dict[str, Any]
    detach: bool = False
    pid_file: Path | None = None
    console_socket: str | None = None


def start_exec(rt: Runtime, request: ExecRequest) -> daemon.Started:
    """Start the process's shim; return once the process runs in the guest."""
    container_id = validate_id(request.container_id)
    check_pid_file(request.pid_file)
    state = rt.store.load(container_id)
    status = current_status(state)
    if status == Status.PAUSED:
        raise WrongState("cannot exec in a paused container")
    if status not in (Status.RUNNING, Status.CREATED):
        raise WrongState(f"cannot exec in a {status} container")
    terminal = bool(request.process.get("terminal"))
    if terminal and request.detach and not request.console_socket:
        raise WrongState("cannot allocate a pseudo-TTY for a detached exec without --console-socket")
    run_dir = rt.store.dir(container_id)
    exec_id = secrets.token_hex(8)
    process_file = run_dir / f"exec-{exec_id}.json"
    try:
        process_file.write_text(json.dumps(request.process))
    except OSError as exc:
        # A state root on a full filesystem: refuse, with nothing started and no half-written file left.
        with suppress(OSError):
            process_file.unlink(missing_ok=True)
        raise CapsaError(f"cannot write {process_file}: {exc.strerror}") from exc
    args = [*rt.helper_args(), f"--id={container_id}", "--exec-id", exec_id, "--process", str(process_file)]
    if request.console_socket:
        args += ["--console-socket", request.console_socket]
    elif terminal:
        args.append("--terminal")
    try:
        # Born in the container's host cgroup, as the init's shim (lifecycle.create).
        with HostCgroup.from_dict(state.host_cgroup).joined():
            shim = daemon.start(
                "capsa.shim",
                args,
                output=run_dir / f"exec-{exec_id}.out",
                timeout=SHIM_START_TIMEOUT,
                inherit_stdio=not request.console_socket,  # the pty is its stdio (see lifecycle.create)
            )
    finally:
        process_file.unlink(missing_ok=True)
    if request.pid_file is not None:
        write_pid_file(request.pid_file, shim.pid)
    return shim


class SignalRelay:
    """The signals a foreground ``run`` or ``exec`` gets, passed on to the shim of its process.

    Installed before the container (or the exec) is even created, as runc's
    handler is: a signal that comes while the VM boots or the process
    starts is held and delivered as soon as the shim exists, instead of
    ending us by its default action and leaving the VM behind.  SIGWINCH is
    passed on but never held (the shim reads the window size as it starts).
    """

    def __init__(self) -> None:
        self._pid = 0
        self._held: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalRelay:
        for sig in (*FORWARDED_SIGNALS, signal.SIGWINCH):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self._pid:
            with suppress(ProcessLookupError):
                os.kill(self._pid, signum)
        elif signum != signal.SIGWINCH:
            self._held.append(signum)

    def to(self, pid: int) -> None:
        """From now on pass our signals to ``pid``, first those held so far."""
        self._pid = pid
        held, self._held = self._held, []
        for signum in held:
            with suppress(ProcessLookupError):
                os.kill(pid, signum)


def wait_foreground(shim: daemon.Started, relay: SignalRelay) -> int:
    """Wait for our shim, to which ``relay`` passes our signals; its status as a shell reports it."""
    relay.to(shim.pid)
    code = shim.process.wait()
    return 128 - code if code < 0 else code
