"""Helper process plumbing with ordinary programs (no VM): logs, termination, death with the parent."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from capsa.errors import HypervisorError
from capsa.hypervisor.bounded_log import DEFAULT_LIMIT, DROPPED
from capsa.hypervisor.process import last_line, spawn, terminate


def test_output_goes_to_the_log_and_the_last_line_explains(tmp_path: Path) -> None:
    log = tmp_path / "vmm.log"
    log.write_text("an earlier run\n")

    async def scenario() -> int:
        helper = await spawn(
            ["sh", "-c", "echo starting; echo 'qemu: could not open kernel' >&2; exit 1"],
            log_path=log,
            error=HypervisorError,
        )
        status = await helper.proc.wait()
        await helper.output_closed()
        return status

    assert asyncio.run(scenario()) == 1
    assert log.read_text() == "starting\nqemu: could not open kernel\n"
    assert last_line(log) == "qemu: could not open kernel"
    assert last_line(tmp_path / "missing") == ""


def test_a_helper_that_writes_without_end_fills_no_more_than_its_bound(tmp_path: Path) -> None:
    # A hostile guest can make QEMU or virtiofsd complain at will: 8 MiB of
    # stderr leaves a log of at most the bound, ending with the newest line.
    log = tmp_path / "vmm.log"

    async def scenario() -> None:
        helper = await spawn(
            ["sh", "-c", "head -c 8388608 /dev/zero | tr '\\0' x >&2; echo; echo 'the last words' >&2"],
            log_path=log,
            error=HypervisorError,
        )
        await asyncio.wait_for(helper.proc.wait(), 30)
        await helper.output_closed()

    asyncio.run(scenario())
    assert log.stat().st_size <= DEFAULT_LIMIT
    assert log.read_bytes().startswith(DROPPED)
    assert last_line(log) == "the last words"


def test_missing_program_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="cannot execute /nonexistent"):
        asyncio.run(spawn(["/nonexistent"], log_path=tmp_path / "log", error=HypervisorError))


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, float]:
        helper = await spawn(["sh", "-c", "trap '' TERM; sleep 30"], log_path=tmp_path / "log", error=HypervisorError)
        proc = helper.proc
        await asyncio.sleep(0.1)  # let the shell install its trap
        started = time.monotonic()
        status = await terminate(proc, 0.3)
        again = await terminate(proc, 0.3)
        assert again == status
        return status, time.monotonic() - started

    status, elapsed = asyncio.run(scenario())
    assert status == -signal.SIGKILL
    assert elapsed < 5


def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""\
        import asyncio
        from pathlib import Path
        from capsa.errors import HypervisorError
        from capsa.hypervisor.process import spawn

        async def main():
            helper = await spawn(["sleep", "60"], log_path=Path({str(tmp_path / "log")!r}),
                                 error=HypervisorError, die_with_parent=True)
            print(helper.proc.pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{child}").exists()
