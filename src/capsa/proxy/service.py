"""What capsa-proxy serves on ``proxy.sock`` in the container's socket directory (runtime/state.py).

Two ttrpc services share the socket:

- ``capsa.agent.v1.AgentService``, forwarded: each request of any host client
  is sent as a new stream on the proxy's one agent connection, its payload
  untouched, and the agent's reply (or status) goes back to that client.
  The proxy does not decode agent messages, so every agent method, including
  ones added later, passes through.  The client's deadline travels with it.
- ``capsa.proxy.v1.Proxy`` (proxy.proto), what only the VM's owner can do.

The agent connection is the VM's single channel: a virtio-serial port
carries one ttrpc session, and reconnecting to it can meet the guest's
previous session, so every host client goes through here instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from capsa.errors import CapsaError
from capsa.protocols import agent_pb2, proxy_pb2
from capsa.proxy.launch import PROXY_SERVICE
from capsa.runtime.agent_client import SERVICE as AGENT_SERVICE
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code, ConnectionClosed, StatusError
from capsa.ttrpc.server import Context, Method, Server, unary_method

if TYPE_CHECKING:
    from capsa.proxy.proxy import Proxy

log = logging.getLogger("capsa.proxy")

T = TypeVar("T")


def agent_methods() -> tuple[str, ...]:
    """Every method of the agent API, from the compiled .proto."""
    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    return tuple(method.name for method in service.methods)


def forwarder(agent: Callable[[], Client], method: str) -> Method:
    """A handler that sends the request on to the agent and returns its reply."""

    async def forward(payload: bytes, context: Context) -> bytes:
        timeout = None
        if context.deadline is not None:
            timeout = max(0.001, context.deadline - asyncio.get_running_loop().time())
        try:
            return await agent().call(AGENT_SERVICE, method, payload, timeout=timeout, metadata=context.metadata)
        except ConnectionClosed as exc:
            raise StatusError(Code.UNAVAILABLE, f"the VM's agent is gone: {exc}") from exc

    return forward


def build_server(proxy: Proxy) -> Server:
    server = Server()
    server.register_service(
        AGENT_SERVICE, {name: forwarder(proxy.agent_connection, name) for name in agent_methods()}
    )

    async def create_container(request: proxy_pb2.CreateContainerRequest, context: Context) -> proxy_pb2.Empty:
        # The capsa create that asks checked this config.json against the schema.
        await _as_status(proxy.create_container(request.container_id, request.bundle, check_schema=False))
        return proxy_pb2.Empty()

    async def attach_network(request: proxy_pb2.AttachNetworkRequest, context: Context) -> proxy_pb2.Empty:
        await _as_status(proxy.attach_network(request.netns))
        return proxy_pb2.Empty()

    async def info(request: proxy_pb2.InfoRequest, context: Context) -> proxy_pb2.InfoResponse:
        return proxy.info()

    async def resize_vm(request: proxy_pb2.ResizeVMRequest, context: Context) -> proxy_pb2.ResizeVMResponse:
        vcpus, memory_mib = await _as_status(proxy.resize(request.vcpus, request.memory_mib))
        return proxy_pb2.ResizeVMResponse(vcpus=vcpus, memory_mib=memory_mib)

    async def shutdown(request: proxy_pb2.ShutdownRequest, context: Context) -> proxy_pb2.Empty:
        proxy.request_shutdown("asked to shut down")
        return proxy_pb2.Empty()

    server.register_service(
        PROXY_SERVICE,
        {
            "CreateContainer": unary_method(proxy_pb2.CreateContainerRequest, create_container),
            "AttachNetwork": unary_method(proxy_pb2.AttachNetworkRequest, attach_network),
            "Info": unary_method(proxy_pb2.InfoRequest, info),
            "ResizeVM": unary_method(proxy_pb2.ResizeVMRequest, resize_vm),
            "Shutdown": unary_method(proxy_pb2.ShutdownRequest, shutdown),
        },
    )
    return server


async def _as_status(operation: Awaitable[T]) -> T:
    """Our own errors reach the client as their one-line message."""
    try:
        return await operation
    except StatusError:
        raise
    except CapsaError as exc:
        raise StatusError(Code.FAILED_PRECONDITION, str(exc)) from exc
