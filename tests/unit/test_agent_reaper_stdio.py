"""The reaper and the stdio buffers, with real processes, pipes and ptys (no VM, no root)."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import socket
from pathlib import Path

import pytest

from capsa.agent import spawn
from capsa.agent.reaper import Reaper, exit_status
from capsa.agent.stdio import ConsoleSocket, InputStream, OutputStream, Pipes, StreamClosed, terminal_io


def test_exit_status_follows_the_shell_convention() -> None:
    assert exit_status(7 << 8) == (7, 0)
    assert exit_status(signal.SIGKILL) == (128 + 9, 9)
    with pytest.raises(ValueError):
        exit_status(0x137F)  # stopped by SIGSTOP: not a termination


def _sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def test_reaper_hands_each_status_to_its_claim() -> None:
    async def scenario() -> list[tuple[int, int]]:
        reaper = Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            fd = os.open(os.devnull, os.O_RDWR)
            try:
                pids = [spawn.spawn(_sh(f"exit {code}"), fd, fd, fd) for code in (3, 4)]
                killed = spawn.spawn(["/bin/sleep", "30"], fd, fd, fd)
            finally:
                os.close(fd)
            futures = [reaper.claim(pid, spawned_now=True) for pid in [*pids, killed]]
            os.kill(killed, signal.SIGTERM)
            return [exit_status(status) for status in await asyncio.gather(*futures)]
        finally:
            reaper.uninstall()

    assert asyncio.run(scenario()) == [(3, 0), (4, 0), (128 + 15, 15)]


def test_reaper_keeps_a_status_nobody_claimed_yet() -> None:
    async def scenario() -> tuple[int, int]:
        reaper = Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            fd = os.open(os.devnull, os.O_RDWR)
            try:
                pid = spawn.spawn(_sh("exit 9"), fd, fd, fd)
            finally:
                os.close(fd)
            # Let it exit and be reaped before anyone asks (a container init
            # that died before its PID was read from crun's pid file).
            for _ in range(200):
                await asyncio.sleep(0.01)
                if pid in reaper._unclaimed:
                    break
            return exit_status(await reaper.wait(pid))
        finally:
            reaper.uninstall()

    assert asyncio.run(scenario()) == (9, 0)


def test_run_captures_output_and_status() -> None:
    async def scenario() -> spawn.Completed:
        reaper = Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            return await spawn.run(_sh("echo out; echo err >&2; exit 2"), reaper)
        finally:
            reaper.uninstall()

    result = asyncio.run(scenario())
    assert (result.status, result.signal, result.stdout, result.stderr) == (2, 0, b"out\n", b"err\n")
    assert not result.ok and result.describe() == "exit status 2"


def test_run_does_not_wait_for_descendants_holding_its_stdout() -> None:
    # crun create exits while the container init keeps crun's stdio open.
    async def scenario() -> spawn.Completed:
        reaper = Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            return await asyncio.wait_for(spawn.run(_sh("sleep 5 & echo started"), reaper), 3)
        finally:
            reaper.uninstall()

    assert asyncio.run(scenario()).stdout == b"started\n"


def test_children_get_sigpipe_back() -> None:
    # Python ignores SIGPIPE; exec keeps ignored signals, so a spawned
    # process would never die of a closed pipe without the reset.
    async def scenario() -> spawn.Completed:
        reaper = Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            return await spawn.run(["/bin/cat", "/proc/self/status"], reaper)
        finally:
            reaper.uninstall()

    result = asyncio.run(scenario())
    assert result.ok
    ignored = next(line for line in result.stdout.decode().splitlines() if line.startswith("SigIgn:"))
    assert not int(ignored.split()[1], 16) & (1 << (signal.SIGPIPE - 1))
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # while this process still ignores it


def test_output_is_buffered_before_anyone_reads_and_eof_comes_after_it() -> None:
    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        stream = OutputStream(loop, read_end)
        os.write(write_end, b"hello ")
        os.write(write_end, b"world")
        os.close(write_end)
        await asyncio.sleep(0.05)
        chunks = [await stream.read(6), await stream.read(100), await stream.read(100), await stream.read(100)]
        assert stream.eof
        return chunks

    assert asyncio.run(scenario()) == [b"hello ", b"world", b"", b""]


def test_a_full_buffer_stops_reading_until_drained() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        stream = OutputStream(loop, read_end, limit=4096)
        written = 0
        # Fill the buffer and then the pipe itself: the writer must block.
        with pytest.raises(BlockingIOError):
            for _ in range(10000):
                written += os.write(write_end, b"x" * 4096)
                await asyncio.sleep(0)
        assert 4096 <= len(stream._buffer) < 2 * 4096 + 65536
        received = 0
        os.close(write_end)
        while chunk := await stream.read(65536):
            received += len(chunk)
        assert received == written

    asyncio.run(scenario())


def test_read_blocks_until_data_arrives() -> None:
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        stream = OutputStream(loop, read_end)
        pending = asyncio.ensure_future(stream.read(10))
        await asyncio.sleep(0.05)
        assert not pending.done()
        os.write(write_end, b"late")
        data = await asyncio.wait_for(pending, 1)
        os.close(write_end)
        stream.close()
        return data

    assert asyncio.run(scenario()) == b"late"


def test_stdin_writes_everything_then_closes() -> None:
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        stdin = InputStream(loop, write_end)
        payload = os.urandom(300_000)  # more than a pipe holds: write must wait

        async def drain() -> bytes:
            os.set_blocking(read_end, False)
            stream = OutputStream(loop, read_end)
            out = b""
            while chunk := await stream.read(65536):
                out += chunk
            return out

        reader = asyncio.ensure_future(drain())
        assert await stdin.write(payload) == len(payload)
        stdin.close()
        with pytest.raises(StreamClosed):
            await stdin.write(b"more")
        out = await reader
        assert out == payload
        return out[:4]

    asyncio.run(scenario())


def test_stdin_of_a_process_that_closed_it() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        os.close(read_end)
        with pytest.raises(StreamClosed, match="closed its stdin"):
            await InputStream(loop, write_end).write(b"x")

    asyncio.run(scenario())


def test_pipes_hand_their_parent_ends_over() -> None:
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        pipes = Pipes.open()
        os.write(pipes.child_stdout, b"to stdout")
        child_stdout = os.dup(pipes.child_stdout)
        io = pipes.into_io(loop)
        os.close(child_stdout)
        data = await io.stdout.read(100)
        assert await io.stdout.read(100) == b""
        io.close()
        return data

    assert asyncio.run(scenario()) == b"to stdout"


def test_terminal_io_reads_until_the_slave_is_gone_and_resizes() -> None:
    async def scenario() -> tuple[bytes, tuple[int, int]]:
        loop = asyncio.get_running_loop()
        master, slave = pty.openpty()
        io = terminal_io(loop, master)
        io.resize(30, 100)
        size = os.get_terminal_size(slave)
        os.write(slave, b"on the tty")
        await asyncio.sleep(0.05)
        os.close(slave)
        out = b""
        while chunk := await io.stdout.read(100):
            out += chunk
        io.close()
        return out, (size.lines, size.columns)

    out, size = asyncio.run(scenario())
    assert out == b"on the tty"
    assert size == (30, 100)


def test_console_socket_receives_the_fd_crun_sends(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        console = ConsoleSocket(str(tmp_path / "console.sock"))
        try:
            receiving = asyncio.ensure_future(console.receive())
            read_end, write_end = os.pipe()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(console.path)
                socket.send_fds(client, [b"\0"], [write_end])
            os.close(write_end)
            received = await asyncio.wait_for(receiving, 2)
            os.write(received, b"via fd")
            os.close(received)
            return os.read(read_end, 100)
        finally:
            console.close()

    assert asyncio.run(scenario()) == b"via fd"
    assert not (tmp_path / "console.sock").exists()
