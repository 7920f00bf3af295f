"""`runc update` in a real VM: new cgroup limits in the guest, and a VM that grows to fit.

A sandbox is started the way the runtime starts one (virtiofsd, QEMU under
TCG here, the agent; cold and from a template), a busybox container runs in
it, and then:

* the VM grows by one vCPU (ACPI CPU hot-plug) and 256 MiB (a pc-dimm), and
  the guest reports them once UpdateContainer has onlined what was added;
* UpdateContainer's limits land in the container's cgroup in the guest
  (``memory.max``, ``cpu.max``, a cpuset naming the hot-plugged CPU);
* crun's refusal reaches the host in crun's words; growing past the
  configured maximum is refused and the VM never shrinks.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import make_rootfs

from capsa.cli.spec import default_spec
from capsa.config import cache_dir, parse_config
from capsa.errors import AgentError, HypervisorError
from capsa.hypervisor.base import VMSize
from capsa.protocols import agent_pb2 as pb
from capsa.runtime.agent_client import AgentClient
from capsa.runtime.resources import vm_size
from capsa.runtime.sandbox import ROOTFS_TAG, Sandbox, SandboxSpec

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
BASE_MEMORY_MIB = 512
CGROUP_FILES = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpuset.cpus.effective"


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short: the VM's unix sockets live here.  A cache of its own, so the
    # template this test makes is its own (the accelerator verdict is reused).
    directory = Path(tempfile.mkdtemp(prefix="capsa-rsz-", dir="/tmp"))
    accel = cache_dir() / "accel.json"
    (directory / "cache").mkdir()
    if accel.exists():
        shutil.copy(accel, directory / "cache" / "accel.json")
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(directory / "cache"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def exec_output(agent: AgentClient, container_id: str, exec_id: str, command: str) -> str:
    process = {"args": ["sh", "-c", command], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    process_json = json.dumps(process).encode()
    request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id, process_json=process_json)
    await agent._call("ExecProcess", request, pb.Empty)
    out = b""
    while chunk := await agent.read_stdout(container_id, exec_id):
        out += chunk
    status = await agent.wait_process(container_id, exec_id)
    assert status.status == 0, out
    return out.decode()


async def scenario(sandbox: Sandbox, rootfs: Path) -> None:
    agent = await sandbox.start()
    hypervisor = sandbox.hypervisor
    assert hypervisor is not None
    spec = default_spec(["sleep", "600"], terminal=False)
    spec["root"] = {"path": str(rootfs), "readonly": True}
    await agent.create_container(
        pb.CreateContainerRequest(
            container_id="c1",
            oci_spec_json=json.dumps(spec).encode(),
            rootfs=pb.Storage(driver="virtiofs", source=ROOTFS_TAG, fstype="virtiofs"),
        )
    )
    await agent.start_container("c1")
    before = await agent.guest_details()
    assert before.online_cpus == 1

    # What `capsa update --memory 200m --cpu-quota 50000 --cpuset-cpus 1` asks for.
    resources = {"memory": {"limit": 200 * MiB}, "cpu": {"quota": 50000, "period": 100000, "cpus": "1"}}
    wanted = vm_size(resources, 1, BASE_MEMORY_MIB, max_vcpus=2, max_memory_mib=1024)
    assert wanted == VMSize(2, BASE_MEMORY_MIB + 200)
    grown = await hypervisor.resize(wanted.vcpus, wanted.memory_mib + 56)  # +256 MiB: two memory blocks
    assert grown == VMSize(2, BASE_MEMORY_MIB + 256)
    await agent.update_container("c1", resources)

    after = await agent.guest_details()
    assert after.online_cpus == 2
    assert after.mem_total_bytes - before.mem_total_bytes == 256 * MiB
    memory_max, cpu_max, cpuset = (await exec_output(agent, "c1", "e1", CGROUP_FILES)).split("\n")[:3]
    assert (memory_max, cpu_max, cpuset) == (str(200 * MiB), "50000 100000", "1")

    # crun's own words for a limit the guest cannot apply.
    with pytest.raises(AgentError, match="cpuset"):
        await agent.update_container("c1", {"cpu": {"cpus": "5"}})
    # Only grows: asking for less leaves the VM as it is; past the maximum is an error.
    assert await hypervisor.resize(1, BASE_MEMORY_MIB) == grown
    with pytest.raises(HypervisorError, match="max_vcpus"):
        await hypervisor.resize(3, BASE_MEMORY_MIB)
    with pytest.raises(HypervisorError, match="max_memory_mib"):
        await hypervisor.resize(2, 4096)
    # A lower limit applies to the cgroup, the VM keeps its size.
    await agent.update_container("c1", {"memory": {"limit": 100 * MiB}})
    assert (await exec_output(agent, "c1", "e2", "cat /sys/fs/cgroup/memory.max")).strip() == str(100 * MiB)
    assert await hypervisor.size() == grown


@pytest.mark.parametrize("boot", ["cold", "template"])
def test_update_limits_and_grow_the_vm(work: Path, boot: str) -> None:
    rootfs = work / "rootfs"
    make_rootfs(rootfs)
    config = parse_config(
        {
            "hypervisor": {
                "boot": boot,
                "default_memory_mib": BASE_MEMORY_MIB,
                "max_vcpus": 2,
                "max_memory_mib": 1024,
            }
        }
    )
    run_dir = work / "r"
    run_dir.mkdir()
    sandbox = Sandbox(config, SandboxSpec(id="rsz", run_dir=run_dir, rootfs=rootfs))

    async def main() -> None:
        try:
            await asyncio.wait_for(scenario(sandbox, rootfs), 300)
        finally:
            await sandbox.stop()

    asyncio.run(main())
    if boot == "template":
        assert "template_restored" in sandbox.timings, sandbox.timings
