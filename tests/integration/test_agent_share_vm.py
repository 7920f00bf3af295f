"""The agent's shared directory (Storage.subpath) in a real guest: one share, many containers.

A pod's containers live in one share, each in its own directory
(``<cid>/rootfs``, see capsa.runtime.mounts).  The agent must mount the
share once, bind each container's directory as its rootfs, keep the share
while any container needs it, and refuse a subpath that leaves the share.
The share here is a plain 9p export of such a tree (the host-side binds are
tested in test_shared_dir.py and, end to end, in test_mounts_vm.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_vm import BUSYBOX, INITRD, KERNEL, Guest, _missing, call, connect, empty, oci_spec, read_all, wait

from capsa.protocols import agent_pb2 as pb
from capsa.runtime.mounts import GUEST_SHARE_DIR
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code, StatusError

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    share = tmp_path / "shared"
    for container_id in ("c1", "c2"):
        rootfs = share / container_id / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        for name in ("proc", "dev", "sys", "tmp"):
            (rootfs / name).mkdir()
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in ("sh", "cat", "sleep"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "name").write_text(f"I am {container_id}\n")
    sock = tmp_path / "agent.sock"
    console = tmp_path / "console.log"
    argv = [
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
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=capsa.agent",
        "-fsdev", f"local,id=fs0,path={share},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs",
        "-fsdev", f"local,id=fs1,path={share},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fs1,mount_tag=other",
    ]  # fmt: skip
    with open(console, "wb") as out:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        while not sock.exists():
            if qemu.poll() is not None or time.monotonic() - started > 10:
                pytest.fail(f"QEMU did not start:\n{console.read_text(errors='replace')}")
            time.sleep(0.01)
        yield Guest(qemu, sock, console, started)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def create_request(container_id: str, *args: str, subpath: str, tag: str = "rootfs") -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(
        container_id=container_id,
        oci_spec_json=oci_spec(*args),
        rootfs=pb.Storage(driver="9p", source=tag, fstype="9p", mount_point=GUEST_SHARE_DIR, subpath=subpath),
    )


async def refused(client: Client, request: pb.CreateContainerRequest) -> str:
    with pytest.raises(StatusError) as error:
        await empty(client, "CreateContainer", request)
    assert error.value.code == Code.INVALID_ARGUMENT, error.value
    return str(error.value)


def test_one_share_serves_every_container(guest: Guest) -> None:
    async def scenario() -> None:
        client = await connect(guest)
        try:
            await call(client, "Check", pb.CheckRequest(), pb.CheckResponse, timeout=120)
            await empty(client, "CreateSandbox", pb.CreateSandboxRequest(hostname="pod", sandbox_id="pod"))

            await empty(client, "CreateContainer", create_request("c2", "/bin/sleep", "600", subpath="c2/rootfs"))
            await empty(client, "StartContainer", pb.StartContainerRequest(container_id="c2"))
            await empty(client, "CreateContainer", create_request("c1", "/bin/cat", "/name", subpath="./c1/rootfs/"))
            await empty(client, "StartContainer", pb.StartContainerRequest(container_id="c1"))
            assert await read_all(client, "c1") == b"I am c1\n"
            assert await wait(client, "c1") == (0, 0)
            await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id="c1"))

            # c1 is gone; the share stays for c2, whose rootfs is its own.
            process = {"args": ["/bin/cat", "/name"], "env": ["PATH=/bin"], "cwd": "/"}
            exec_request = pb.ExecProcessRequest(
                container_id="c2", exec_id="e1", process_json=json.dumps(process).encode()
            )
            await empty(client, "ExecProcess", exec_request)
            assert await read_all(client, "c2", "e1") == b"I am c2\n"
            assert await wait(client, "c2", "e1") == (0, 0)

            message = await refused(client, create_request("c3", "/bin/true", subpath="c1/../../etc"))
            assert "must name a directory inside the share" in message
            message = await refused(client, create_request("c3", "/bin/true", subpath="nosuch"))
            assert "not a directory of share" in message
            message = await refused(client, create_request("c3", "/bin/true", subpath="c1/rootfs", tag="other"))
            assert f"{GUEST_SHARE_DIR} already holds share 'rootfs'" in message

            await empty(client, "DestroySandbox", pb.DestroySandboxRequest())
        finally:
            await client.aclose()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
        guest.qemu.wait(timeout=60)  # DestroySandbox powers the VM off
    except BaseException:
        print(guest.console.read_text(errors="replace"))
        raise
    assert guest.qemu.returncode == 0
