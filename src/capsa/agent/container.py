"""The agent's in-memory registry of containers and their processes.

A container's lifecycle follows runtime-spec runtime.md "Lifecycle" as seen
from the agent: ``created`` after crun create, ``running`` after crun start,
``paused`` between pause and resume, ``stopped`` once its init process
exited.  The registry is the only state the agent keeps; it dies with the VM.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from capsa.agent.stdio import ProcessIO
from capsa.errors import CapsaError, ContainerExists, ContainerNotFound, WrongState


class ProcessNotFound(CapsaError):
    """No process with that exec ID in the container."""


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(eq=False)
class Process:
    """A container's init (exec_id "") or one of its exec'd processes."""

    container_id: str
    exec_id: str
    pid: int
    io: ProcessIO
    # (status, signal) as WaitProcessResponse has them, once it exited.
    exited: asyncio.Future[tuple[int, int]]

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def describe(self) -> str:
        if not self.container_id:
            return f"debug console process {self.exec_id}"
        if self.exec_id:
            return f"exec {self.exec_id} of container {self.container_id}"
        return f"container {self.container_id}"

    async def wait(self) -> tuple[int, int]:
        # shield: one cancelled WaitProcess must not cancel the exit future
        # every other waiter (and the state tracking) shares.
        return await asyncio.shield(self.exited)


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    # Mount points the agent mounted for this container, in mount order.
    mounts: list[str] = field(default_factory=list)
    state: ContainerState = ContainerState.CREATED
    init: Process | None = None
    execs: dict[str, Process] = field(default_factory=dict)
    # cgroup v2 path (relative to the cgroup2 root) of the container.
    cgroup: str = ""
    # Serialises lifecycle operations (start, pause, remove) on this container.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            if self.init is None:
                raise ProcessNotFound(f"container {self.id} has no init process")
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise ProcessNotFound(f"exec {exec_id} does not exist in container {self.id}") from None

    def processes(self) -> list[Process]:
        return [*([self.init] if self.init is not None else []), *self.execs.values()]

    def require(self, *states: ContainerState, action: str) -> None:
        """FAILED_PRECONDITION unless the container is in one of ``states``."""
        if self.state not in states:
            raise WrongState(f"cannot {action} container {self.id}: it is {self.state.value}")


class Registry:
    """Containers by ID, plus the IDs being created right now."""

    def __init__(self) -> None:
        self._containers: dict[str, Container] = {}
        self._reserved: set[str] = set()

    def get(self, container_id: str) -> Container:
        try:
            return self._containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None

    def all(self) -> list[Container]:
        return list(self._containers.values())

    def reserve(self, container_id: str) -> None:
        """Claim an ID for a CreateContainer in progress."""
        if container_id in self._containers or container_id in self._reserved:
            raise ContainerExists(f"container {container_id} already exists")
        self._reserved.add(container_id)

    def release(self, container_id: str) -> None:
        self._reserved.discard(container_id)

    def add(self, container: Container) -> None:
        self._reserved.discard(container.id)
        self._containers[container.id] = container

    def remove(self, container_id: str) -> None:
        self._containers.pop(container_id, None)
