"""The guest NIC configured by the agent: UpdateInterface and UpdateRoutes in a real VM.

The "pod network" is a network namespace this test makes, holding a tap
device with the gateway's addresses (nothing outside the loopback range or
the test's own namespace is touched).  QEMU runs in that namespace; once
the guest's agent serves, the test hot-plugs a virtio-net NIC on the tap
(QMP ``netdev_add`` + ``device_add``, as the runtime plugs the mirror of an
engine's veth) and at once asks the agent to configure it, so the agent
must wait for the NIC to appear.  A busybox container that shares the
guest's network (its spec names the engine's network namespace) then shows
what it sees with ``ip``, and packets cross both ways.

Needs root, QEMU, busybox-static, iproute2 and the installed guest
artefacts, like tests/integration/test_agent_vm.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from test_agent_vm import BUSYBOX, INITRD, KERNEL, call, empty, read_all, wait

from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code, StatusError

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MAC = "02:42:0a:c9:00:02"
NAME = "podeth0"  # not the kernel's eth0: the rename is part of the test
GATEWAY4, GUEST4 = "10.201.0.1", "10.201.0.2"
GATEWAY6, GUEST6 = "fd00:201::1", "fd00:201::2"
LINK_LOCAL = "fe80::42:aff:fec9:2"  # EUI-64 of MAC (RFC 4291 2.5.1, appendix A)
APPLETS = ("sh", "ip", "hostname", "ping", "ping6", "cat", "sleep")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for path in (KERNEL, INITRD, Path(BUSYBOX), Path("/dev/net/tun")):
        if not path.exists():
            return f"{path} is missing"
    for tool in ("qemu-system-x86_64", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Guest:
    qemu: subprocess.Popen[bytes]
    netns: str
    socket: Path
    qmp: Path
    console: Path
    started: float

    def host(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command in the pod's network namespace (the host end of the NIC)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    netns = f"capsa-nt-{os.getpid()}"
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for name in ("proc", "dev", "sys", "tmp"):
        (rootfs / name).mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    sock, qmp, console = tmp_path / "agent.sock", tmp_path / "qmp.sock", tmp_path / "console.log"
    argv = [
        "ip", "netns", "exec", netns,  # exec's QEMU: the PID is QEMU's
        "qemu-system-x86_64",
        "-machine", "q35",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "512",
        "-nographic",
        "-no-reboot",
        "-kernel", str(KERNEL),
        "-initrd", str(INITRD),
        "-append", "console=ttyS0 panic=-1 random.trust_cpu=on capsa.debug=1",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=capsa.agent",
        "-fsdev", f"local,id=fs0,path={rootfs},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs",
    ]  # fmt: skip
    qemu: subprocess.Popen[bytes] | None = None
    ip("netns", "add", netns)
    try:
        ip("-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        ip("-n", netns, "link", "set", "tap0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{GATEWAY4}/24", "dev", "tap0")
        ip("-n", netns, "addr", "add", f"{GATEWAY6}/64", "dev", "tap0", "nodad")
        with open(console, "wb") as out:
            qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while not (sock.exists() and qmp.exists()):
            if qemu.poll() is not None or time.monotonic() - started > 10:
                pytest.fail(f"QEMU did not start:\n{console.read_text(errors='replace')}")
            time.sleep(0.01)
        yield Guest(qemu, netns, sock, qmp, console, started)
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


async def connect(guest: Guest) -> Client:
    while True:
        try:
            return await Client.connect_unix(str(guest.socket))
        except ConnectionRefusedError:
            if time.monotonic() - guest.started > 10:
                raise
            await asyncio.sleep(0.01)


async def hot_plug_nic(guest: Guest) -> None:
    """Plug a virtio-net NIC on the namespace's tap, with the MAC the agent is told."""
    qmp = QMPClient("test")
    await qmp.connect(str(guest.qmp))
    try:
        netdev = {"type": "tap", "id": "net0", "ifname": "tap0", "script": "no", "downscript": "no"}
        await qmp.execute("netdev_add", netdev)
        nic = {"driver": "virtio-net-pci", "id": "nic0", "netdev": "net0", "mac": MAC, "bus": "rp1"}
        await qmp.execute("device_add", nic)
    finally:
        await qmp.disconnect()


def container_spec(script: str) -> bytes:
    """A busybox container in the guest's network and UTS namespaces (runtime-spec config-linux.md)."""
    caps = ["CAP_NET_RAW"]  # busybox ping opens a raw socket
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["/bin/sh", "-c", script],
                "env": ["PATH=/bin"],
                "cwd": "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            },
            "root": {"path": "rootfs", "readonly": True},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            ],
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc"},
                    {"type": "mount"},
                    # The engine's network namespace: the VM mirrors it, so
                    # in the guest the container uses the guest's network.
                    {"type": "network", "path": "/run/netns/cni-test"},
                ],
            },
        }
    ).encode()


INSIDE = f"""
ip link show {NAME}
ip addr show {NAME}
ip addr show lo
echo ROUTES4; ip route
echo ROUTES6; ip -6 route
echo HOSTNAME $(hostname)
ping -c 1 -W 10 {GATEWAY4} >/dev/null && echo PING4 ok
ping6 -c 1 -W 10 {GATEWAY6} >/dev/null && echo PING6 ok
"""


def test_the_agent_configures_a_hot_plugged_nic_and_the_container_uses_it(guest: Guest) -> None:
    # As the runtime sends them: without the prefix routes of the
    # addresses, which the guest kernel makes as the engine's did.
    routes = [
        pb.Route(dest="default", gateway=GATEWAY4, device=NAME),
        pb.Route(dest="10.99.0.0/16", gateway="10.201.0.254", device=NAME),
        pb.Route(dest="::/0", gateway=GATEWAY6, device=NAME),
    ]

    async def scenario(client: Client) -> dict[str, Any]:
        await call(client, "Check", pb.CheckRequest(), pb.CheckResponse, timeout=120)
        await empty(client, "CreateSandbox", pb.CreateSandboxRequest(hostname="podhost", sandbox_id="net"))
        await hot_plug_nic(guest)
        interface = pb.Interface(
            hw_addr=MAC.upper(),
            name=NAME,
            mtu=1400,
            addresses=[
                pb.IPAddress(address=GUEST4, prefix_length=24),
                pb.IPAddress(address=GUEST6, prefix_length=64),
            ],
        )
        configured = await call(
            client, "UpdateInterface", pb.UpdateInterfaceRequest(interface=interface), pb.Interface, timeout=120
        )
        request = pb.UpdateRoutesRequest(routes=pb.Routes(routes=routes))
        set_routes = await call(client, "UpdateRoutes", request, pb.Routes, timeout=60)
        again = await call(client, "UpdateRoutes", request, pb.Routes, timeout=60)
        unreachable = pb.Routes(routes=[routes[0], pb.Route(dest="10.50.0.0/16", gateway="10.77.0.1", device=NAME)])
        with pytest.raises(StatusError) as refused:
            await call(client, "UpdateRoutes", pb.UpdateRoutesRequest(routes=unreachable), pb.Routes, timeout=60)

        # The host end reaches the guest while the NIC is configured.
        pings = [
            await asyncio.to_thread(guest.host, BUSYBOX, "ping", "-c", "1", "-W", "20", GUEST4),
            await asyncio.to_thread(guest.host, BUSYBOX, "ping6", "-c", "1", "-W", "20", GUEST6),
        ]

        spec = container_spec(INSIDE)
        storage = pb.Storage(driver="9p", source="rootfs", fstype="9p")
        create = pb.CreateContainerRequest(container_id="net", oci_spec_json=spec, rootfs=storage)
        await empty(client, "CreateContainer", create)
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="net"))
        stdout = (await read_all(client, "net")).decode()
        stderr = (await read_all(client, "net", method="ReadStderr")).decode()
        status = await wait(client, "net")
        await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id="net"))
        await empty(client, "DestroySandbox", pb.DestroySandboxRequest())
        return {
            "configured": configured,
            "routes": set_routes,
            "again": again,
            "refused": (refused.value.code, refused.value.message),
            "pings": pings,
            "stdout": stdout,
            "stderr": stderr,
            "status": status,
        }

    async def main() -> dict[str, Any]:
        client = await connect(guest)
        try:
            return await asyncio.wait_for(scenario(client), 300)
        finally:
            await client.aclose()

    try:
        result = asyncio.run(main())
    finally:
        console = guest.console.read_text(errors="replace")
        print("".join(line + "\n" for line in console.splitlines() if "capsa-agent" in line or "virtio_net" in line))
    powered_off = guest.qemu.wait(60)

    configured: pb.Interface = result["configured"]
    assert (configured.name, configured.device, configured.mtu, configured.hw_addr) == (NAME, NAME, 1400, MAC)
    addresses = {(a.address, a.prefix_length) for a in configured.addresses}
    # The kernel adds the link-local address once the link has carrier: it
    # may or may not be in the reply yet.
    assert {(GUEST4, 24), (GUEST6, 64)} <= addresses <= {(GUEST4, 24), (GUEST6, 64), (LINK_LOCAL, 64)}

    def as_set(reply: pb.Routes) -> set[tuple[str, str, str, int]]:
        return {(r.dest, r.gateway, r.device, r.scope) for r in reply.routes}

    expected = {
        ("10.201.0.0/24", "", NAME, 253),
        ("0.0.0.0/0", GATEWAY4, NAME, 0),
        ("10.99.0.0/16", "10.201.0.254", NAME, 0),
        ("fd00:201::/64", "", NAME, 0),
        ("::/0", GATEWAY6, NAME, 0),
    }
    assert as_set(result["routes"]) == expected
    assert as_set(result["again"]) == expected
    assert result["refused"] == (
        Code.UNKNOWN,
        f"adding route 10.50.0.0/16 via 10.77.0.1 dev {NAME}: Network is unreachable",
    )

    for ping in result["pings"]:
        assert ping.returncode == 0, ping.stdout + ping.stderr

    out = result["stdout"]
    print(out)
    assert result["status"] == (0, 0), (out, result["stderr"])
    assert f"link/ether {MAC}" in out
    assert "mtu 1400" in out
    assert f"inet {GUEST4}/24" in out
    assert f"inet6 {GUEST6}/64" in out
    if "NO-CARRIER" not in out.splitlines()[0]:
        # Kept: the kernel adds it once the link has carrier, which under load can come after
        # the container looked (the pings above went through the NIC either way).
        assert f"inet6 {LINK_LOCAL}/64" in out
    assert "inet 127.0.0.1/8" in out  # lo is up
    routes4 = out.split("ROUTES4")[1].split("ROUTES6")[0]
    routes6 = out.split("ROUTES6")[1].split("HOSTNAME")[0]
    assert f"default via {GATEWAY4} dev {NAME}" in routes4
    assert f"10.99.0.0/16 via 10.201.0.254 dev {NAME}" in routes4
    assert "10.50.0.0" not in routes4  # the refused call changed nothing
    assert f"default via {GATEWAY6} dev {NAME}" in routes6
    assert "HOSTNAME podhost" in out  # CreateSandbox's hostname, the container shares the guest's UTS
    assert "PING4 ok" in out
    assert "PING6 ok" in out
    assert powered_off == 0, console
