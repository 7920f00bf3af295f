"""The shim's line to its proxy (shim/link.py): the shim's side (shim/main.py) against the proxy's
(proxy/shims.py), over a real unix socket, with an agent double standing for the guest."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from capsa.errors import AgentGone, CapsaError
from capsa.protocols import agent_pb2
from capsa.proxy.launch import STOPPED_FILE
from capsa.proxy.shims import ShimRelays
from capsa.shim import link
from capsa.shim.main import ProxyLine


def test_lines_split_a_stream_into_messages() -> None:
    lines = link.Lines()
    assert lines.feed(b'{"a":1}\n{"b"') == [{"a": 1}]
    assert lines.feed(b":2}\n\n") == [{"b": 2}]
    assert lines.feed(link.encode({"signal": 15})) == [{"signal": 15}]


@pytest.mark.parametrize("data", [b"[1]\n", b"{not json\n"])
def test_lines_refuse_what_is_not_an_object(data: bytes) -> None:
    with pytest.raises(ValueError):
        link.Lines().feed(data)


def test_lines_refuse_an_endless_message() -> None:
    with pytest.raises(ValueError, match="longer than"):
        link.Lines().feed(b"x" * (link.MAX_MESSAGE + 1))


@dataclass
class Agent:
    """The agent calls a relay makes, for one process whose output is ``output``."""

    output: list[bytes]
    status: int = 0
    exec_error: str = ""
    gone: bool = False
    signals: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    execs: list[dict[str, Any]] = field(default_factory=list)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    exit: asyncio.Event = field(default_factory=asyncio.Event)

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        if self.exec_error:
            raise CapsaError(self.exec_error)
        self.execs.append(process)

    async def wait_process(self, container_id: str, exec_id: str = "") -> agent_pb2.WaitProcessResponse:
        await self.exit.wait()
        if self.gone:
            raise AgentGone("the agent connection closed")
        return agent_pb2.WaitProcessResponse(status=self.status)

    async def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        if self.output:
            return self.output.pop(0)
        await self.exit.wait()
        if self.gone:
            raise AgentGone("the agent connection closed")
        return b""

    async def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        await self.exit.wait()
        return b""

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        self.stdin += data

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self.stdin_closed = True

    async def signal_process(self, container_id: str, exec_id: str, signal: int, all: bool = False) -> None:
        self.signals.append(signal)
        if signal == 15:
            self.status = 128 + signal
            self.exit.set()

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        self.sizes.append((rows, columns))


@dataclass
class FakeProxy:
    agent: Agent
    run_dir: Path


@dataclass
class Pipes:
    """A process's host stdio as an engine gives it: three pipes, our ends kept here."""

    fds: list[int]  # what the shim hands over: stdin's read end, stdout's and stderr's write ends
    stdin: int  # write end
    stdout: int  # read end
    stderr: int

    def close_shims_copies(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    made = Pipes([stdin_r, stdout_w, stderr_w], stdin_w, stdout_r, stderr_r)
    yield made
    for fd in (made.stdin, stdout_r, stderr_r):
        if fd >= 0:
            os.close(fd)


def read_to_end(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


async def in_thread(action: Any) -> Any:
    return await asyncio.to_thread(action)


async def hand_over(relays: ShimRelays, pipes: Pipes, exec_id: str = "", process: object = None) -> ProxyLine:
    """What a shim does first (in a thread: the shim's side blocks)."""
    request = {"id": "c1", "exec_id": exec_id, "process": process, "terminal": False, "winch": False}
    line: ProxyLine = await in_thread(lambda: ProxyLine.hand_over(str(relays.path), request, pipes.fds))
    return line


async def serve(tmp_path: Path, agent: Agent) -> ShimRelays:
    relays = ShimRelays(FakeProxy(agent, tmp_path), tmp_path / link.SOCKET_NAME)  # type: ignore[arg-type]
    await relays.start()
    return relays


def test_the_proxy_relays_and_the_shim_gets_the_status(tmp_path: Path, pipes: Pipes) -> None:
    async def scenario() -> None:
        agent = Agent(output=[b"hello ", b"world\n"])
        relays = await serve(tmp_path, agent)
        line = await hand_over(relays, pipes, "e1", {"args": ["true"]})
        assert agent.execs == [{"args": ["true"]}]
        # The engine's stdin reaches the process; its end, CloseStdin.
        os.write(pipes.stdin, b"typed")
        os.close(pipes.stdin)
        pipes.stdin = -1
        for _ in range(500):
            if agent.stdin_closed:
                break
            await asyncio.sleep(0.01)
        # The shim's signal goes to the process (the double exits on SIGTERM).
        line.send({"signal": 15})
        status = await in_thread(line.receive)
        assert status == {"status": 128 + 15}
        assert agent.signals == [15]
        assert bytes(agent.stdin) == b"typed" and agent.stdin_closed
        # The proxy has let go of the pipes: once the shim exits, the engine reads to their end.
        pipes.close_shims_copies()
        assert read_to_end(pipes.stdout) == b"hello world\n"
        assert read_to_end(pipes.stderr) == b""
        await relays.close()

    asyncio.run(scenario())


def test_an_exec_the_guest_refuses_is_the_shims_error(tmp_path: Path, pipes: Pipes) -> None:
    async def scenario() -> None:
        agent = Agent(output=[], exec_error="executable file `nope` not found")
        relays = await serve(tmp_path, agent)
        with pytest.raises(CapsaError, match="executable file `nope` not found"):
            await hand_over(relays, pipes, "e1", {"args": ["nope"]})
        pipes.close_shims_copies()
        # Nothing of the proxy's holds the pipes either.
        assert read_to_end(pipes.stdout) == b""
        await relays.close()

    asyncio.run(scenario())


def test_a_shim_that_goes_away_ends_its_relay(tmp_path: Path, pipes: Pipes) -> None:
    async def scenario() -> None:
        agent = Agent(output=[])
        relays = await serve(tmp_path, agent)
        line = await hand_over(relays, pipes)
        line._sock.close()  # killed
        pipes.close_shims_copies()
        # The relay ends and closes its copies: the engine's pipes end.
        assert await asyncio.wait_for(in_thread(lambda: read_to_end(pipes.stdout)), 5) == b""
        await relays.close()

    asyncio.run(scenario())


def test_a_vm_that_stopped_by_itself_is_said_on_stderr(tmp_path: Path, pipes: Pipes) -> None:
    async def scenario() -> None:
        agent = Agent(output=[])
        relays = await serve(tmp_path, agent)
        line = await hand_over(relays, pipes)
        status = asyncio.ensure_future(in_thread(line.receive))
        agent.gone = True
        agent.exit.set()
        # As the proxy does once its VM stopped: record why, then close.
        (tmp_path / STOPPED_FILE).write_text("the guest kernel panicked; guest console: oops\n")
        await relays.close()
        assert await status == {"status": link.VM_LOST_STATUS}
        pipes.close_shims_copies()
        assert (
            read_to_end(pipes.stderr)
            == b"capsa: the container's VM stopped: the guest kernel panicked; guest console: oops\n"
        )

    asyncio.run(scenario())


def test_no_proxy_is_one_clear_error(tmp_path: Path, pipes: Pipes) -> None:
    with pytest.raises(CapsaError, match=r"cannot reach the VM's proxy at .*shim\.sock"):
        ProxyLine.hand_over(str(tmp_path / link.SOCKET_NAME), {"id": "c1"}, pipes.fds)
    pipes.close_shims_copies()
