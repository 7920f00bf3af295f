"""Fixtures for the engine tests: each engine's default instance (its default
paths, owned by the session while a module runs: ``e2e_engines``), the runtime
under test behind an argv-logging wrapper, and a session-wide sweep that
deletes the containers the session created and ends whatever the runtime left
running.

``CAPSA_E2E_RUNTIME`` picks the runtime (default ``/usr/local/bin/capsa``;
``runc`` proves the harness itself). ``CAPSA_E2E_ARGV_LOG=FILE`` keeps the
log of every runtime invocation the engines made (and ``FILE.specs/`` the
config.json each engine handed to ``create``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from e2e_engines import IMAGE, Containerd, Docker, Engine, Podman
from e2e_support import (
    BUSYBOX,
    Runtime,
    capsa_shim,
    kill_pids,
    make_oci_archive,
    make_rootfs,
    make_rootfs_tar,
    runtime_binary,
    session_processes,
    skip_or_fail,
    sweep_created,
    unmount_under,
)

if TYPE_CHECKING:
    from cri.harness import ShimContainerd

TOOLS = ("podman", "conmon", "/usr/bin/docker", "dockerd", "containerd", "ctr", "containerd-shim-runc-v2")


def e2e_unready() -> str | None:
    """Why the engine tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/setup.sh"
    if not BUSYBOX.exists():
        return "busybox-static is not installed"
    binary = runtime_binary()
    if not (binary.exists() and os.access(binary, os.X_OK)):
        return f"the runtime {binary} is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = [item for item in items if "e2e" in item.keywords]
    reason = e2e_unready() if e2e else None
    if reason is None:
        return
    if os.environ.get("CI"):
        # In CI a missing engine is a broken setup, not a reason to pass quietly.
        raise pytest.UsageError(f"engine tests cannot run: {reason}")
    for item in e2e:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    # Its name must not hold "capsa" or "runc": processes that name it are told
    # apart from the runtime's own by those words.
    path = Path(tempfile.mkdtemp(prefix="e2e-"))
    try:
        yield path
    finally:
        # What the engines' own stop() could not end: the containers the session
        # created (by the wrapper's log), then processes by marker or by a path of ours.
        sweep_created(Runtime(runtime_binary(), path, "sweep"))
        kill_pids([p.pid for p in session_processes(path, [str(path)])])
        unmount_under([path])
        keep = os.environ.get("CAPSA_E2E_ARGV_LOG")
        if keep and (path / "argv.log").exists():
            shutil.copy(path / "argv.log", keep)
            if (path / "specs").exists():
                shutil.copytree(path / "specs", keep + ".specs", dirs_exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def runtime(session_dir: Path) -> Runtime:
    return Runtime(runtime_binary(), session_dir)


@pytest.fixture(scope="session")
def rootfs(session_dir: Path) -> Path:
    path = session_dir / "rootfs"
    make_rootfs(path)
    return path


@pytest.fixture(scope="session")
def image_tar(session_dir: Path, rootfs: Path) -> Path:
    tar = session_dir / "busybox.tar"
    make_rootfs_tar(rootfs, tar)
    return tar


@pytest.fixture(scope="module")
def podman(runtime: Runtime, session_dir: Path, image_tar: Path) -> Iterator[Podman]:
    engine = Podman(runtime, session_dir, image_tar)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def docker(runtime: Runtime, session_dir: Path, image_tar: Path) -> Iterator[Docker]:
    engine = Docker(runtime, session_dir, image_tar)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(params=["podman", "docker"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The same test under Podman and under Docker (their module-wide instances)."""
    found: Engine = request.getfixturevalue(request.param)
    return found


@pytest.fixture(scope="module")
def containerd(runtime: Runtime, session_dir: Path, image_tar: Path) -> Iterator[Containerd]:
    """The default containerd, for ``ctr`` in its own namespace (``default``)."""
    engine = Containerd(session_dir, tag="containerd", runtime=runtime)
    try:
        archive = session_dir / "busybox-oci.tar"
        make_oci_archive(image_tar, archive, IMAGE)
        engine.import_image(archive, IMAGE)
        yield engine
    finally:
        engine.stop()


# The CRI tests' containerd (one per module) and the handlers every CRI case runs under.
# cri.harness needs grpcio (a dev extra): imported only by the tests that use it.


@pytest.fixture(scope="module")
def k(session_dir: Path, image_tar: Path) -> Iterator[ShimContainerd]:
    from cri.harness import ShimContainerd, cri_unready

    if reason := cri_unready():
        skip_or_fail(reason)
    engine = ShimContainerd(session_dir, image_tar, capsa_shim())
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(params=["runc", "capsa"])
def handler(request: pytest.FixtureRequest) -> str:
    """runc proves each case; capsa is what it is about."""
    name: str = request.param
    if name == "capsa" and capsa_shim() is None:
        skip_or_fail("containerd-shim-capsa-v2 is not installed (set CAPSA_E2E_SHIM or reinstall capsa)")
    return name
