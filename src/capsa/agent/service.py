"""The ttrpc handlers of ``capsa.agent.v1.AgentService`` (agent.proto).

Each handler is thin: take the fields out of the request, call
:class:`capsa.agent.sandbox.Sandbox`, build the response.  Errors are mapped
to ttrpc status codes (google.rpc.Code numbering) in one place,
:func:`status_code`, so the host reads the same code for the same failure
from every method: unknown container or exec -> NOT_FOUND, wrong lifecycle
state -> FAILED_PRECONDITION, bad input -> INVALID_ARGUMENT, crun's refusal
-> UNKNOWN with crun's own message.  The network calls follow suit: a NIC
that never appeared -> NOT_FOUND, the kernel's refusal of a netlink
request -> UNKNOWN with the request and the errno's words.  The TCP
streams (port forwarding): nothing listening on the port, or an unknown
stream -> NOT_FOUND, a connection reset under a read or write -> ABORTED,
too many open -> RESOURCE_EXHAUSTED.

Every request is first checked against the agent policy in force
(:mod:`capsa.agent.policy`); a refusal leaves as PERMISSION_DENIED naming
the rule, before the handler runs.

The network modules (and pyroute2 under them) are imported on the first
UpdateInterface/UpdateRoutes only: most containers never configure a NIC.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

import capsa
from capsa.agent.container import ProcessNotFound
from capsa.agent.policy import Enforcer, PolicyError
from capsa.agent.policy import parse as parse_policy
from capsa.agent.sandbox import CrunFailed, Sandbox
from capsa.agent.tcpstream import PortUnreachable, StreamBroken, StreamNotFound, TcpStreams, TooManyStreams
from capsa.errors import BundleError, CapsaError, ContainerExists, ContainerNotFound, InvalidArgument, WrongState
from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.errors import Code, StatusError
from capsa.ttrpc.server import Context, Server, unary_method

if TYPE_CHECKING:
    from capsa.agent.netlink import GuestNetwork

SERVICE_NAME = "capsa.agent.v1.AgentService"
#: What GetGuestDetails' agent_hash_probe hashes (agent.proto).
HASH_PROBE = "capsa-agent-hash-probe"

log = logging.getLogger("capsa.agent")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class Timing:
    """Where the guest's boot went (GuestDetailsResponse fields 6 and 7).

    Times are CLOCK_BOOTTIME seconds (guest uptime).  When /init was exec'd
    is looked up only when asked (``find_exec``), off the startup path.
    """

    def __init__(self, started: float, find_exec: Callable[[], float | None]) -> None:
        self.started = started  # main() was entered
        self.ready = started  # the channel was first served
        self._find_exec = find_exec
        self._exec: float | None = None

    def exec_time(self) -> float:
        if self._exec is None:
            try:
                found = self._find_exec()
            except OSError as exc:
                log.debug("cannot tell when /init started: %s", exc)
                found = None
            self._exec = self.started if found is None else found
        return self._exec

    @property
    def kernel_boot_seconds(self) -> float:
        return self.exec_time()

    @property
    def agent_start_seconds(self) -> float:
        return self.ready - self.exec_time()


def status_code(exc: CapsaError) -> Code:
    """The ttrpc status code for an agent error (see the module docstring)."""
    if isinstance(exc, ContainerNotFound | ProcessNotFound | StreamNotFound | PortUnreachable):
        return Code.NOT_FOUND
    if isinstance(exc, StreamBroken):
        return Code.ABORTED
    if isinstance(exc, TooManyStreams):
        return Code.RESOURCE_EXHAUSTED
    if isinstance(exc, ContainerExists):
        return Code.ALREADY_EXISTS
    if isinstance(exc, WrongState):
        return Code.FAILED_PRECONDITION
    if isinstance(exc, InvalidArgument | BundleError):
        return Code.INVALID_ARGUMENT
    if isinstance(exc, CrunFailed):
        return Code.UNKNOWN
    from capsa.agent import network  # only now: see the module docstring

    if isinstance(exc, network.InterfaceNotFound):
        return Code.NOT_FOUND
    if isinstance(exc, network.NetlinkFailed):
        return Code.UNKNOWN
    return Code.INTERNAL


def _translated(
    handler: Callable[[Req], Awaitable[Resp]], method: str, policy: Enforcer
) -> Callable[[Req, Context], Awaitable[Resp]]:
    """Wrap a handler: the policy first, then every failure leaves as a StatusError."""

    async def run(request: Req, context: Context) -> Resp:
        refusal = policy.check(method, request)
        if refusal is not None:
            raise StatusError(Code.PERMISSION_DENIED, refusal)
        try:
            return await handler(request)
        except StatusError:
            raise
        except CapsaError as exc:
            log.debug("%s: %s", method, exc)
            raise StatusError(status_code(exc), str(exc)) from exc
        except OSError as exc:
            log.warning("%s failed: %s", method, exc)
            raise StatusError(Code.INTERNAL, f"{method}: {exc}") from exc

    return run


T = TypeVar("T")


async def _uninterrupted(operation: Awaitable[T]) -> T:
    """Finish ``operation`` even if the caller is cancelled.

    The ttrpc server cancels a handler when its connection drops or its
    deadline passes; a half-done create (crun's container made, not yet
    registered) or remove would leak mounts and crun state.  The host sees
    the cancellation; the guest completes the operation.
    """
    task = asyncio.ensure_future(operation)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Marks a failure as seen even when nobody awaits the task any more (its
    # caller was cancelled), so asyncio does not report it as never retrieved.
    if not task.cancelled():
        task.exception()


def _mem_total_bytes() -> int:
    """MemTotal from /proc/meminfo (proc(5): in kB)."""
    with open("/proc/meminfo", encoding="ascii") as file:
        for line in file:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class AgentService:
    """The agent API over one :class:`Sandbox`."""

    def __init__(
        self,
        sandbox: Sandbox,
        timing: Timing,
        on_destroyed: Callable[[], None],
        policy: Enforcer | None = None,
        on_renew: Callable[[], None] | None = None,
        renewals: int = 0,
    ) -> None:
        self.sandbox = sandbox
        self.timing = timing
        self.policy = policy if policy is not None else Enforcer()
        #: Called once a RenewAgent reply is on its way: serving stops and
        #: the agent re-executes itself (agent/main.py); None: cannot renew.
        self._on_renew = on_renew
        self.renewals = renewals
        self._on_destroyed = on_destroyed
        self._network: GuestNetwork | None = None
        self.tcp_streams = TcpStreams()

    def register(self, server: Server) -> None:
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "Check": (pb.CheckRequest, self.check),
            "GetGuestDetails": (pb.GuestDetailsRequest, self.get_guest_details),
            "CreateSandbox": (pb.CreateSandboxRequest, self.create_sandbox),
            "DestroySandbox": (pb.DestroySandboxRequest, self.destroy_sandbox),
            "CreateContainer": (pb.CreateContainerRequest, self.create_container),
            "StartContainer": (pb.StartContainerRequest, self.start_container),
            "RemoveContainer": (pb.RemoveContainerRequest, self.remove_container),
            "PauseContainer": (pb.PauseContainerRequest, self.pause_container),
            "ResumeContainer": (pb.ResumeContainerRequest, self.resume_container),
            "StatsContainer": (pb.StatsContainerRequest, self.stats_container),
            "UpdateContainer": (pb.UpdateContainerRequest, self.update_container),
            "ExecProcess": (pb.ExecProcessRequest, self.exec_process),
            "SignalProcess": (pb.SignalProcessRequest, self.signal_process),
            "WaitProcess": (pb.WaitProcessRequest, self.wait_process),
            "ListProcesses": (pb.ListProcessesRequest, self.list_processes),
            "WriteStdin": (pb.WriteStreamRequest, self.write_stdin),
            "ReadStdout": (pb.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (pb.ReadStreamRequest, self.read_stderr),
            "CloseStdin": (pb.CloseStdinRequest, self.close_stdin),
            "TtyWinResize": (pb.TtyWinResizeRequest, self.tty_win_resize),
            "UpdateInterface": (pb.UpdateInterfaceRequest, self.update_interface),
            "UpdateRoutes": (pb.UpdateRoutesRequest, self.update_routes),
            "GetOOMEvent": (pb.GetOOMEventRequest, self.get_oom_event),
            "SetPolicy": (pb.SetPolicyRequest, self.set_policy),
            "RenewAgent": (pb.RenewAgentRequest, self.renew_agent),
            "DebugConsole": (pb.DebugConsoleRequest, self.debug_console),
            "OpenTcpStream": (pb.OpenTcpStreamRequest, self.open_tcp_stream),
            "WriteTcpStream": (pb.WriteTcpStreamRequest, self.write_tcp_stream),
            "ReadTcpStream": (pb.ReadTcpStreamRequest, self.read_tcp_stream),
            "CloseTcpStream": (pb.CloseTcpStreamRequest, self.close_tcp_stream),
        }
        server.register_service(
            SERVICE_NAME,
            {
                name: unary_method(kind, _translated(handler, name, self.policy))
                for name, (kind, handler) in table.items()
            },
        )

    # --- health and guest ------------------------------------------------

    async def check(self, request: pb.CheckRequest) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    async def get_guest_details(self, request: pb.GuestDetailsRequest) -> pb.GuestDetailsResponse:
        return pb.GuestDetailsResponse(
            kernel_release=os.uname().release,
            agent_version=capsa.__version__,
            crun_version=await self.sandbox.crun_version(),
            online_cpus=os.cpu_count() or 0,
            mem_total_bytes=_mem_total_bytes(),
            kernel_boot_seconds=self.timing.kernel_boot_seconds,
            agent_start_seconds=self.timing.agent_start_seconds,
            policy_digest=self.policy.policy.digest,
            policy_denials=self.policy.denied,
            agent_hash_probe=hash(HASH_PROBE) & 0xFFFF_FFFF_FFFF_FFFF,
            agent_renewals=self.renewals,
            load_average=list(os.getloadavg()),
        )

    async def renew_agent(self, request: pb.RenewAgentRequest) -> pb.Empty:
        if self._on_renew is None:
            raise WrongState("this agent cannot renew itself (it is not a guest's init)")
        if self.sandbox.created:
            raise WrongState("the agent renews itself only before CreateSandbox")
        self.sandbox.add_entropy(request.entropy)
        self._on_renew()
        return pb.Empty()

    async def set_policy(self, request: pb.SetPolicyRequest) -> pb.Empty:
        try:
            policy = parse_policy(request.policy)
        except PolicyError as exc:
            raise InvalidArgument(f"agent policy: {exc}") from exc
        self.policy.policy = policy
        log.info("agent policy %s in force", policy.digest[:12])
        return pb.Empty()

    # --- sandbox ------------------------------------------------------------

    async def create_sandbox(self, request: pb.CreateSandboxRequest) -> pb.Empty:
        await self.sandbox.adopt(request.entropy, request.realtime_ns, request.virtiofs_devices)
        self.sandbox.create(request.hostname, list(request.storages), list(request.dns), request.debug_console)
        return pb.Empty()

    async def destroy_sandbox(self, request: pb.DestroySandboxRequest) -> pb.Empty:
        self.tcp_streams.close_all()
        await _uninterrupted(self.sandbox.destroy())
        # The VM powers off only after this reply went out.
        self._on_destroyed()
        return pb.Empty()

    # --- containers -----------------------------------------------------------

    async def create_container(self, request: pb.CreateContainerRequest) -> pb.Empty:
        await _uninterrupted(
            self.sandbox.create_container(
                request.container_id,
                request.oci_spec_json,
                request.rootfs,
                list(request.storages),
                sandbox_container_id=request.sandbox_container_id,
            )
        )
        return pb.Empty()

    async def start_container(self, request: pb.StartContainerRequest) -> pb.Empty:
        await _uninterrupted(self.sandbox.start_container(request.container_id))
        return pb.Empty()

    async def remove_container(self, request: pb.RemoveContainerRequest) -> pb.Empty:
        await _uninterrupted(self.sandbox.remove_container(request.container_id, request.timeout_seconds))
        return pb.Empty()

    async def pause_container(self, request: pb.PauseContainerRequest) -> pb.Empty:
        await self.sandbox.pause_container(request.container_id)
        return pb.Empty()

    async def resume_container(self, request: pb.ResumeContainerRequest) -> pb.Empty:
        await self.sandbox.resume_container(request.container_id)
        return pb.Empty()

    async def stats_container(self, request: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        stats = self.sandbox.stats(request.container_id)
        return pb.StatsContainerResponse(
            cpu_usage_usec=stats.cpu_usage_usec,
            memory_usage_bytes=stats.memory_usage_bytes,
            memory_limit_bytes=stats.memory_limit_bytes,
            pids_current=stats.pids_current,
            oom_kills=stats.oom_kills,
        )

    async def update_container(self, request: pb.UpdateContainerRequest) -> pb.Empty:
        await _uninterrupted(self.sandbox.update_container(request.container_id, request.resources_json))
        return pb.Empty()

    async def list_processes(self, request: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(pids=self.sandbox.pids(request.container_id))

    # --- processes ----------------------------------------------------------------

    async def exec_process(self, request: pb.ExecProcessRequest) -> pb.Empty:
        await _uninterrupted(self.sandbox.exec_process(request.container_id, request.exec_id, request.process_json))
        return pb.Empty()

    async def debug_console(self, request: pb.DebugConsoleRequest) -> pb.Empty:
        self.sandbox.debug_console(request.exec_id, list(request.args), list(request.env), request.terminal)
        return pb.Empty()

    async def signal_process(self, request: pb.SignalProcessRequest) -> pb.Empty:
        await self.sandbox.signal_process(request.container_id, request.exec_id, request.signal, request.all)
        return pb.Empty()

    async def wait_process(self, request: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        status, signum = await self.sandbox.wait_process(request.container_id, request.exec_id)
        return pb.WaitProcessResponse(status=status, signal=signum)

    # --- stdio -------------------------------------------------------------------------

    async def write_stdin(self, request: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        process = self.sandbox.process(request.container_id, request.exec_id)
        return pb.WriteStreamResponse(len=await process.io.stdin.write(request.data))

    async def read_stdout(self, request: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        process = self.sandbox.process(request.container_id, request.exec_id)
        return pb.ReadStreamResponse(data=await process.io.stdout.read(request.len))

    async def read_stderr(self, request: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        process = self.sandbox.process(request.container_id, request.exec_id)
        if process.io.stderr is None:  # a terminal: everything came through stdout
            return pb.ReadStreamResponse(data=b"")
        return pb.ReadStreamResponse(data=await process.io.stderr.read(request.len))

    async def close_stdin(self, request: pb.CloseStdinRequest) -> pb.Empty:
        self.sandbox.process(request.container_id, request.exec_id).io.stdin.close()
        return pb.Empty()

    async def tty_win_resize(self, request: pb.TtyWinResizeRequest) -> pb.Empty:
        self.sandbox.process(request.container_id, request.exec_id).io.resize(request.row, request.column)
        return pb.Empty()

    # --- network ---------------------------------------------------------------------

    def _guest_network(self) -> GuestNetwork:
        """The guest's network, made on first use; a host-mode agent must not touch its host's."""
        if not self.sandbox.options.guest:
            raise WrongState("this agent is not a guest's init: it does not configure its host's network")
        if self._network is None:
            from capsa.agent.netlink import GuestNetwork

            self._network = GuestNetwork()
        return self._network

    async def update_interface(self, request: pb.UpdateInterfaceRequest) -> pb.Interface:
        from capsa.agent import network

        if not request.HasField("interface"):
            raise InvalidArgument("UpdateInterface needs an interface")
        network.interface_request(request.interface)  # bad input is refused before anything else
        return await _uninterrupted(self._guest_network().update_interface(request.interface))

    async def update_routes(self, request: pb.UpdateRoutesRequest) -> pb.Routes:
        routes = await _uninterrupted(self._guest_network().update_routes(list(request.routes.routes)))
        return pb.Routes(routes=routes)

    # --- OOM kills ---------------------------------------------------------------------

    async def get_oom_event(self, request: pb.GetOOMEventRequest) -> pb.OOMEvent:
        if not request.container_id:
            return pb.OOMEvent(container_id=await self.sandbox.next_oom_event())
        kills, stopped = await self.sandbox.wait_oom_kill(request.container_id, request.oom_kills_seen)
        return pb.OOMEvent(container_id=request.container_id, oom_kills=kills, stopped=stopped)

    # --- TCP streams to the guest's loopback (port forwarding) ------------------------

    async def open_tcp_stream(self, request: pb.OpenTcpStreamRequest) -> pb.OpenTcpStreamResponse:
        return pb.OpenTcpStreamResponse(stream_id=await self.tcp_streams.open(request.port))

    async def write_tcp_stream(self, request: pb.WriteTcpStreamRequest) -> pb.WriteStreamResponse:
        return pb.WriteStreamResponse(len=await self.tcp_streams.write(request.stream_id, request.data))

    async def read_tcp_stream(self, request: pb.ReadTcpStreamRequest) -> pb.ReadStreamResponse:
        return pb.ReadStreamResponse(data=await self.tcp_streams.read(request.stream_id, request.len))

    async def close_tcp_stream(self, request: pb.CloseTcpStreamRequest) -> pb.Empty:
        self.tcp_streams.close(request.stream_id, request.write_only)
        return pb.Empty()
