import os
import time
from pathlib import Path

import pytest

from capsa.errors import ContainerExists, ContainerNotFound
from capsa.runtime.state import ContainerState, StateStore, Status


def test_claim_save_load_remove(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root", socket_root=tmp_path / "sockets")
    store.claim("c1")
    assert store.socket_dir("c1").is_dir()
    state = ContainerState(id="c1", bundle="/b", rootfs="/b/rootfs", status=Status.CREATED, pid=42)
    store.save(state)
    assert store.load("c1") == state
    assert sorted(p.name for p in store.dir("c1").iterdir()) == ["state.json"]
    store.remove("c1")
    assert not store.dir("c1").exists()
    assert not store.socket_dir("c1").exists()
    with pytest.raises(ContainerNotFound, match="does not exist"):
        store.load("c1")


def test_an_id_can_be_claimed_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root", socket_root=tmp_path / "sockets")
    store.claim("c1")
    with pytest.raises(ContainerExists, match="already exists"):
        store.claim("c1")


def test_lock_on_missing_container(tmp_path: Path) -> None:
    with pytest.raises(ContainerNotFound), StateStore(tmp_path).locked("nope"):
        pass


def test_socket_paths_are_short_whatever_the_root_and_id(tmp_path: Path) -> None:
    # A 200-byte root and a 250-byte ID (runc takes both; NAME_MAX is 255).
    root = tmp_path / ("r" * (200 - len(str(tmp_path)) - 1))
    assert len(str(root)) == 200
    container_id = "i" * 250
    store = StateStore(root, socket_root=Path("/run/capsa-vm"))
    sockets = store.socket_dir(container_id)
    assert sockets.parent == Path("/run/capsa-vm")
    assert len(str(sockets / "agent.sock")) < 60
    # Docker's default: its exec root's runtime-runc/moby and a 64-hex ID.
    docker = StateStore(Path("/var/run/docker/runtime-runc/moby"))
    assert len(str(docker.socket_dir("a" * 64) / "proxy.sock")) < 107


def test_socket_dirs_differ_by_root_and_id_and_not_by_spelling(tmp_path: Path) -> None:
    one, two = StateStore(tmp_path / "one"), StateStore(tmp_path / "two")
    assert one.socket_dir("c1") != one.socket_dir("c2")
    assert one.socket_dir("c1") != two.socket_dir("c1")
    # The CLI may get the root relative or with "..": the helpers it starts get it absolute.
    spelled = StateStore(tmp_path / "two" / ".." / "one")
    assert spelled.socket_dir("c1") == one.socket_dir("c1")


def test_a_stale_socket_directory_is_replaced_by_the_next_claim(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root", socket_root=tmp_path / "sockets")
    stale = store.socket_dir("c1")
    stale.mkdir(parents=True)
    (stale / "agent.sock").write_text("left by a container never deleted")
    store.claim("c1")
    assert [p.name for p in store.socket_dir("c1").iterdir()] == ["state"]
    assert (store.socket_dir("c1") / "state").readlink() == store.dir("c1")
    assert store.socket_dir("c1").stat().st_mode & 0o777 == 0o700


def test_a_claim_whose_creator_died_before_its_first_save_reads_stopped(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root", socket_root=tmp_path / "sockets")
    store.claim("c1")
    # Young: a create may be about to write it.
    with pytest.raises(ContainerNotFound):
        store.load("c1")
    old = time.time() - 60
    os.utime(store.dir("c1"), (old, old))
    state = store.load("c1")
    assert (state.id, state.status) == ("c1", Status.STOPPED)
    store.remove("c1")
    assert not store.dir("c1").exists() and not store.socket_dir("c1").exists()
