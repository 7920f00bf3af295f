"""One uid and gid per sandbox: allocated atomically, freed, reclaimed from the dead."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from capsa.config import SecurityConfig
from capsa.runtime.identity import IdentityAllocator, IdentityError, SandboxIdentity

# Not the default range: live sandboxes on this host may hold uids there.
BASE = 3_000_000_000


def allocator(tmp_path: Path, count: int = 16) -> IdentityAllocator:
    return IdentityAllocator(SecurityConfig(sandbox_id_base=BASE, sandbox_id_count=count), tmp_path / "ids")


def test_two_live_sandboxes_never_share_an_identity(tmp_path: Path) -> None:
    ids = allocator(tmp_path)
    one, two = ids.allocate("a"), ids.allocate("b")
    assert one != two
    assert one.uid == one.gid and BASE <= one.uid < BASE + 16
    assert ids.holders() == {one.uid: "a", two.uid: "b"}
    assert (tmp_path / "ids").stat().st_mode & 0o777 == 0o700


def test_a_released_identity_is_free_again(tmp_path: Path) -> None:
    ids = allocator(tmp_path, count=1)
    one = ids.allocate("a")
    with pytest.raises(IdentityError, match="no free sandbox uid"):
        ids.allocate("b")
    ids.release(one)
    assert ids.allocate("b") == one


def test_one_owned_by_a_dead_process_is_reclaimed(tmp_path: Path) -> None:
    ids = allocator(tmp_path, count=1)
    owner = subprocess.Popen(["sleep", "60"])
    try:
        taken = ids.allocate("dead", owner_pid=owner.pid)
        with pytest.raises(IdentityError):
            ids.allocate("b")
    finally:
        owner.kill()
        owner.wait()
    assert ids.allocate("b") == taken
    assert ids.holders() == {taken.uid: "b"}


def test_release_by_another_owner_frees_nothing(tmp_path: Path) -> None:
    ids = allocator(tmp_path)
    mine = ids.allocate("a")
    ids.release(mine, owner_pid=1)
    assert ids.holders() == {mine.uid: "a"}


def _allocate_in_child(directory: str, queue: Any, done: Any) -> None:
    ids = IdentityAllocator(SecurityConfig(sandbox_id_base=BASE, sandbox_id_count=64), Path(directory))
    queue.put(ids.allocate(f"c{os.getpid()}").uid)
    done.wait(30)  # an owner that exits frees its uid for reclaiming: stay alive


def test_concurrent_creates_never_collide(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue, done = ctx.Queue(), ctx.Event()
    directory = str(tmp_path / "ids")
    procs = [ctx.Process(target=_allocate_in_child, args=(directory, queue, done)) for _ in range(12)]
    for proc in procs:
        proc.start()
    try:
        uids = [queue.get(timeout=30) for _ in procs]
    finally:
        done.set()
        for proc in procs:
            proc.join(timeout=30)
    assert len(set(uids)) == 12


def test_identity_is_a_plain_pair() -> None:
    assert SandboxIdentity(5, 5) == SandboxIdentity(5, 5)
