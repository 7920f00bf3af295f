"""The host's side of the agent API: typed calls over one ttrpc connection.

The connection is the VM's agent channel: a virtio-serial port that QEMU
exposes as a unix socket on the host, or a vsock port of the guest.  A
request sent before the guest opened its end simply waits in the channel
(QEMU stops reading the socket while the port is closed), so the first
``Check`` doubles as "wait until the agent is up".  Errors the agent reports
arrive as :class:`capsa.errors.AgentError` carrying the agent's own message,
which is what the user should read (crun's words for a failed exec, say).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from capsa.errors import AgentError, AgentGone
from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code, ConnectionClosed, StatusError, TtrpcError

SERVICE = "capsa.agent.v1.AgentService"
M = TypeVar("M", bound=Message)
_VSOCK_RETRY_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ENODEV, errno.ETIMEDOUT}


class AgentClient:
    def __init__(self, client: Client, request_timeout: float) -> None:
        self._client = client
        self._timeout = request_timeout

    @classmethod
    async def serving_serial(cls, socket_path: Path, request_timeout: float, check_timeout: float) -> AgentClient:
        """Connected on the virtio-serial socket, once the agent answered ``Check`` (a template VM's)."""
        agent = await cls.connect_serial(socket_path, request_timeout)
        try:
            await agent.check(timeout=check_timeout)
        except BaseException:
            await agent.aclose()
            raise
        return agent

    @classmethod
    async def connect_serial(cls, socket_path: Path, request_timeout: float) -> AgentClient:
        """Connect to the host end of the virtio-serial agent port (QEMU listens)."""
        try:
            client = await Client.connect_unix(str(socket_path))
        except OSError as exc:
            raise AgentError(f"cannot reach the agent channel {socket_path}: {exc.strerror}") from exc
        return cls(client, request_timeout)

    @classmethod
    async def connect_vsock(cls, cid: int, port: int, deadline: float, request_timeout: float) -> AgentClient:
        """Connect to the agent's vsock port, retrying until it listens or the deadline."""
        while True:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (cid, port))
                break
            except OSError as exc:
                sock.close()
                if exc.errno not in _VSOCK_RETRY_ERRNOS or time.monotonic() > deadline:
                    raise AgentError(f"cannot reach the agent on vsock {cid}:{port}: {exc.strerror}") from exc
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(Client(reader, writer), request_timeout)

    @property
    def connection(self) -> Client:
        """The ttrpc connection underneath, for the proxy's forwarding."""
        return self._client

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, request: Message, response_type: type[M], timeout: float | None = -1.0) -> M:
        # timeout=-1 means "the configured request timeout"; None means wait forever
        # (WaitProcess and the stdio reads block for as long as the process lives).
        effective = self._timeout if timeout == -1.0 else timeout
        try:
            return await self._client.unary(SERVICE, method, request, response_type, timeout=effective)
        except StatusError as exc:
            # UNAVAILABLE: the proxy's word for an agent connection that closed (proxy/service.py).
            kind = AgentGone if exc.code is Code.UNAVAILABLE else AgentError
            raise kind(exc.message or f"agent {method} failed ({exc.code.name})") from exc
        except ConnectionClosed as exc:
            raise AgentGone(f"agent {method}: {exc}") from exc
        except TtrpcError as exc:
            raise AgentError(f"agent {method}: {exc}") from exc

    async def check(self, timeout: float) -> None:
        response = await self._call("Check", pb.CheckRequest(), pb.CheckResponse, timeout=timeout)
        if response.status != pb.CheckResponse.SERVING:
            raise AgentError("the agent is up but not serving")

    async def guest_details(self) -> pb.GuestDetailsResponse:
        return await self._call("GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)

    async def create_sandbox(self, request: pb.CreateSandboxRequest) -> None:
        await self._call("CreateSandbox", request, pb.Empty)

    async def renew_agent(self, entropy: bytes) -> None:
        await self._call("RenewAgent", pb.RenewAgentRequest(entropy=entropy), pb.Empty)

    async def set_policy(self, policy: bytes) -> None:
        await self._call("SetPolicy", pb.SetPolicyRequest(policy=policy), pb.Empty)

    async def destroy_sandbox(self) -> None:
        await self._call("DestroySandbox", pb.DestroySandboxRequest(), pb.Empty)

    async def create_container(self, request: pb.CreateContainerRequest) -> None:
        await self._call("CreateContainer", request, pb.Empty)

    async def start_container(self, container_id: str) -> None:
        await self._call("StartContainer", pb.StartContainerRequest(container_id=container_id), pb.Empty)

    async def remove_container(self, container_id: str, timeout_seconds: int = 0) -> None:
        request = pb.RemoveContainerRequest(container_id=container_id, timeout_seconds=timeout_seconds)
        await self._call("RemoveContainer", request, pb.Empty)

    async def signal_process(self, container_id: str, exec_id: str, signal: int, all: bool = False) -> None:
        request = pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=signal, all=all)
        await self._call("SignalProcess", request, pb.Empty)

    async def wait_process(self, container_id: str, exec_id: str = "") -> pb.WaitProcessResponse:
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        return await self._call("WaitProcess", request, pb.WaitProcessResponse, timeout=None)

    async def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        response = await self._call("ReadStdout", request, pb.ReadStreamResponse, timeout=None)
        return response.data

    async def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        response = await self._call("ReadStderr", request, pb.ReadStreamResponse, timeout=None)
        return response.data

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        request = pb.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data)
        await self._call("WriteStdin", request, pb.WriteStreamResponse, timeout=None)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call("CloseStdin", pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id), pb.Empty)

    async def exec_process(self, container_id: str, exec_id: str, process: Mapping[str, Any]) -> None:
        request = pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process_json=json.dumps(process).encode()
        )
        await self._call("ExecProcess", request, pb.Empty)

    async def debug_console(self, exec_id: str, args: list[str], env: list[str], terminal: bool) -> None:
        """Start ``args`` in the guest itself, outside every container; relay it as container_id "" and ``exec_id``."""
        request = pb.DebugConsoleRequest(exec_id=exec_id, args=args, env=env, terminal=terminal)
        await self._call("DebugConsole", request, pb.Empty)

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", pb.PauseContainerRequest(container_id=container_id), pb.Empty)

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", pb.ResumeContainerRequest(container_id=container_id), pb.Empty)

    async def list_processes(self, container_id: str) -> list[int]:
        request = pb.ListProcessesRequest(container_id=container_id)
        return list((await self._call("ListProcesses", request, pb.ListProcessesResponse)).pids)

    async def stats_container(self, container_id: str) -> pb.StatsContainerResponse:
        request = pb.StatsContainerRequest(container_id=container_id)
        return await self._call("StatsContainer", request, pb.StatsContainerResponse)

    async def get_oom_event(self) -> str:
        """Wait (without a deadline) until the OOM killer strikes in a container; its ID."""
        response = await self._call("GetOOMEvent", pb.GetOOMEventRequest(), pb.OOMEvent, timeout=None)
        return response.container_id

    async def wait_oom_kill(self, container_id: str, seen: int, timeout: float) -> pb.OOMEvent | None:
        """Wait until the container's OOM kill count exceeds ``seen`` or its init exits.

        The agent's answer (``oom_kills``, ``stopped``), or None when neither
        happened within ``timeout`` seconds.  Nothing is consumed in the
        agent: other watchers of the same container see the same kills.
        """
        request = pb.GetOOMEventRequest(container_id=container_id, oom_kills_seen=seen)
        try:
            return await self._client.unary(SERVICE, "GetOOMEvent", request, pb.OOMEvent, timeout=timeout)
        except StatusError as exc:
            if exc.code is Code.DEADLINE_EXCEEDED:
                return None
            raise AgentError(exc.message or f"agent GetOOMEvent failed ({exc.code.name})") from exc
        except TtrpcError as exc:
            raise AgentError(f"agent GetOOMEvent: {exc}") from exc

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        request = pb.TtyWinResizeRequest(container_id=container_id, exec_id=exec_id, row=rows, column=columns)
        await self._call("TtyWinResize", request, pb.Empty)

    async def update_container(self, container_id: str, resources: Mapping[str, Any]) -> None:
        """New cgroup limits (an OCI ``linux.resources`` object) for a container, by ``crun update`` in the guest."""
        request = pb.UpdateContainerRequest(container_id=container_id, resources_json=json.dumps(resources).encode())
        await self._call("UpdateContainer", request, pb.Empty)

    async def update_interface(self, interface: pb.Interface) -> pb.Interface:
        """Configure the guest NIC with ``interface.hw_addr`` as ``interface`` says; the guest's result."""
        return await self._call("UpdateInterface", pb.UpdateInterfaceRequest(interface=interface), pb.Interface)

    async def update_routes(self, routes: pb.Routes) -> pb.Routes:
        """Replace the guest's routes with ``routes``; the guest's result."""
        return await self._call("UpdateRoutes", pb.UpdateRoutesRequest(routes=routes), pb.Routes)

    async def open_tcp_stream(self, port: int) -> int:
        """Connect to ``port`` on the guest's loopback (the pod's network namespace there); the stream's ID.
        Nothing listening there is an :class:`AgentError` at once."""
        response = await self._call("OpenTcpStream", pb.OpenTcpStreamRequest(port=port), pb.OpenTcpStreamResponse)
        return response.stream_id

    async def write_tcp_stream(self, stream_id: int, data: bytes) -> None:
        request = pb.WriteTcpStreamRequest(stream_id=stream_id, data=data)
        await self._call("WriteTcpStream", request, pb.WriteStreamResponse, timeout=None)

    async def read_tcp_stream(self, stream_id: int, size: int = 65536) -> bytes:
        """At least one byte, or ``b""`` at the end of the guest's data (waits without a deadline)."""
        request = pb.ReadTcpStreamRequest(stream_id=stream_id, len=size)
        response = await self._call("ReadTcpStream", request, pb.ReadStreamResponse, timeout=None)
        return response.data

    async def close_tcp_stream(self, stream_id: int, write_only: bool = False) -> None:
        """Shut the guest's end down for writing (``write_only``), or close the stream."""
        request = pb.CloseTcpStreamRequest(stream_id=stream_id, write_only=write_only)
        await self._call("CloseTcpStream", request, pb.Empty)
