"""The agent's per-container OOM wait (GetOOMEvent with a container_id), over a fake cgroup directory.

The kernel's side (memory.events counting a kill) is the real thing only in a
VM: tests/integration/test_oom_events_vm.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from capsa.agent import cgroup
from capsa.agent.container import Container, ContainerState, Process
from capsa.agent.options import AgentOptions
from capsa.agent.sandbox import Sandbox
from capsa.errors import ContainerNotFound


def memory_events(directory: Path, kills: int) -> None:
    (directory / "memory.events").write_text(f"low 0\nhigh 0\nmax 4\noom 1\noom_kill {kills}\noom_group_kill 0\n")


async def scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "directory", lambda path, root=cgroup.CGROUP_ROOT: str(tmp_path / path.lstrip("/")))
    (tmp_path / "web").mkdir()
    memory_events(tmp_path / "web", 0)
    sandbox = Sandbox(AgentOptions(guest=False, state_dir=str(tmp_path / "state")), cast(Any, None))
    exited: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    container = Container(id="web", bundle=str(tmp_path), cgroup="/web", state=ContainerState.RUNNING)
    container.init = Process("web", "", 42, cast(Any, None), exited)
    sandbox.registry.add(container)

    # A kill wakes the waiter at its next look (poll interval 10 ms here).
    waiter = asyncio.create_task(sandbox.wait_oom_kill("web", 0, poll_interval=0.01))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    memory_events(tmp_path / "web", 1)
    assert await asyncio.wait_for(waiter, 1) == (1, False)

    # Nothing is consumed: a second watcher that saw nothing yet gets the same answer.
    assert await asyncio.wait_for(sandbox.wait_oom_kill("web", 0, poll_interval=0.01), 1) == (1, False)

    # The init's exit ends a wait at once, polling or not (interval an hour here),
    # with the count the kernel had already raised for the kill that ended it.
    waiter = asyncio.create_task(sandbox.wait_oom_kill("web", 1, poll_interval=3600))
    await asyncio.sleep(0.05)
    memory_events(tmp_path / "web", 2)

    def reaped(_: object) -> None:
        container.state = ContainerState.STOPPED  # what Sandbox._track does

    exited.add_done_callback(reaped)
    exited.set_result((137, 9))
    assert await asyncio.wait_for(waiter, 1) == (2, True)

    with pytest.raises(ContainerNotFound):
        await sandbox.wait_oom_kill("nope", 0)


def test_wait_oom_kill_reports_new_kills_and_the_init_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(scenario(tmp_path, monkeypatch))


def test_a_deadline_cancels_the_wait_and_not_the_exit_future(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def cancelled() -> None:
        monkeypatch.setattr(cgroup, "directory", lambda path, root=cgroup.CGROUP_ROOT: str(tmp_path))
        memory_events(tmp_path, 0)
        sandbox = Sandbox(AgentOptions(guest=False, state_dir=str(tmp_path / "state")), cast(Any, None))
        exited: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        container = Container(id="c", bundle=str(tmp_path), cgroup="/c", state=ContainerState.RUNNING)
        container.init = Process("c", "", 42, cast(Any, None), exited)
        sandbox.registry.add(container)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sandbox.wait_oom_kill("c", 0, poll_interval=3600), 0.05)
        assert not exited.done()

    asyncio.run(cancelled())
