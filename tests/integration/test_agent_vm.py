"""capsa-agent as PID 1 of a real guest: QEMU (TCG here), the capsa kernel and initrd, real crun.

The host side is a plain ttrpc client on the unix socket behind the
virtio-serial port ``capsa.agent``; the container rootfs is a busybox tree
shared over 9p.  Needs root, QEMU, busybox-static and the installed guest
artifacts (``$CAPSA_GUEST_DIR``, default /var/lib/capsa/guest).
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
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message

from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code, StatusError

pytestmark = pytest.mark.vm

SERVICE = "capsa.agent.v1.AgentService"
GUEST_DIR = Path(os.environ.get("CAPSA_GUEST_DIR", "/var/lib/capsa/guest"))
KERNEL = GUEST_DIR / "vmlinux"
INITRD = GUEST_DIR / "initrd.img"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
M = TypeVar("M", bound=Message)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for path in (KERNEL, INITRD, Path(BUSYBOX)):
        if not path.exists():
            return f"{path} is missing"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is missing"
    return None


@dataclass
class Guest:
    qemu: subprocess.Popen[bytes]
    socket: Path
    console: Path
    started: float


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for name in ("proc", "dev", "sys", "tmp"):
        (rootfs / name).mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "uname", "true", "sleep", "stty", "ls"):
        (rootfs / "bin" / applet).symlink_to("busybox")
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
        "-fsdev", f"local,id=fs0,path={rootfs},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs",
        # A second tag on the same tree: a 9p tag serves one mount at a time.
        "-fsdev", f"local,id=fs1,path={rootfs},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fs1,mount_tag=rootfs2",
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


async def call(client: Client, method: str, request: Message, response_type: type[M], timeout: float = 60) -> M:
    return await client.unary(SERVICE, method, request, response_type, timeout=timeout)


async def empty(client: Client, method: str, request: Message) -> None:
    await call(client, method, request, pb.Empty)


async def read_all(client: Client, container_id: str, exec_id: str = "", method: str = "ReadStdout") -> bytes:
    out = b""
    while True:
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=65536)
        chunk = (await call(client, method, request, pb.ReadStreamResponse)).data
        if not chunk:
            return out
        out += chunk


async def wait(client: Client, container_id: str, exec_id: str = "") -> tuple[int, int]:
    request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
    response = await call(client, "WaitProcess", request, pb.WaitProcessResponse)
    return response.status, response.signal


def oci_spec(*args: str, terminal: bool = False) -> bytes:
    """A minimal OCI config (runtime-spec config.md) for a busybox rootfs."""
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": terminal,
                "user": {"uid": 0, "gid": 0},
                "args": list(args),
                "env": ["PATH=/bin", "TERM=xterm"],
                "cwd": "/",
                "apparmorProfile": "docker-default",
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "container",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {
                    "destination": "/dev/pts",
                    "type": "devpts",
                    "source": "devpts",
                    "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
                },
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            ],
            # What an engine adds that only means something on the host: its
            # network namespace, a hook binary, an AppArmor profile.
            "hooks": {"prestart": [{"path": "/usr/bin/dockerd", "args": ["libnetwork-setkey", "x"]}]},
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/run/netns/cni-0123"},
                ],
            },
        }
    ).encode()


def create_request(
    container_id: str, *args: str, terminal: bool = False, tag: str = "rootfs"
) -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(
        container_id=container_id,
        oci_spec_json=oci_spec(*args, terminal=terminal),
        rootfs=pb.Storage(driver="9p", source=tag, fstype="9p"),
    )


async def connect(guest: Guest) -> Client:
    # QEMU binds the socket before it listens on it.
    while True:
        try:
            return await Client.connect_unix(str(guest.socket))
        except ConnectionRefusedError:
            if time.monotonic() - guest.started > 10:
                raise
            await asyncio.sleep(0.01)


def run(guest: Guest, scenario: Any) -> Any:
    async def main() -> Any:
        # A first host connection that goes away again: the agent must
        # notice the port's EOF and serve the next host client.
        first = await connect(guest)
        try:
            check = await call(first, "Check", pb.CheckRequest(), pb.CheckResponse, timeout=120)
            assert check.status == pb.CheckResponse.SERVING
        finally:
            await first.aclose()
        # virtio-serial tells the guest "host closed" and "host connected" as
        # states, not events: a host that reconnects before the agent saw the
        # first state would look like the same ttrpc session.  A later client
        # is what the agent promises to serve.
        while "host closed the agent channel" not in guest.console.read_text(errors="replace"):
            if time.monotonic() - guest.started > 120:
                raise AssertionError("the agent did not notice the host closing the channel")
            await asyncio.sleep(0.01)
        client = await connect(guest)
        try:
            return await asyncio.wait_for(scenario(client), 240)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except BaseException:
        print(guest.console.read_text(errors="replace"))
        raise


def test_a_container_runs_in_the_guest_and_the_vm_powers_off(guest: Guest) -> None:
    async def scenario(client: Client) -> dict[str, Any]:
        check = await call(client, "Check", pb.CheckRequest(), pb.CheckResponse, timeout=30)
        ready = time.monotonic() - guest.started
        details = await call(client, "GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)
        await empty(client, "CreateSandbox", pb.CreateSandboxRequest(hostname="sandbox", sandbox_id="s1"))
        # Still running when the sandbox is destroyed at the end.
        await empty(client, "CreateContainer", create_request("left", "/bin/sleep", "600", tag="rootfs2"))
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="left"))

        with pytest.raises(StatusError) as missing:
            await empty(client, "CreateContainer", create_request("bad", "nosuch"))

        await empty(client, "CreateContainer", create_request("c1", "/bin/sh", "-c", "echo hi; exit 7"))
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="c1"))
        stdout = await read_all(client, "c1")
        status = await wait(client, "c1")
        # A virtio 9p tag can be mounted once at a time: c1 gives it back.
        await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id="c1"))

        await empty(client, "CreateContainer", create_request("c2", "/bin/sleep", "600"))
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="c2"))
        process = {"args": ["/bin/sh", "-c", "echo exec in $(uname -n); exit 3"], "env": ["PATH=/bin"], "cwd": "/"}
        exec_request = pb.ExecProcessRequest(container_id="c2", exec_id="e1", process_json=json.dumps(process).encode())
        await empty(client, "ExecProcess", exec_request)
        exec_out = await read_all(client, "c2", "e1")
        exec_status = await wait(client, "c2", "e1")
        tty_process = {"terminal": True, "args": ["/bin/sh", "-c", "tty"], "env": ["PATH=/bin"], "cwd": "/"}
        tty_exec = pb.ExecProcessRequest(container_id="c2", exec_id="e2", process_json=json.dumps(tty_process).encode())
        await empty(client, "ExecProcess", tty_exec)
        exec_tty_out = await read_all(client, "c2", "e2")
        await wait(client, "c2", "e2")
        await empty(client, "PauseContainer", pb.PauseContainerRequest(container_id="c2"))
        await empty(client, "ResumeContainer", pb.ResumeContainerRequest(container_id="c2"))
        stats = await call(
            client, "StatsContainer", pb.StatsContainerRequest(container_id="c2"), pb.StatsContainerResponse
        )
        pids = await call(client, "ListProcesses", pb.ListProcessesRequest(container_id="c2"), pb.ListProcessesResponse)
        await empty(client, "SignalProcess", pb.SignalProcessRequest(container_id="c2", signal=9))
        killed = await wait(client, "c2")
        await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id="c2"))

        await empty(client, "CreateContainer", create_request("t1", "/bin/sh", "-c", "stty size", terminal=True))
        await empty(client, "TtyWinResize", pb.TtyWinResizeRequest(container_id="t1", row=24, column=91))
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="t1"))
        tty_out = await read_all(client, "t1")
        tty_status = await wait(client, "t1")

        await empty(client, "DestroySandbox", pb.DestroySandboxRequest())
        return {
            "check": check.status,
            "ready": ready,
            "details": details,
            "missing": (missing.value.code, missing.value.message),
            "stdout": stdout,
            "status": status,
            "exec": (exec_out, exec_status),
            "exec_tty": exec_tty_out,
            "stats": stats,
            "pids": list(pids.pids),
            "killed": killed,
            "tty": (tty_out, tty_status),
        }

    result = run(guest, scenario)
    powered_off = guest.qemu.wait(60)
    console = guest.console.read_text(errors="replace")
    details: pb.GuestDetailsResponse = result["details"]
    print("".join(line + "\n" for line in console.splitlines() if "capsa-agent" in line or "Run /init" in line))
    print(
        f"\nagent serving {details.agent_start_seconds:.3f} s after /init exec; "
        f"kernel boot {details.kernel_boot_seconds:.3f} s; host saw Check after {result['ready']:.2f} s; "
        f"crun {details.crun_version}; {details.online_cpus} cpu; {details.mem_total_bytes >> 20} MiB"
    )
    assert result["check"] == pb.CheckResponse.SERVING
    assert details.kernel_release.endswith("-capsa")
    assert details.crun_version
    assert result["missing"] == (
        Code.UNKNOWN,
        "executable file `nosuch` not found in $PATH: No such file or directory",
    )
    assert result["stdout"] == b"hi\n"
    assert result["status"] == (7, 0)
    assert result["exec"] == (b"exec in container\n", (3, 0))
    assert result["exec_tty"].startswith(b"/dev/pts/")
    assert result["stats"].pids_current >= 1
    assert result["stats"].memory_usage_bytes > 0
    assert len(result["pids"]) >= 1
    assert result["killed"] == (137, 9)
    assert result["tty"] == (b"24 91\r\n", (0, 0))
    assert powered_off == 0, console
    assert "Power down" in console
