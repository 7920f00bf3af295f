"""Block volumes plugged into and out of a running VM, as a pod's containers come and go.

A sandbox is started the way the runtime starts one (cold and from a
template); each container gets an ext4 image as a virtio-blk disk on a free
root port (QMP ``query-pci``), the agent finds it by serial and mounts it,
and when the container is removed the disk is unplugged (``device_del``
until ``DEVICE_DELETED``, then ``blockdev-del``) so its root port is free
for the next container's disk.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import make_rootfs

from capsa.cli.spec import default_spec
from capsa.config import cache_dir, parse_config
from capsa.hypervisor.qemu import BlockDisk, QemuHypervisor, free_root_port
from capsa.protocols import agent_pb2 as pb
from capsa.runtime.agent_client import AgentClient
from capsa.runtime.mounts import container_request, plan_mounts
from capsa.runtime.sandbox import Sandbox, SandboxSpec

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None, reason="needs e2fsprogs"),
]


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short: the VM's unix sockets live here.  A cache of its own, so the
    # template this test makes is its own (the accelerator verdict is reused).
    directory = Path(tempfile.mkdtemp(prefix="capsa-blk-", dir="/tmp"))
    accel = cache_dir() / "accel.json"
    (directory / "cache").mkdir()
    if accel.exists():
        shutil.copy(accel, directory / "cache" / "accel.json")
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(directory / "cache"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ext4_image(path: Path, name: str, content: str) -> Path:
    with path.open("wb") as image:
        image.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    source = path.with_suffix(".src")
    source.write_text(content)
    subprocess.run(["debugfs", "-w", "-R", f"write {source} {name}", str(path)], check=True, capture_output=True)
    return path


async def output(agent: AgentClient, container_id: str) -> str:
    out = b""
    while chunk := await agent.read_stdout(container_id, ""):
        out += chunk
    status = await agent.wait_process(container_id, "")
    assert status.status == 0, out
    return out.decode()


async def free_ports(hypervisor: QemuHypervisor) -> int:
    buses: Any = await hypervisor._execute("query-pci")
    count = 0
    for bus in buses:
        for device in bus.get("devices", []):
            bridge = device.get("pci_bridge")
            if str(device.get("qdev_id", "")).startswith("hotplug") and not (bridge or {}).get("devices"):
                count += 1
    return count


async def run_with_disk(sandbox: Sandbox, rootfs: Path, container_id: str, image: Path) -> str:
    """A container that reads its disk, plugged as the proxy plugs it; the disk is unplugged after removal."""
    agent, hypervisor = sandbox.agent, sandbox.hypervisor
    assert agent is not None and hypervisor is not None
    spec = default_spec(
        ["sh", "-c", "cat /data/hello; grep ' /data ' /proc/self/mounts | cut -d' ' -f3"], terminal=False
    )
    spec["mounts"].append({"destination": "/data", "type": "ext4", "source": str(image), "options": ["ro"]})
    plan = plan_mounts(spec, container_id, rootfs, lambda path: path.stat())
    (volume,) = plan.volumes
    disk = BlockDisk(volume.source, volume.serial, volume.readonly, volume.host_device)
    await hypervisor.plug_block(disk)
    request = container_request(container_id, plan, "virtio-fs")
    # The sandbox here shares the rootfs directory itself, not a shared dir of binds.
    request.rootfs.CopyFrom(pb.Storage(driver="virtiofs", source="rootfs", fstype="virtiofs"))
    spec_sent = json.loads(request.oci_spec_json)
    spec_sent["root"] = {"path": str(rootfs), "readonly": True}
    request.oci_spec_json = json.dumps(spec_sent).encode()
    await agent.create_container(request)
    await agent.start_container(container_id)
    seen = await output(agent, container_id)
    await agent.remove_container(container_id)
    await hypervisor.unplug_block(disk)
    return seen


async def scenario(sandbox: Sandbox, rootfs: Path, work: Path) -> None:
    await sandbox.start()
    hypervisor = sandbox.hypervisor
    assert hypervisor is not None
    free_at_start = await free_ports(hypervisor)
    assert free_at_start >= 1
    first = ext4_image(work / "one.img", "hello", "first disk\n")
    second = ext4_image(work / "two.img", "hello", "second disk\n")

    # More containers than free root ports, one after another: each disk's port is freed for the next.
    for index in range(free_at_start + 1):
        image = first if index % 2 == 0 else second
        seen = await run_with_disk(sandbox, rootfs, f"c{index}", image)
        assert seen == ("first disk\n" if index % 2 == 0 else "second disk\n") + "ext4\n"
        assert await free_ports(hypervisor) == free_at_start
    assert free_root_port(await hypervisor._execute("query-pci")) is not None


@pytest.mark.parametrize("boot", ["cold", "template"])
def test_disks_come_and_go_with_containers(work: Path, boot: str) -> None:
    rootfs = work / "rootfs"
    make_rootfs(rootfs)
    (rootfs / "bin" / "cut").symlink_to("busybox")
    (rootfs / "data").mkdir()
    config = parse_config({"hypervisor": {"boot": boot, "default_memory_mib": 512}})
    run_dir = work / "r"
    run_dir.mkdir()
    sandbox = Sandbox(config, SandboxSpec(id="blk", run_dir=run_dir, rootfs=rootfs))

    async def main() -> None:
        try:
            await asyncio.wait_for(scenario(sandbox, rootfs, work), 300)
        finally:
            await sandbox.stop()

    asyncio.run(main())
