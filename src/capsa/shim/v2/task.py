"""``containerd.task.v2.Task`` served over our ttrpc, on top of :class:`~capsa.shim.v2.pod.Pod`.

Each handler is thin: decode containerd's request, call the pod, publish
the event containerd expects for it, encode the reply.  Errors become the
gRPC codes containerd's ``errdefs`` maps back: NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument, Unimplemented (containerd's task
manager treats NotFound from Kill and Delete as "already gone").
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from capsa import __version__
from capsa.errors import CapsaError, ContainerExists, ContainerNotFound, InvalidArgument, WrongState
from capsa.protocols.containerd.cgroups.v2 import metrics_pb2
from capsa.protocols.containerd.events import task_pb2 as events
from capsa.protocols.containerd.task.v2 import shim_pb2 as pb
from capsa.protocols.containerd.types.task import task_pb2 as types
from capsa.shim.v2.events import Publisher
from capsa.shim.v2.pod import Pod, Process, RootfsMount, Status, Stdio
from capsa.shim.v2.wire import (
    OCI_LINUX_RESOURCES_TYPE_URL,
    OCI_PROCESS_TYPE_URL,
    TASK_SERVICE,
    pack_any,
    timestamp,
)
from capsa.ttrpc.errors import Code, StatusError
from capsa.ttrpc.server import Context, Method, Server, unary_method

log = logging.getLogger("capsa.shimv2")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

_STATUS = {
    Status.CREATED: types.CREATED,
    Status.RUNNING: types.RUNNING,
    Status.STOPPED: types.STOPPED,
    Status.PAUSED: types.PAUSED,
}


def exit_event(process: Process, pid: int) -> events.TaskExit:
    """What containerd must hear when a process ends (its only news of the exit)."""
    return events.TaskExit(
        container_id=process.container_id,
        id=process.id,
        pid=pid,
        exit_status=process.exit_status,
        exited_at=timestamp(process.exited_at_ns),
    )


class TaskService:
    def __init__(self, pod: Pod, publisher: Publisher, request_shutdown: Callable[[], None]) -> None:
        self.pod = pod
        self.events = publisher
        self._request_shutdown = request_shutdown

    # -- the methods, in shim.proto's order -------------------------------------

    async def state(self, request: pb.StateRequest) -> pb.StateResponse:
        container = self.pod.container(request.id)
        process = container.process(request.exec_id)
        response = pb.StateResponse(
            id=process.id,
            bundle=str(container.bundle),
            pid=self.pod.pid,
            status=_STATUS.get(process.status, types.UNKNOWN),
            stdin=process.stdio.stdin,
            stdout=process.stdio.stdout,
            stderr=process.stdio.stderr,
            terminal=process.stdio.terminal,
            exit_status=process.exit_status,
            exec_id=request.exec_id,
        )
        if process.exited.is_set():
            response.exited_at.CopyFrom(timestamp(process.exited_at_ns))
        return response

    async def create(self, request: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if request.checkpoint:
            raise StatusError(Code.UNIMPLEMENTED, "capsa cannot restore a checkpoint")
        bundle = Path(request.bundle)
        spec = _read_spec(bundle)
        mounts = [RootfsMount(m.type, m.source, tuple(m.options)) for m in request.rootfs]
        stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
        await self.pod.create(request.id, bundle, mounts, stdio, spec)
        pid = self.pod.pid
        self.events.publish(
            events.TaskCreate(
                container_id=request.id,
                bundle=request.bundle,
                rootfs=request.rootfs,
                io=events.TaskIO(
                    stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal
                ),
                pid=pid,
            )
        )
        return pb.CreateTaskResponse(pid=pid)

    async def start(self, request: pb.StartRequest) -> pb.StartResponse:
        await self.pod.start(request.id, request.exec_id)
        pid = self.pod.pid
        if request.exec_id:
            self.events.publish(events.TaskExecStarted(container_id=request.id, exec_id=request.exec_id, pid=pid))
        else:
            self.events.publish(events.TaskStart(container_id=request.id, pid=pid))
        return pb.StartResponse(pid=pid)

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        pid = self.pod.pid
        process = await self.pod.delete(request.id, request.exec_id)
        exited_at = timestamp(process.exited_at_ns)
        if not request.exec_id:
            self.events.publish(
                events.TaskDelete(
                    container_id=request.id,
                    pid=pid,
                    exit_status=process.exit_status,
                    exited_at=exited_at,
                    id=request.id,
                )
            )
        return pb.DeleteResponse(pid=pid, exit_status=process.exit_status, exited_at=exited_at)

    async def pids(self, request: pb.PidsRequest) -> pb.PidsResponse:
        pids = await self.pod.pids(request.id)
        return pb.PidsResponse(processes=[types.ProcessInfo(pid=pid) for pid in pids])

    async def pause(self, request: pb.PauseRequest) -> empty_pb2.Empty:
        await self.pod.pause(request.id)
        self.events.publish(events.TaskPaused(container_id=request.id))
        return empty_pb2.Empty()

    async def resume(self, request: pb.ResumeRequest) -> empty_pb2.Empty:
        await self.pod.resume(request.id)
        self.events.publish(events.TaskResumed(container_id=request.id))
        return empty_pb2.Empty()

    async def checkpoint(self, request: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise StatusError(Code.UNIMPLEMENTED, "capsa cannot checkpoint a container in a VM yet")

    async def kill(self, request: pb.KillRequest) -> empty_pb2.Empty:
        process = self.pod.container(request.id).process(request.exec_id)
        if process.exited.is_set():
            raise StatusError(Code.NOT_FOUND, "process already finished")
        await self.pod.kill(request.id, request.exec_id, request.signal or signal.SIGTERM, request.all)
        return empty_pb2.Empty()

    async def exec(self, request: pb.ExecProcessRequest) -> empty_pb2.Empty:
        if request.spec.type_url and not request.spec.type_url.endswith("/Process"):
            raise InvalidArgument(f"exec spec of type {request.spec.type_url}, expected {OCI_PROCESS_TYPE_URL}")
        try:
            spec = json.loads(request.spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"exec spec is not the OCI process JSON: {exc}") from exc
        stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
        spec["terminal"] = request.terminal
        await self.pod.exec(request.id, request.exec_id, spec, stdio)
        self.events.publish(events.TaskExecAdded(container_id=request.id, exec_id=request.exec_id))
        return empty_pb2.Empty()

    async def resize_pty(self, request: pb.ResizePtyRequest) -> empty_pb2.Empty:
        await self.pod.resize_pty(request.id, request.exec_id, request.height, request.width)
        return empty_pb2.Empty()

    async def close_io(self, request: pb.CloseIORequest) -> empty_pb2.Empty:
        if request.stdin:
            await self.pod.close_stdin(request.id, request.exec_id)
        return empty_pb2.Empty()

    async def update(self, request: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        if request.resources.type_url and not request.resources.type_url.endswith("/LinuxResources"):
            raise InvalidArgument(
                f"resources of type {request.resources.type_url}, expected {OCI_LINUX_RESOURCES_TYPE_URL}"
            )
        try:
            resources = json.loads(request.resources.value or b"{}")
        except ValueError as exc:
            raise InvalidArgument(f"resources are not OCI LinuxResources JSON: {exc}") from exc
        await self.pod.update(request.id, resources)
        return empty_pb2.Empty()

    async def wait(self, request: pb.WaitRequest) -> pb.WaitResponse:
        process = await self.pod.wait(request.id, request.exec_id)
        return pb.WaitResponse(exit_status=process.exit_status, exited_at=timestamp(process.exited_at_ns))

    async def stats(self, request: pb.StatsRequest) -> pb.StatsResponse:
        stats = await self.pod.stats(request.id)
        metrics = metrics_pb2.Metrics(
            pids=metrics_pb2.PidsStat(current=stats.pids_current),
            cpu=metrics_pb2.CPUStat(usage_usec=stats.cpu_usage_usec),
            memory=metrics_pb2.MemoryStat(usage=stats.memory_usage_bytes, usage_limit=stats.memory_limit_bytes),
            memory_events=metrics_pb2.MemoryEvents(oom_kill=stats.oom_kills),
        )
        return pb.StatsResponse(stats=pack_any(metrics))

    async def connect(self, request: pb.ConnectRequest) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self.pod.pid, version=__version__)

    async def shutdown(self, request: pb.ShutdownRequest) -> empty_pb2.Empty:
        # containerd asks after each Delete; the shim goes once its pod is empty.
        if request.now or not self.pod.containers:
            self._request_shutdown()
        return empty_pb2.Empty()


def register(server: Server, service: TaskService) -> None:
    methods: dict[str, Method] = {
        "State": _method(pb.StateRequest, service.state),
        "Create": _method(pb.CreateTaskRequest, service.create),
        "Start": _method(pb.StartRequest, service.start),
        "Delete": _method(pb.DeleteRequest, service.delete),
        "Pids": _method(pb.PidsRequest, service.pids),
        "Pause": _method(pb.PauseRequest, service.pause),
        "Resume": _method(pb.ResumeRequest, service.resume),
        "Checkpoint": _method(pb.CheckpointTaskRequest, service.checkpoint),
        "Kill": _method(pb.KillRequest, service.kill),
        "Exec": _method(pb.ExecProcessRequest, service.exec),
        "ResizePty": _method(pb.ResizePtyRequest, service.resize_pty),
        "CloseIO": _method(pb.CloseIORequest, service.close_io),
        "Update": _method(pb.UpdateTaskRequest, service.update),
        "Wait": _method(pb.WaitRequest, service.wait),
        "Stats": _method(pb.StatsRequest, service.stats),
        "Connect": _method(pb.ConnectRequest, service.connect),
        "Shutdown": _method(pb.ShutdownRequest, service.shutdown),
    }
    server.register_service(TASK_SERVICE, methods)


def _method(request_type: type[Req], handler: Callable[[Req], Awaitable[Resp]]) -> Method:
    async def call(request: Req, context: Context) -> Resp:
        try:
            return await handler(request)
        except StatusError:
            raise
        except ContainerNotFound as exc:
            raise StatusError(Code.NOT_FOUND, str(exc)) from exc
        except ContainerExists as exc:
            raise StatusError(Code.ALREADY_EXISTS, str(exc)) from exc
        except WrongState as exc:
            raise StatusError(Code.FAILED_PRECONDITION, str(exc)) from exc
        except InvalidArgument as exc:
            raise StatusError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except CapsaError as exc:
            log.error("%s failed: %s", request_type.DESCRIPTOR.name, exc)
            raise StatusError(Code.UNKNOWN, str(exc)) from exc

    return unary_method(request_type, call)


def _read_spec(bundle: Path) -> dict[str, Any]:
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from exc
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path}: expected a JSON object")
    return spec
