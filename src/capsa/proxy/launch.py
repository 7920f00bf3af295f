"""The host side of capsa-proxy: start one, and talk to a running one.

Starting: ``capsa create`` runs ``python -m capsa.proxy`` in a session of
its own, with /dev/null as stdin and ``proxy.log`` as stdout and stderr (a
pipe inherited from the engine would keep the engine waiting for EOF long
after the container ended), and waits for the one line on the ready pipe.

Talking: :class:`ProxyClient` is one ttrpc connection to ``proxy.sock``
carrying both the forwarded agent API (:attr:`ProxyClient.agent`) and the
proxy's own control calls.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message

from capsa.errors import AgentError
from capsa.protocols import proxy_pb2 as pb
from capsa.runtime import daemon
from capsa.runtime.agent_client import AgentClient
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import StatusError, TtrpcError

M = TypeVar("M", bound=Message)

SOCKET_NAME = "proxy.sock"
PROXY_SERVICE = "capsa.proxy.v1.Proxy"

#: How long ``delete`` waits for a proxy to tear its VM down before SIGKILL.
SHUTDOWN_TIMEOUT = 15.0
#: In the state directory, once a VM stopped without being asked: why, in
#: one line (the guest console's last words: proxy.proxy.stop_report).
#: Kept until ``delete``, for the shims to tell the engine.
STOPPED_FILE = "vm-stopped"


def read_stopped(run_dir: Path) -> str | None:
    """Why the VM stopped by itself, as its proxy recorded it; None when it did not (or was asked to)."""
    try:
        text = (run_dir / STOPPED_FILE).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return text or None


def start_proxy(
    run_dir: Path,
    container_id: str,
    hostname: str,
    config_flag: str | None,
    debug: bool,
    timeout: float,
    netns: str = "",
) -> daemon.Started:
    """Start the proxy and return once it serves (on the network of ``netns``, if given);
    raise with its reason if it cannot."""
    # "--id=ID": runc's IDs may begin with "-", which argparse would take for a flag.
    args = ["--root", str(run_dir.parent), f"--id={container_id}"]
    if hostname:
        args.append(f"--hostname={hostname}")
    if netns:
        args.append(f"--netns={netns}")
    if config_flag:
        args += ["--config", config_flag]
    if debug:
        args.append("--debug")
    return daemon.start("capsa.proxy", args, output=run_dir / "proxy.out", timeout=timeout)


class ProxyClient:
    def __init__(self, client: Client, request_timeout: float) -> None:
        self._client = client
        self._timeout = request_timeout
        self.agent = AgentClient(client, request_timeout)

    @classmethod
    async def connect(cls, socket_dir: Path, request_timeout: float) -> ProxyClient:
        path = socket_dir / SOCKET_NAME
        try:
            client = await Client.connect_unix(str(path))
        except OSError as exc:
            raise AgentError(f"the container's VM is not running ({path}: {exc.strerror})") from exc
        return cls(client, request_timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def wait_gone(self, timeout: float) -> bool:
        """Wait until the proxy has closed this connection (it exits once its VM is down); False on timeout."""
        try:
            await asyncio.wait_for(self._client.wait_closed(), timeout)
        except TimeoutError:
            return False
        return True

    async def create_container(self, container_id: str, bundle: Path) -> None:
        request = pb.CreateContainerRequest(container_id=container_id, bundle=str(bundle))
        await self._unary("CreateContainer", request, pb.Empty, timeout=None)

    async def attach_network(self, netns: str) -> None:
        await self._unary("AttachNetwork", pb.AttachNetworkRequest(netns=netns), pb.Empty, timeout=None)

    async def info(self) -> pb.InfoResponse:
        return await self._unary("Info", pb.InfoRequest(), pb.InfoResponse)

    async def resize(self, vcpus: int, memory_mib: int) -> pb.ResizeVMResponse:
        request = pb.ResizeVMRequest(vcpus=vcpus, memory_mib=memory_mib)
        return await self._unary("ResizeVM", request, pb.ResizeVMResponse, timeout=None)

    async def shutdown(self) -> None:
        await self._unary("Shutdown", pb.ShutdownRequest(), pb.Empty)

    async def _unary(self, method: str, request: Message, response_type: type[M], timeout: float | None = -1.0) -> M:
        effective = self._timeout if timeout == -1.0 else timeout
        try:
            return await self._client.unary(PROXY_SERVICE, method, request, response_type, timeout=effective)
        except StatusError as exc:
            raise AgentError(exc.message or f"proxy {method} failed ({exc.code.name})") from exc
        except TtrpcError as exc:
            raise AgentError(f"the container's VM went away during {method}: {exc}") from exc
