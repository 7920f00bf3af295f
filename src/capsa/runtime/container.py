"""One container as the runtime's short-lived commands see it.

A container's truth is spread over ``state.json`` (what the last command
recorded) and the processes that stand for it: the proxy (its VM) and the
shim (its process).  :func:`current_status` combines them the way an
engine expects ``state`` to: a container whose shim or VM is gone is
``stopped``, whatever the file last said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from capsa.errors import CapsaError
from capsa.proxy.launch import ProxyClient
from capsa.runtime import pids
from capsa.runtime.state import ContainerState, Status

log = logging.getLogger("capsa.container")

T = TypeVar("T")

#: runtime-spec version of the state we report (runtime.md "State").
OCI_VERSION = "1.0.2"


def current_status(state: ContainerState, alive: Callable[[int, int], bool] = pids.alive) -> str:
    """``alive(pid, start_time)`` says whether a recorded process still runs
    (default: read ``/proc`` now; capsa-monitor passes its own reading)."""
    if state.status == Status.STOPPED:
        return Status.STOPPED
    if state.status == Status.CREATING:
        # A create still at work holds the lock; one that died left this, and
        # whatever it started stops by itself or at delete.
        if state.creator_pid:
            return Status.CREATING if alive(state.creator_pid, state.creator_start) else Status.STOPPED
        return Status.CREATING if alive(state.proxy_pid, state.proxy_start) else Status.STOPPED
    if not alive(state.proxy_pid, state.proxy_start):
        return Status.STOPPED
    if not alive(state.pid, state.pid_start):
        return Status.STOPPED
    return state.status


def oci_state(state: ContainerState, status: str | None = None) -> dict[str, Any]:
    """The state object of runtime.md "State", plus runc's rootfs/created/owner.

    ``pid`` is the shim's: the host process that stands for the container
    (runc reports 0 once the container stopped).  The create hooks see
    ``creating`` with the PID already set, as runc's do.
    """
    status = status or current_status(state)
    live = (Status.CREATING, Status.CREATED, Status.RUNNING, Status.PAUSED)
    return {
        "ociVersion": OCI_VERSION,
        "id": state.id,
        "pid": state.pid if status in live else 0,
        "status": status,
        "bundle": state.bundle,
        "rootfs": state.rootfs,
        # Go writes a UTC time as RFC 3339 with "Z", Python's isoformat with "+00:00".
        "created": state.created.removesuffix("+00:00") + "Z" if state.created.endswith("+00:00") else state.created,
        "owner": state.owner,
        "annotations": state.annotations,
    }


def with_proxy(socket_dir: Path, request_timeout: float, operation: Callable[[ProxyClient], Awaitable[T]]) -> T:
    """Connect to the proxy serving in ``socket_dir``, run ``operation``, disconnect."""

    async def call() -> T:
        proxy = await ProxyClient.connect(socket_dir, request_timeout)
        try:
            return await operation(proxy)
        finally:
            with contextlib.suppress(CapsaError, OSError):
                await proxy.aclose()

    return asyncio.run(call())
