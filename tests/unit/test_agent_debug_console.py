"""DebugConsole through a real agent process and a real ttrpc connection (host mode).

The agent runs its command itself (no crun), so a host-mode agent runs it
on the host: the same spawn, stdio and bookkeeping as in a guest, where
tests/integration/test_debug_console_vm.py runs it.  Each test gets an
agent of its own: whether DebugConsole is allowed is fixed by the
sandbox's CreateSandbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_service import Agent, call, empty, expect_error, read_all, run, running_agent

from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code

SH = "/bin/sh"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with running_agent(tmp_path) as started:
        yield started


async def create_sandbox(client: Client, debug_console: bool) -> None:
    await empty(client, "CreateSandbox", pb.CreateSandboxRequest(sandbox_id="s", debug_console=debug_console))


def console(exec_id: str, *args: str, terminal: bool = False, env: tuple[str, ...] = ()) -> pb.DebugConsoleRequest:
    return pb.DebugConsoleRequest(exec_id=exec_id, args=list(args), env=list(env), terminal=terminal)


async def wait(client: Client, exec_id: str) -> tuple[int, int]:
    request = pb.WaitProcessRequest(container_id="", exec_id=exec_id)
    response = await call(client, "WaitProcess", request, pb.WaitProcessResponse)
    return response.status, response.signal


def test_refused_unless_the_sandbox_was_created_with_it(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[str, str]:
        before = await expect_error(Code.FAILED_PRECONDITION, empty(client, "DebugConsole", console("a", SH)))
        await create_sandbox(client, debug_console=False)
        after = await expect_error(Code.FAILED_PRECONDITION, empty(client, "DebugConsole", console("a", SH)))
        return before, after

    before, after = run(agent, scenario)
    assert "debug console is off in this sandbox" in before
    assert "[runtime] debug_console" in after


def test_a_command_with_pipes_its_output_status_and_then_it_is_forgotten(agent: Agent) -> None:
    script = 'echo "out $MARK $HOME"; echo err >&2; read line; echo "got $line"; exit 7'

    async def scenario(client: Client) -> tuple[bytes, bytes, tuple[int, int], str]:
        await create_sandbox(client, debug_console=True)
        await empty(client, "DebugConsole", console("d1", SH, "-c", script, env=("MARK=m",)))
        write = pb.WriteStreamRequest(container_id="", exec_id="d1", data=b"typed\n")
        await call(client, "WriteStdin", write, pb.WriteStreamResponse)
        await empty(client, "CloseStdin", pb.CloseStdinRequest(container_id="", exec_id="d1"))
        status = await wait(client, "d1")
        out = await read_all(client, "ReadStdout", "", "d1")
        err = await read_all(client, "ReadStderr", "", "d1")
        # Status collected, output read to its end: the agent holds nothing of it any more.
        gone = await expect_error(Code.NOT_FOUND, wait(client, "d1"))
        return out, err, status, gone

    out, err, status, gone = run(agent, scenario)
    assert out == b"out m /\ngot typed\n"
    assert err == b"err\n"
    assert status == (7, 0)
    assert "no debug console process 'd1'" in gone


def test_a_terminal_is_the_controlling_terminal_of_a_new_session(agent: Agent) -> None:
    # Without ps(1): cat's /proc/self/stat names its session (the shell's) and terminal.
    script = "test -t 0 && echo tty; set -- $(cat /proc/self/stat); echo sid=$6 shell=$$ tty=$7; stty size"

    async def scenario(client: Client) -> tuple[bytes, bytes]:
        await create_sandbox(client, debug_console=True)
        # It waits for a line, so the size is set before it asks.
        await empty(client, "DebugConsole", console("t1", SH, "-c", f"read go; {script}", terminal=True))
        resize = pb.TtyWinResizeRequest(container_id="", exec_id="t1", row=25, column=90)
        await empty(client, "TtyWinResize", resize)
        write = pb.WriteStreamRequest(container_id="", exec_id="t1", data=b"go\n")
        await call(client, "WriteStdin", write, pb.WriteStreamResponse)
        out = await read_all(client, "ReadStdout", "", "t1")
        err = await read_all(client, "ReadStderr", "", "t1")
        assert await wait(client, "t1") == (0, 0)
        return out, err

    out, err = run(agent, scenario)
    lines = out.replace(b"\r\n", b"\n").decode().splitlines()
    assert lines[:2] == ["go", "tty"]  # the terminal's echo of the line, then the answer
    fields = dict(word.split("=") for word in lines[2].split())
    assert fields["sid"] == fields["shell"]  # the spawned shell leads a session of its own
    assert fields["tty"] != "0"  # with a controlling terminal
    assert lines[3] == "25 90"
    assert err == b""  # a terminal carries both streams


def test_signals_reach_it(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[int, int]:
        await create_sandbox(client, debug_console=True)
        await empty(client, "DebugConsole", console("s1", "/bin/sleep", "30"))
        await empty(client, "SignalProcess", pb.SignalProcessRequest(container_id="", exec_id="s1", signal=15))
        return await wait(client, "s1")

    assert run(agent, scenario) == (128 + 15, 15)


def test_bad_requests_are_refused_and_start_nothing(agent: Agent) -> None:
    async def scenario(client: Client) -> list[str]:
        await create_sandbox(client, debug_console=True)
        said = [
            await expect_error(Code.INVALID_ARGUMENT, empty(client, "DebugConsole", console("", SH))),
            await expect_error(Code.INVALID_ARGUMENT, empty(client, "DebugConsole", console("r", "sh"))),
            await expect_error(Code.INVALID_ARGUMENT, empty(client, "DebugConsole", console("n"))),
            await expect_error(Code.INVALID_ARGUMENT, empty(client, "DebugConsole", console("e", SH, env=("X",)))),
            await expect_error(Code.FAILED_PRECONDITION, empty(client, "DebugConsole", console("m", "/no/such"))),
        ]
        await empty(client, "DebugConsole", console("dup", "/bin/sleep", "30"))
        said.append(await expect_error(Code.ALREADY_EXISTS, empty(client, "DebugConsole", console("dup", SH))))
        # An unknown exec of the guest is NOT_FOUND for every process call.
        await expect_error(Code.NOT_FOUND, wait(client, "nope"))
        await expect_error(
            Code.NOT_FOUND,
            call(client, "ReadStdout", pb.ReadStreamRequest(container_id="", exec_id="nope"), pb.ReadStreamResponse),
        )
        await empty(client, "DestroySandbox", pb.DestroySandboxRequest())
        return said

    said = run(agent, scenario)
    assert "exec_id" in said[0]
    assert "absolute path" in said[1] and "absolute path" in said[2]
    assert "NAME=value" in said[3]
    assert said[4] == "cannot run /no/such in the guest: No such file or directory"
    assert "already exists" in said[5]
    # DestroySandbox killed the sleep: the agent exits cleanly and leaves no process.
    assert agent.process.wait(10) == 0
