"""What an idle sandbox costs the host: the levers of docs/performance.md "Density", seen working.

- The guest's root is the erofs image on virtio-pmem, mounted with DAX:
  QEMU maps the image file shared and read-only (one copy in the host's
  page cache for every VM), and the guest holds none of it in its RAM;
  even root in the guest cannot write it.
- Free page reporting: memory a container frees goes back to the host.
  A container's ``dd`` fills 160 MiB of guest RAM and exits; the VM's RAM
  file (a template clone's copy in /dev/shm) grows by that much and, with
  reporting, shrinks back within seconds.  With ``free_page_reporting =
  false`` it keeps every page the guest touched: the control that shows
  the reporting, not something else, gave the memory back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Capsa, vm_processes

pytestmark = pytest.mark.vm

MiB = 1 << 20
FILL_MIB = 160


@contextlib.contextmanager
def idle_container(capsa: Capsa, cid: str) -> Iterator[str]:
    """A detached ``sleep`` container with ``dd`` in its rootfs, deleted afterwards."""
    os.symlink("busybox", capsa.bundle / "rootfs" / "bin" / "dd")
    capsa.spec(["sleep", "3600"])
    result = capsa.run(cid, "-d")
    assert result.code == 0, result.stderr
    try:
        yield cid
    finally:
        capsa("delete", "--force", cid)


@pytest.fixture
def detached(capsa: Capsa) -> Iterator[str]:
    with idle_container(capsa, "idle") as cid:
        yield cid


def ram_file_bytes(qemu: int) -> int:
    """Bytes the host holds for the VM's guest RAM: the blocks of its RAM file (a clone's
    copy in /dev/shm, or the memfd of a cold boot), found among QEMU's open files."""
    held = 0
    for fd in os.listdir(f"/proc/{qemu}/fd"):
        try:
            target = os.readlink(f"/proc/{qemu}/fd/{fd}")
            if ".mem" in target or target.startswith("/memfd:mem"):
                held = max(held, os.stat(f"/proc/{qemu}/fd/{fd}").st_blocks * 512)
        except OSError:
            continue
    assert held, f"no guest RAM file among QEMU {qemu}'s open files"
    return held


def fill_and_free(capsa: Capsa, cid: str) -> tuple[int, int, int]:
    """The RAM file's size before, right after a container filled and freed FILL_MIB, and 15 s later."""
    qemu = vm_processes(capsa, cid)["qemu"]
    before = ram_file_bytes(qemu)
    result = capsa("exec", cid, "dd", "if=/dev/zero", "of=/dev/null", f"bs={FILL_MIB}M", "count=1")
    assert result.code == 0, result.stderr
    right_after = ram_file_bytes(qemu)
    deadline = time.monotonic() + 15
    later = right_after
    while time.monotonic() < deadline and later > before + 32 * MiB:
        time.sleep(0.5)
        later = ram_file_bytes(qemu)
    return before, right_after, later


def test_the_guest_root_is_the_shared_image_not_guest_ram(capsa: Capsa, detached: str) -> None:
    qemu = vm_processes(capsa, detached)["qemu"]
    maps = Path(f"/proc/{qemu}/maps").read_text()
    # By inode: the jail binds the image at a path of its own.
    image = os.stat("/var/lib/capsa/guest/rootfs.img").st_ino
    mapped = [line for line in maps.splitlines() if line.split()[4] == str(image)]
    assert mapped and all(line.split()[1] == "r--s" for line in mapped), maps
    # The guest's own view: its root files are not in its RAM (the initrd's
    # tmpfs held about 30 MiB of Shmem, the container's /dev/shm is empty).
    result = capsa("exec", detached, "grep", "-E", "^(Shmem|Cached):", "/proc/meminfo")
    assert result.code == 0, result.stderr
    kib = {line.split(":")[0]: int(line.split()[1]) for line in result.stdout.splitlines()}
    assert kib["Shmem"] < 8 * 1024 and kib["Cached"] < 16 * 1024, result.stdout


def test_memory_a_container_frees_goes_back_to_the_host(capsa: Capsa, detached: str) -> None:
    before, right_after, later = fill_and_free(capsa, detached)
    # The control below shows the fill reaching the RAM file; here it leaves it again.
    assert later <= before + 32 * MiB, f"RAM file {before >> 20} MiB, then {right_after >> 20}, then {later >> 20}"


def test_without_reporting_the_host_keeps_what_the_guest_touched(
    capsa: Capsa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text("[hypervisor]\nfree_page_reporting = false\n")
    monkeypatch.setenv("CAPSA_CONFIG", str(config))
    with idle_container(capsa, "kept") as cid:
        before, right_after, later = fill_and_free(capsa, cid)
    assert right_after - before >= (FILL_MIB - 32) * MiB, (before, right_after)
    assert later >= before + (FILL_MIB - 32) * MiB, (before, right_after, later)


def test_the_guest_cannot_write_the_shared_image(capsa: Capsa, tmp_path: Path) -> None:
    # Root in the guest (the debug console) is the strongest writer a guest has.
    config = tmp_path / "configuration.toml"
    config.write_text("[runtime]\ndebug_console = true\n")
    image = Path(os.path.realpath("/var/lib/capsa/guest/rootfs.img"))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    capsa.spec(["sleep", "600"])
    assert capsa("--config", str(config), "run", "-d", "--bundle", str(capsa.bundle), "writer").code == 0
    try:
        # The agent marked the device read-only (BLKROSET): refused at once, not a hang.
        wrote = capsa(
            "--config", str(config), "debug-console", "writer",
            "dd", "if=/dev/zero", "of=/dev/pmem0", "bs=4096", "count=1", "conv=fsync",
            timeout=60,
        )  # fmt: skip
        assert wrote.code != 0, wrote.stdout + wrote.stderr
        assert "Operation not permitted" in wrote.stderr or "Read-only" in wrote.stderr, wrote.stderr
        assert capsa("exec", "writer", "true").code == 0
    finally:
        capsa("delete", "--force", "writer")
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
