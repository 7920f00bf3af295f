"""A state root that cannot be written: one line, and the recorded state still what the guest did.

``start`` records "running" before it asks the guest, so a save that fails
(a full filesystem under --root) leaves the process not started and the
state "created"; a start the guest refuses puts "created" back.  The guest
is a fake here (a unit test): what is real is the filesystem refusing the
write, by a file size limit of 0 (RLIMIT_FSIZE, EFBIG) or /dev/full (ENOSPC).
The CLI's full-disk case with a real tmpfs is tests/integration/test_full_disk.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.spec import default_spec
from capsa.config import load_config
from capsa.errors import AgentError, CapsaError
from capsa.runtime import daemon, execs, lifecycle, pids
from capsa.runtime.state import ContainerState, StateStore, Status


@contextmanager
def no_file_may_grow() -> Iterator[None]:
    """Writing any byte to a file fails with EFBIG, as a full filesystem fails it with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> lifecycle.Runtime:
    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor]\naccelerator = "tcg"\n')
    monkeypatch.setenv("CAPSA_CONFIG", str(config))
    return lifecycle.Runtime(load_config(), StateStore(tmp_path / "root", socket_root=tmp_path / "sockets"))


def make_container(rt: lifecycle.Runtime, tmp_path: Path, status: str) -> ContainerState:
    """A container whose shim and proxy are alive (they are this process) in ``status``."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(default_spec(["sh"], terminal=False)))
    me, started = os.getpid(), pids.start_time(os.getpid()) or 0
    state = ContainerState(
        id="c1",
        bundle=str(bundle),
        rootfs=str(bundle / "rootfs"),
        status=status,
        pid=me,
        pid_start=started,
        proxy_pid=me,
        proxy_start=started,
    )
    rt.store.claim(state.id)
    rt.store.save(state)
    return state


class FakeGuest:
    """Stands in for with_proxy: records the status on disk when the guest is asked, then does ``outcome``."""

    def __init__(self, rt: lifecycle.Runtime, outcome: BaseException | None = None) -> None:
        self.rt = rt
        self.outcome = outcome
        self.status_when_asked: list[str] = []

    def __call__(self, socket_dir: Path, timeout: float, operation: Any) -> None:
        self.status_when_asked.append(self.rt.store.load("c1").status)
        if self.outcome is not None:
            raise self.outcome


def test_start_with_a_state_that_cannot_be_saved_starts_nothing(
    rt: lifecycle.Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_container(rt, tmp_path, Status.CREATED)
    guest = FakeGuest(rt)
    monkeypatch.setattr(lifecycle, "with_proxy", guest)
    with no_file_may_grow(), pytest.raises(CapsaError) as refused:
        lifecycle.start(rt, "c1")
    assert "cannot save the state of container 'c1'" in str(refused.value)
    assert "File too large" in str(refused.value)
    assert guest.status_when_asked == []  # the guest was never asked to start the process
    assert rt.store.load("c1").status == Status.CREATED
    assert [p.name for p in rt.store.dir("c1").iterdir() if p.name.startswith(".state.")] == []


def test_start_records_running_before_the_guest_starts_the_process(
    rt: lifecycle.Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_container(rt, tmp_path, Status.CREATED)
    guest = FakeGuest(rt)
    monkeypatch.setattr(lifecycle, "with_proxy", guest)
    lifecycle.start(rt, "c1")
    assert guest.status_when_asked == [Status.RUNNING]
    assert rt.store.load("c1").status == Status.RUNNING


def test_a_start_the_guest_refuses_leaves_the_container_created(
    rt: lifecycle.Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_container(rt, tmp_path, Status.CREATED)
    monkeypatch.setattr(lifecycle, "with_proxy", FakeGuest(rt, AgentError("StartContainer: no such container")))
    with pytest.raises(AgentError):
        lifecycle.start(rt, "c1")
    assert rt.store.load("c1").status == Status.CREATED


def test_exec_with_a_process_file_that_cannot_be_written_starts_nothing(
    rt: lifecycle.Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exec's process file lands on a full disk (/dev/full: ENOSPC): one error, no shim, no file left."""
    make_container(rt, tmp_path, Status.RUNNING)
    monkeypatch.setattr(execs.secrets, "token_hex", lambda n: "0123456789abcdef")
    process_file = rt.store.dir("c1") / "exec-0123456789abcdef.json"
    process_file.symlink_to("/dev/full")

    def no_shim(*args: object, **kwargs: object) -> daemon.Started:
        raise AssertionError("a shim was started")

    monkeypatch.setattr(daemon, "start", no_shim)
    request = execs.ExecRequest(container_id="c1", process={"args": ["true"], "cwd": "/"})
    with pytest.raises(CapsaError, match=f"cannot write {process_file}: No space left on device"):
        execs.start_exec(rt, request)
    assert not process_file.exists() and not process_file.is_symlink()
