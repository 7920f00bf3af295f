"""The agent channel on the host: finding the virtio-serial port, serving ttrpc over a device fd."""

from __future__ import annotations

import asyncio
import os
import pty
import tty
from pathlib import Path

from capsa.agent import channel
from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.client import Client
from capsa.ttrpc.server import Context, Server, unary_method


def _ports(tmp_path: Path, names: dict[str, str]) -> Path:
    ports = tmp_path / "virtio-ports"
    for device, name in names.items():
        (ports / device).mkdir(parents=True)
        (ports / device / "name").write_text(name + "\n")
    return ports


def test_find_port_by_name(tmp_path: Path) -> None:
    ports = _ports(tmp_path, {"vport0p0": "org.qemu.guest_agent.0", "vport0p1": "capsa.agent"})
    assert channel.find_port("capsa.agent", str(ports)) == "vport0p1"
    assert channel.find_port("other", str(ports)) is None
    assert channel.find_port("capsa.agent", str(tmp_path / "missing")) is None


def test_wait_for_port_waits_for_the_device_node(tmp_path: Path) -> None:
    ports = _ports(tmp_path, {"vport1p1": "capsa.agent"})
    dev = tmp_path / "dev"
    dev.mkdir()

    async def scenario() -> str:
        waiting = asyncio.ensure_future(channel.wait_for_port("capsa.agent", str(ports), str(dev)))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # sysfs has it, devtmpfs not yet
        (dev / "vport1p1").touch()
        return await asyncio.wait_for(waiting, 2)

    assert asyncio.run(scenario()) == str(dev / "vport1p1")


def test_ttrpc_over_a_device_fd_and_a_clean_end(tmp_path: Path) -> None:
    """The port path: one fd, a read and a write transport, served until the host leaves."""

    async def check(request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    async def scenario() -> int:
        server = Server()
        server.register_service("capsa.agent.v1.AgentService", {"Check": unary_method(pb.CheckRequest, check)})
        connections = channel.Connections(server)
        # A pty in raw mode stands in for the port: a character device, like
        # /dev/vportNpM (a socket would not do: asyncio's write transport
        # reads a socket to detect its closing).
        host_fd, guest_fd = pty.openpty()
        tty.setraw(guest_fd)
        tty.setraw(host_fd)
        fd = guest_fd
        reader, writer, _ = await channel._device_streams(fd)
        serving = asyncio.ensure_future(connections.serve(reader, writer))
        host_reader, host_writer, _ = await channel._device_streams(host_fd)
        client = Client(host_reader, host_writer)
        response = await client.unary(
            "capsa.agent.v1.AgentService", "Check", pb.CheckRequest(), pb.CheckResponse, timeout=5
        )
        await connections.flush(1)
        await client.aclose()
        await asyncio.wait_for(serving, 5)  # EOF ends it, and closing the device fds does not fail
        with_fd_closed = True
        try:
            os.fstat(fd)
            with_fd_closed = False
        except OSError:
            pass
        assert with_fd_closed
        return response.status

    assert asyncio.run(scenario()) == pb.CheckResponse.SERVING
