"""The agent service end to end on the host: a real agent process, a real ttrpc connection.

The agent runs in host mode (not PID 1: no mounts, no power-off) on a unix
socket.  crun is replaced by FAKE_CRUN below, a small script that mimics the
subset of crun's command line the agent uses (create with an exec fifo,
start, exec --detach, kill, delete, pause, resume, --console-socket, JSON
--log) but runs the "container" as a plain host process, with no namespaces
and no rootfs.  That stand-in is acceptable ONLY in these unit tests; the
real crun runs in tests/integration/test_agent_vm.py, inside a real VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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

SERVICE = "capsa.agent.v1.AgentService"
M = TypeVar("M", bound=Message)

FAKE_CRUN = r"""
import fcntl, json, os, signal, socket, sys, termios, time

VALUED = {"--bundle", "--pid-file", "--console-socket", "--process", "--root", "-b", "-p"}
log_file = None


def fail(message):
    record = json.dumps({"msg": message, "level": "error", "time": "now"})
    if log_file:
        with open(log_file, "a") as f:
            f.write(record + "\n")
    else:
        print(message, file=sys.stderr)
    sys.exit(1)


def parse(words):
    opts, args, i = {}, [], 0
    while i < len(words):
        w = words[i]
        if w.startswith("--") and "=" in w:
            k, v = w.split("=", 1)
            opts[k] = v
        elif w in VALUED:
            opts[w] = words[i + 1]
            i += 1
        elif w.startswith("-"):
            opts[w] = True
        else:
            args.append(w)
        i += 1
    return opts, args


def resolve(process):
    name = process["args"][0]
    if "/" in name:
        if os.access(name, os.X_OK):
            return name
        fail(f"executable file `{name}` not found: No such file or directory")
    env = dict(e.split("=", 1) for e in process.get("env", []))
    for d in env.get("PATH", "/usr/bin:/bin").split(":"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    fail(f"executable file `{name}` not found in $PATH: No such file or directory")


def send_console(path, master):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        socket.send_fds(s, [b"\0"], [master])


def launch(process, console, fifo, pid_file):
    path = resolve(process)
    env = dict(e.split("=", 1) for e in process.get("env", []))
    master = slave = None
    if process.get("terminal"):
        master, slave = os.openpty()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.close(ready_r)
        if slave is not None:
            os.close(master)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if fifo:
            os.write(ready_w, b"1")
            fd = os.open(fifo, os.O_RDONLY)  # the exec fifo: wait for start
            os.read(fd, 1)
            os.close(fd)
        else:
            os.write(ready_w, b"1")
        os.close(ready_w)
        try:
            os.execve(path, process["args"], env)
        except OSError as exc:
            os.write(2, f"exec {path}: {exc}\n".encode())
            os._exit(127)
    os.close(ready_w)
    os.read(ready_r, 1)
    if master is not None:
        send_console(console, master)
    with open(pid_file, "w") as f:
        f.write(str(pid))
    return pid


def main(argv):
    global log_file
    root = "/run/crun"
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        w = argv[i]
        if w == "--root":
            root = argv[i + 1]
            i += 1
        elif w.startswith("--log="):
            log_file = w.split("=", 1)[1].removeprefix("file:")
        elif w == "--version":
            print("crun version 1.8.1-fake\ncommit: none")
            return
        i += 1
    command, (opts, args) = argv[i], parse(argv[i + 1:])
    cid = args[0] if args else fail("please specify a ID for the container")
    state = os.path.join(root, cid)
    if command == "create":
        spec = json.load(open(os.path.join(opts["--bundle"], "config.json")))
        if not os.path.isdir(spec["root"]["path"]):
            fail(f"rootfs `{spec['root']['path']}` does not exist")
        if os.path.exists(state):
            fail(f"container `{cid}` already exists")
        os.makedirs(state)
        fifo = os.path.join(state, "exec.fifo")
        os.mkfifo(fifo)
        try:
            pid = launch(spec["process"], opts.get("--console-socket"), fifo, opts["--pid-file"])
        except SystemExit:
            os.unlink(fifo)
            os.rmdir(state)
            raise
        with open(os.path.join(state, "pid"), "w") as f:
            f.write(str(pid))
        return
    if not os.path.exists(state):
        fail(f"error opening file `{state}/status`: No such file or directory")
    pid = int(open(os.path.join(state, "pid")).read())
    if command == "start":
        fifo = os.path.join(state, "exec.fifo")
        if not os.path.exists(fifo):
            fail(f"container `{cid}` is not in created state")
        for _ in range(500):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                time.sleep(0.01)
        else:
            fail("the container init is gone")
        os.write(fd, b"0")
        os.close(fd)
        os.unlink(fifo)
    elif command == "exec":
        launch(json.load(open(opts["--process"])), opts.get("--console-socket"), None, opts["--pid-file"])
    elif command == "kill":
        sig = int(args[1]) if len(args) > 1 else 15
        try:
            (os.killpg if opts.get("--all") else os.kill)(pid, sig)
        except ProcessLookupError:
            fail("container not running")
    elif command == "delete":
        if opts.get("--force"):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in os.listdir(state):
            os.unlink(os.path.join(state, name))
        os.rmdir(state)
    elif command in ("pause", "resume"):
        os.killpg(pid, signal.SIGSTOP if command == "pause" else signal.SIGCONT)
    elif command == "update":
        resources = json.load(open(opts["--resources"]))
        limit = resources.get("memory", {}).get("limit")
        if limit is not None and 0 <= limit < 4096:
            fail("write `memory.max`: Device or resource busy")
        with open(os.path.join(state, "resources.json"), "w") as f:
            json.dump(resources, f)
    else:
        fail(f"unknown command {command}")


main(sys.argv[1:])
"""


@dataclass
class Agent:
    socket: Path
    rootfs: Path
    crun_root: Path
    state_dir: Path
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with running_agent(tmp_path_factory.mktemp("agent")) as started:
        yield started


@contextlib.contextmanager
def running_agent(base: Path) -> Iterator[Agent]:
    """A host-mode agent with FAKE_CRUN, serving on a unix socket in ``base``; killed at the end."""
    fake = base / "crun"
    fake.write_text(f"#!{sys.executable} -SI\n{FAKE_CRUN}")
    fake.chmod(0o755)
    rootfs = base / "rootfs"
    rootfs.mkdir()
    log = base / "agent.log"
    sock = base / "agent.sock"
    argv = [
        sys.executable,
        "-m",
        "capsa.agent.main",
        "--listen",
        f"unix:{sock}",
        "--crun",
        str(fake),
        "--crun-root",
        str(base / "crun-root"),
        "--state-dir",
        str(base / "state"),
        "--debug",
    ]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the agent did not start:\n{log.read_text()}")
        time.sleep(0.02)
    try:
        yield Agent(sock, rootfs, base / "crun-root", base / "state", process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def call(client: Client, method: str, request: Message, response_type: type[M]) -> M:
    return await client.unary(SERVICE, method, request, response_type, timeout=10.0)


async def empty(client: Client, method: str, request: Message) -> None:
    await call(client, method, request, pb.Empty)


def run(agent: Agent, scenario: Any) -> Any:
    """Run ``scenario(client)`` over a fresh connection to the agent."""

    async def main() -> Any:
        client = await Client.connect_unix(str(agent.socket))
        try:
            return await asyncio.wait_for(scenario(client), 30)
        finally:
            await client.aclose()

    return asyncio.run(main())


def spec(agent: Agent, *args: str, terminal: bool = False) -> bytes:
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": terminal,
                "args": list(args),
                "env": ["PATH=/usr/bin:/bin", "TERM=xterm"],
                "cwd": "/",
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "c",
        }
    ).encode()


async def create(client: Client, agent: Agent, container_id: str, *args: str, terminal: bool = False) -> None:
    await empty(
        client,
        "CreateContainer",
        pb.CreateContainerRequest(
            container_id=container_id,
            oci_spec_json=spec(agent, *args, terminal=terminal),
            rootfs=pb.Storage(mount_point=str(agent.rootfs)),
        ),
    )


async def read_all(client: Client, method: str, container_id: str, exec_id: str = "") -> bytes:
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


async def remove(client: Client, container_id: str) -> None:
    await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id=container_id))


async def expect_error(code: Code, awaitable: Any) -> str:
    with pytest.raises(StatusError) as caught:
        await awaitable
    assert caught.value.code == code, caught.value
    return str(caught.value.message)


def test_check_and_guest_details(agent: Agent) -> None:
    async def scenario(client: Client) -> pb.GuestDetailsResponse:
        check = await call(client, "Check", pb.CheckRequest(), pb.CheckResponse)
        assert check.status == pb.CheckResponse.SERVING
        return await call(client, "GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)

    details = run(agent, scenario)
    assert details.kernel_release == os.uname().release
    assert details.crun_version == "1.8.1-fake"
    assert details.online_cpus >= 1
    assert details.mem_total_bytes > 0
    assert details.agent_start_seconds > 0


def test_run_a_container_to_completion(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[bytes, bytes, tuple[int, int], tuple[int, int]]:
        await create(client, agent, "exit7", "/bin/sh", "-c", "echo hi; echo oops >&2; exit 7")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="exit7"))
        stdout = await read_all(client, "ReadStdout", "exit7")
        stderr = await read_all(client, "ReadStderr", "exit7")
        first, again = await wait(client, "exit7"), await wait(client, "exit7")
        await remove(client, "exit7")
        return stdout, stderr, first, again

    assert run(agent, scenario) == (b"hi\n", b"oops\n", (7, 0), (7, 0))
    assert not (agent.state_dir / "containers" / "exit7").exists()
    assert not (agent.crun_root / "exit7").exists()


def test_output_written_before_the_host_reads_is_kept(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[tuple[int, int], bytes]:
        await create(client, agent, "early", "/bin/sh", "-c", "seq 1 20000")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="early"))
        status = await wait(client, "early")
        out = await read_all(client, "ReadStdout", "early")
        await remove(client, "early")
        return status, out

    status, out = run(agent, scenario)
    assert status == (0, 0)
    assert out == b"".join(b"%d\n" % n for n in range(1, 20001))


def test_large_output_goes_through_the_bounded_buffer(agent: Agent) -> None:
    size = 3 * 1024 * 1024  # three times the per-stream buffer

    async def scenario(client: Client) -> tuple[int, tuple[int, int]]:
        await create(client, agent, "big", "/bin/sh", "-c", f"head -c {size} /dev/zero")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="big"))
        await asyncio.sleep(0.3)  # let it fill the buffer and block
        out = await read_all(client, "ReadStdout", "big")
        status = await wait(client, "big")
        await remove(client, "big")
        return len(out), status

    assert run(agent, scenario) == (size, (0, 0))


def test_missing_executable_fails_create_with_cruns_words(agent: Agent) -> None:
    async def scenario(client: Client) -> str:
        message = await expect_error(Code.UNKNOWN, create(client, agent, "nosuch", "nosuch"))
        await expect_error(
            Code.NOT_FOUND, empty(client, "StartContainer", pb.StartContainerRequest(container_id="nosuch"))
        )
        # Nothing was left behind: the same ID can be created afterwards.
        await create(client, agent, "nosuch", "/bin/true")
        await remove(client, "nosuch")
        return message

    assert run(agent, scenario) == "executable file `nosuch` not found in $PATH: No such file or directory"


def test_unknown_ids_are_not_found(agent: Agent) -> None:
    async def scenario(client: Client) -> list[str]:
        messages = [
            await expect_error(
                Code.NOT_FOUND, empty(client, "StartContainer", pb.StartContainerRequest(container_id="ghost"))
            ),
            await expect_error(Code.NOT_FOUND, wait(client, "ghost")),
            await expect_error(Code.NOT_FOUND, remove(client, "ghost")),
            await expect_error(
                Code.NOT_FOUND,
                empty(client, "SignalProcess", pb.SignalProcessRequest(container_id="ghost", signal=9)),
            ),
        ]
        await create(client, agent, "known", "/bin/true")
        messages.append(await expect_error(Code.NOT_FOUND, wait(client, "known", "no-such-exec")))
        await remove(client, "known")
        return messages

    messages = run(agent, scenario)
    assert messages[:4] == ["container ghost does not exist"] * 4
    assert messages[4] == "exec no-such-exec does not exist in container known"


def test_lifecycle_order_is_enforced(agent: Agent) -> None:
    async def scenario(client: Client) -> None:
        await create(client, agent, "order", "/bin/sleep", "30")
        await expect_error(Code.ALREADY_EXISTS, create(client, agent, "order", "/bin/true"))
        exec_request = pb.ExecProcessRequest(
            container_id="order", exec_id="e1", process_json=json.dumps({"args": ["/bin/true"]}).encode()
        )
        await empty(client, "ExecProcess", exec_request)  # created, not started: runc allows it
        assert await wait(client, "order", "e1") == (0, 0)
        await expect_error(
            Code.FAILED_PRECONDITION, empty(client, "PauseContainer", pb.PauseContainerRequest(container_id="order"))
        )
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="order"))
        await expect_error(
            Code.FAILED_PRECONDITION, empty(client, "StartContainer", pb.StartContainerRequest(container_id="order"))
        )
        await empty(client, "PauseContainer", pb.PauseContainerRequest(container_id="order"))
        await expect_error(
            Code.FAILED_PRECONDITION, empty(client, "PauseContainer", pb.PauseContainerRequest(container_id="order"))
        )
        paused_exec = pb.ExecProcessRequest(
            container_id="order", exec_id="e2", process_json=json.dumps({"args": ["/bin/true"]}).encode()
        )
        await expect_error(Code.FAILED_PRECONDITION, empty(client, "ExecProcess", paused_exec))
        await empty(client, "ResumeContainer", pb.ResumeContainerRequest(container_id="order"))
        await remove(client, "order")

    run(agent, scenario)


def test_bad_input_is_an_invalid_argument(agent: Agent) -> None:
    async def scenario(client: Client) -> None:
        bad_json = pb.CreateContainerRequest(
            container_id="bad", oci_spec_json=b"{", rootfs=pb.Storage(mount_point=str(agent.rootfs))
        )
        await expect_error(Code.INVALID_ARGUMENT, empty(client, "CreateContainer", bad_json))
        bad_id = pb.CreateContainerRequest(container_id="../x", oci_spec_json=spec(agent, "/bin/true"))
        await expect_error(Code.INVALID_ARGUMENT, empty(client, "CreateContainer", bad_id))
        bad_driver = pb.CreateContainerRequest(
            container_id="bad", oci_spec_json=spec(agent, "/bin/true"), rootfs=pb.Storage(driver="nfs", source="x")
        )
        await expect_error(Code.INVALID_ARGUMENT, empty(client, "CreateContainer", bad_driver))
        # None of them left a container behind.
        await create(client, agent, "bad", "/bin/true")
        await remove(client, "bad")

    run(agent, scenario)


def test_stdin_reaches_the_process_and_close_gives_it_eof(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[int, bytes, tuple[int, int]]:
        await create(client, agent, "cat", "/bin/cat")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="cat"))
        payload = b"line one\n" * 20000
        written = await call(
            client, "WriteStdin", pb.WriteStreamRequest(container_id="cat", data=payload), pb.WriteStreamResponse
        )
        reading = asyncio.ensure_future(read_all(client, "ReadStdout", "cat"))
        await empty(client, "CloseStdin", pb.CloseStdinRequest(container_id="cat"))
        out = await reading
        status = await wait(client, "cat")
        await expect_error(
            Code.FAILED_PRECONDITION,
            call(client, "WriteStdin", pb.WriteStreamRequest(container_id="cat", data=b"x"), pb.WriteStreamResponse),
        )
        await remove(client, "cat")
        return written.len, out, status

    written, out, status = run(agent, scenario)
    assert written == len(b"line one\n" * 20000)
    assert out == b"line one\n" * 20000
    assert status == (0, 0)


def test_a_signal_ends_the_process_with_128_plus_n(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[tuple[int, int], str]:
        await create(client, agent, "sleeper", "/bin/sleep", "30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="sleeper"))
        await empty(client, "SignalProcess", pb.SignalProcessRequest(container_id="sleeper", signal=signal.SIGKILL))
        status = await wait(client, "sleeper")
        message = await expect_error(
            Code.FAILED_PRECONDITION,
            empty(client, "SignalProcess", pb.SignalProcessRequest(container_id="sleeper", signal=signal.SIGTERM)),
        )
        await remove(client, "sleeper")
        return status, message

    assert run(agent, scenario) == ((137, 9), "container sleeper is not running")


def test_exec_in_a_running_container(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
        await create(client, agent, "host", "/bin/sleep", "30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="host"))
        process = {"args": ["/bin/sh", "-c", "echo from exec; exit 3"], "env": ["PATH=/bin:/usr/bin"], "cwd": "/"}
        request = pb.ExecProcessRequest(container_id="host", exec_id="e1", process_json=json.dumps(process).encode())
        await empty(client, "ExecProcess", request)
        await expect_error(Code.ALREADY_EXISTS, empty(client, "ExecProcess", request))
        out = await read_all(client, "ReadStdout", "host", "e1")
        exec_status = await wait(client, "host", "e1")
        missing = pb.ExecProcessRequest(
            container_id="host", exec_id="e2", process_json=json.dumps({"args": ["nosuch"]}).encode()
        )
        message = await expect_error(Code.UNKNOWN, empty(client, "ExecProcess", missing))
        assert "executable file `nosuch` not found" in message
        await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id="host", timeout_seconds=1))
        return out, exec_status, (0, 0)

    out, exec_status, _ = run(agent, scenario)
    assert out == b"from exec\n"
    assert exec_status == (3, 0)


def test_remove_kills_a_running_container_and_forgets_it(agent: Agent) -> None:
    async def scenario(client: Client) -> int:
        await create(client, agent, "doomed", "/bin/sleep", "30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="doomed"))
        pid = int((agent.state_dir / "containers" / "doomed" / "pid").read_text())
        started = time.monotonic()
        await remove(client, "doomed")
        assert time.monotonic() - started < 5
        await expect_error(Code.NOT_FOUND, wait(client, "doomed"))
        return pid

    pid = run(agent, scenario)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_terminal_output_and_window_size(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[bytes, bytes, tuple[int, int]]:
        await create(client, agent, "tty", "/bin/sh", "-c", "stty size; echo on tty", terminal=True)
        resize = pb.TtyWinResizeRequest(container_id="tty", row=30, column=100)
        await empty(client, "TtyWinResize", resize)
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="tty"))
        out = await read_all(client, "ReadStdout", "tty")
        err = await read_all(client, "ReadStderr", "tty")
        status = await wait(client, "tty")
        await remove(client, "tty")
        return out, err, status

    out, err, status = run(agent, scenario)
    assert out.replace(b"\r\n", b"\n") == b"30 100\non tty\n"
    assert err == b""
    assert status == (0, 0)


def test_terminal_stdin_and_its_end_of_file(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[bytes, tuple[int, int], bytes]:
        await create(client, agent, "ttycat", "/bin/cat", terminal=True)
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="ttycat"))
        await call(
            client,
            "WriteStdin",
            pb.WriteStreamRequest(container_id="ttycat", data=b"typed\n"),
            pb.WriteStreamResponse,
        )
        # A pty has no half-close: CloseStdin types ^D, cat reads EOF and exits.
        await empty(client, "CloseStdin", pb.CloseStdinRequest(container_id="ttycat"))
        out = await read_all(client, "ReadStdout", "ttycat")
        status = await wait(client, "ttycat")
        process = {"terminal": True, "args": ["/bin/sh", "-c", "test -t 0 && echo exec-tty"], "env": ["PATH=/bin"]}
        await create(client, agent, "ttyhost", "/bin/sleep", "30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="ttyhost"))
        request = pb.ExecProcessRequest(container_id="ttyhost", exec_id="t", process_json=json.dumps(process).encode())
        await empty(client, "ExecProcess", request)
        exec_out = await read_all(client, "ReadStdout", "ttyhost", "t")
        await remove(client, "ttycat")
        await remove(client, "ttyhost")
        return out, status, exec_out

    out, status, exec_out = run(agent, scenario)
    assert out.replace(b"\r\n", b"\n") == b"typed\ntyped\n"  # the echo, then cat's copy
    assert status == (0, 0)
    assert exec_out == b"exec-tty\r\n"


def test_resize_without_a_terminal_is_a_precondition_failure(agent: Agent) -> None:
    async def scenario(client: Client) -> None:
        await create(client, agent, "notty", "/bin/true")
        resize = pb.TtyWinResizeRequest(container_id="notty", row=30, column=100)
        await expect_error(Code.FAILED_PRECONDITION, empty(client, "TtyWinResize", resize))
        await remove(client, "notty")

    run(agent, scenario)


def test_update_hands_the_resources_to_crun_and_passes_its_errors_back(agent: Agent) -> None:
    resources = {"memory": {"limit": 256 << 20}, "cpu": {"quota": 50000, "period": 100000}}

    async def scenario(client: Client) -> None:
        await create(client, agent, "upd", "sleep", "30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="upd"))
        request = pb.UpdateContainerRequest(container_id="upd", resources_json=json.dumps(resources).encode())
        await empty(client, "UpdateContainer", request)
        assert json.loads((agent.crun_root / "upd" / "resources.json").read_text()) == resources
        # crun's refusal comes back in crun's words.
        refused = pb.UpdateContainerRequest(container_id="upd", resources_json=b'{"memory": {"limit": 1}}')
        assert "memory.max" in await expect_error(Code.UNKNOWN, empty(client, "UpdateContainer", refused))
        bad = pb.UpdateContainerRequest(container_id="upd", resources_json=b"[1]")
        assert "JSON object" in await expect_error(Code.INVALID_ARGUMENT, empty(client, "UpdateContainer", bad))
        unknown = pb.UpdateContainerRequest(container_id="nope", resources_json=b"{}")
        await expect_error(Code.NOT_FOUND, empty(client, "UpdateContainer", unknown))
        # No resources file is left behind in the bundle.
        assert (agent.state_dir / "containers" / "upd").is_dir()
        assert not list(agent.state_dir.rglob("resources-*.json"))
        await remove(client, "upd")

    run(agent, scenario)


def test_network_calls_check_their_input_and_a_host_agent_leaves_its_hosts_network_alone(agent: Agent) -> None:
    async def scenario(client: Client) -> None:
        def update(interface: pb.Interface | None) -> Any:
            return call(client, "UpdateInterface", pb.UpdateInterfaceRequest(interface=interface), pb.Interface)

        assert "needs an interface" in await expect_error(Code.INVALID_ARGUMENT, update(None))
        bad_mac = pb.Interface(hw_addr="02:00", name="eth0")
        assert "not an Ethernet MAC" in await expect_error(Code.INVALID_ARGUMENT, update(bad_mac))
        good = pb.Interface(hw_addr="02:00:00:00:00:01", name="eth0", mtu=1500)
        assert "host's network" in await expect_error(Code.FAILED_PRECONDITION, update(good))
        routes = pb.UpdateRoutesRequest(routes=pb.Routes(routes=[pb.Route(dest="default", device="lo")]))
        await expect_error(Code.FAILED_PRECONDITION, call(client, "UpdateRoutes", routes, pb.Routes))

    run(agent, scenario)


def test_tcp_streams_reach_a_loopback_server_and_a_closed_port_fails_at_once(agent: Agent) -> None:
    """OpenTcpStream and friends (the loopback relay's calls) against a server on the agent's loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()

    def serve() -> None:
        # Answers what it read, upper-cased, once its client shut its sending side down.
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def scenario(client: Client) -> None:
        opened = await call(client, "OpenTcpStream", pb.OpenTcpStreamRequest(port=port), pb.OpenTcpStreamResponse)
        stream = opened.stream_id
        written = await call(
            client, "WriteTcpStream", pb.WriteTcpStreamRequest(stream_id=stream, data=b"hello"), pb.WriteStreamResponse
        )
        assert written.len == 5
        await empty(client, "CloseTcpStream", pb.CloseTcpStreamRequest(stream_id=stream, write_only=True))
        answer = b""
        while True:
            request = pb.ReadTcpStreamRequest(stream_id=stream, len=65536)
            chunk = (await call(client, "ReadTcpStream", request, pb.ReadStreamResponse)).data
            if not chunk:
                break
            answer += chunk
        assert answer == b"HELLO"
        await empty(client, "CloseTcpStream", pb.CloseTcpStreamRequest(stream_id=stream))
        gone = pb.ReadTcpStreamRequest(stream_id=stream, len=1)
        gone_read = call(client, "ReadTcpStream", gone, pb.ReadStreamResponse)
        assert "no TCP stream" in await expect_error(Code.NOT_FOUND, gone_read)
        # Nothing listens: refused on both loopback addresses, at once.
        started = time.monotonic()
        refused = pb.OpenTcpStreamRequest(port=closed_port)
        message = await expect_error(Code.NOT_FOUND, call(client, "OpenTcpStream", refused, pb.OpenTcpStreamResponse))
        assert f"nothing accepts connections on port {closed_port} in the guest" in message
        assert "127.0.0.1" in message and "::1" in message
        assert time.monotonic() - started < 5
        bad = pb.OpenTcpStreamRequest(port=70000)
        await expect_error(Code.INVALID_ARGUMENT, call(client, "OpenTcpStream", bad, pb.OpenTcpStreamResponse))

    try:
        run(agent, scenario)
    finally:
        server.close()
    thread.join(5)


def test_zz_destroy_sandbox_kills_everything_and_ends_the_agent(agent: Agent) -> None:
    # Runs last in this module (name order): the agent exits afterwards.
    async def scenario(client: Client) -> int:
        await empty(client, "CreateSandbox", pb.CreateSandboxRequest(sandbox_id="s1"))
        await expect_error(
            Code.FAILED_PRECONDITION, empty(client, "CreateSandbox", pb.CreateSandboxRequest(sandbox_id="s1"))
        )
        await create(client, agent, "left", "/bin/sleep", "30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="left"))
        pid = int((agent.state_dir / "containers" / "left" / "pid").read_text())
        await empty(client, "DestroySandbox", pb.DestroySandboxRequest())
        return pid

    pid = run(agent, scenario)
    assert agent.process.wait(10) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (agent.crun_root / "left").exists()
