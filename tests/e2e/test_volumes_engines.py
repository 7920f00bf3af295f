"""Volumes, /dev/shm and block devices through real engines (Podman 4.3, Docker 20.10).

What a user of either engine does: ``-v`` host directories (read-write and
``:ro``) with changes seen both ways while the container runs,
``--shm-size`` (the engine binds a host tmpfs of that size at /dev/shm; in
the VM it is a guest tmpfs of the same size), and ``--device`` of a host
block device (a loop device over a file the test made), which the container
reads and writes raw.  Under runc (``CAPSA_E2E_RUNTIME=runc``) the same
tests pass, which proves they test the engines' contract, not capsa's.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_engines import Engine

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

NET = ("--network", "none")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A host block device over a file of the test's own (losetup); detached afterwards."""
    image = tmp_path / "raw.img"
    with image.open("wb") as raw:
        raw.write(b"host-wrote-this\n")
        raw.truncate(8 << 20)
    found = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, timeout=30)
    if found.returncode != 0:
        pytest.skip(f"no loop device: {found.stderr.strip()}")
    device = found.stdout.strip()
    try:
        yield device, image
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=30)


def wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f} s"
        time.sleep(0.1)
    return path.read_text()


def test_volumes_are_shared_both_ways_while_it_runs(engine: Engine, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "conf").write_text("read-only\n")
    script = (
        "while [ ! -s /data/from-host ]; do sleep 0.1; done; "
        "cat /data/from-host /etc/app/conf > /data/.part; mv /data/.part /data/from-container; sleep 600"
    )
    cid = (
        engine("run", "-d", *NET, "-v", f"{rw}:/data", "-v", f"{ro}:/etc/app:ro", engine.image, "sh", "-c", script)
        .check()
        .out
    )
    try:
        (rw / "from-host").write_text("hello from the host\n")
        assert wait_for(rw / "from-container") == "hello from the host\nread-only\n"
        refused = engine("exec", cid, "sh", "-c", "echo x > /etc/app/conf", timeout=60)
        assert refused.code != 0 and "Read-only file system" in refused.stderr
        assert (ro / "conf").read_text() == "read-only\n"
    finally:
        engine("rm", "--force", cid, timeout=120).check()


def test_shm_size_is_a_guest_tmpfs_of_that_size(engine: Engine) -> None:
    script = "grep ' /dev/shm ' /proc/mounts | cut -d' ' -f3; df -k /dev/shm | tail -n 1 | tr -s ' ' | cut -d' ' -f2"
    result = engine("run", "--rm", *NET, "--shm-size", "32m", engine.image, "sh", "-c", script).check()
    assert result.stdout.split() == ["tmpfs", "32768"]


def test_a_block_device_is_the_containers_raw_disk(engine: Engine, loop_device: tuple[str, Path]) -> None:
    device, image = loop_device
    script = "head -c 16 /dev/xvdc; echo engine-wrote-this | dd of=/dev/xvdc bs=512 seek=1 conv=fsync 2>/dev/null"
    result = engine("run", "--rm", *NET, "--device", f"{device}:/dev/xvdc", engine.image, "sh", "-c", script).check()
    assert result.stdout == "host-wrote-this\n"
    with image.open("rb") as raw:
        raw.seek(512)
        assert raw.read(18) == b"engine-wrote-this\n"
