from pathlib import Path

import pytest

from capsa.errors import ContainerExists, ContainerNotFound
from capsa.runtime.state import ContainerState, StateStore, Status


def test_claim_save_load_remove(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root")
    store.claim("c1")
    state = ContainerState(id="c1", bundle="/b", rootfs="/b/rootfs", status=Status.CREATED, pid=42)
    store.save(state)
    assert store.load("c1") == state
    assert sorted(p.name for p in store.dir("c1").iterdir()) == ["state.json"]
    store.remove("c1")
    assert not store.dir("c1").exists()
    with pytest.raises(ContainerNotFound, match="does not exist"):
        store.load("c1")


def test_an_id_can_be_claimed_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.claim("c1")
    with pytest.raises(ContainerExists, match="already exists"):
        store.claim("c1")


def test_lock_on_missing_container(tmp_path: Path) -> None:
    with pytest.raises(ContainerNotFound), StateStore(tmp_path).locked("nope"):
        pass
