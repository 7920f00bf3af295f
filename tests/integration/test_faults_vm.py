"""Faults a guest or an unlucky operator can cause, each ending in a truthful state and a clean delete."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import Capsa, is_running, vm_processes

from capsa.hypervisor.bounded_log import DEFAULT_LIMIT

pytestmark = pytest.mark.vm


def privileged(capsa: Capsa, args: list[str]) -> None:
    """A container with every capability and every device allowed (as ``--privileged`` asks)."""
    capsa.spec(args)
    spec = json.loads((capsa.bundle / "config.json").read_text())
    caps = [f"CAP_{name}" for name in ("CHOWN", "DAC_OVERRIDE", "FOWNER", "MKNOD", "SYS_ADMIN", "SYS_TTY_CONFIG")]
    spec["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
    spec["linux"].setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    (capsa.bundle / "config.json").write_text(json.dumps(spec))
    for applet in ("mknod", "yes"):
        link = capsa.bundle / "rootfs" / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)


def wait_status(capsa: Capsa, cid: str, wanted: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while capsa.status(cid) != wanted:
        assert time.monotonic() < deadline, f"{cid} is {capsa.status(cid)}, not {wanted}, after {timeout} s"
        time.sleep(0.3)


def test_a_console_flood_stays_within_its_bound(capsa: Capsa) -> None:
    # hvc0 is the guest's console (virtio-serial port 0, char 229:0).
    privileged(capsa, ["sh", "-c", "mknod /dev/hvc9 c 229 0 && yes FLOOD-FLOOD-FLOOD > /dev/hvc9"])
    assert capsa("create", "--bundle", str(capsa.bundle), "flood").code == 0
    try:
        assert capsa("start", "flood").code == 0
        log = capsa.root / "flood" / "console.log"
        disk = os.statvfs(capsa.root)
        used_before = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
        sizes = []
        for _ in range(60):  # 30 s of flood
            time.sleep(0.5)
            sizes.append(log.stat().st_size)
        assert max(sizes) <= DEFAULT_LIMIT, sizes
        disk = os.statvfs(capsa.root)
        grown = (disk.f_blocks - disk.f_bfree) * disk.f_frsize - used_before
        # The file system under the state root grew by no more than the log's bound (and others' noise).
        assert grown < DEFAULT_LIMIT + (8 << 20), f"{grown} bytes more used on {capsa.root}'s file system"
        assert b"FLOOD-FLOOD" in log.read_bytes()  # the flood reached the log, bounded
        # The flood slows its own guest (under TCG its one vCPU spends itself
        # on it), not the host; the container still runs, and the fixture
        # checks that delete --force leaves nothing.
        assert capsa.status("flood") == "running"
    finally:
        capsa("delete", "--force", "flood")


def test_a_dead_virtiofsd_stops_the_container(capsa: Capsa) -> None:
    capsa.spec(["sleep", "600"])
    assert capsa("create", "--bundle", str(capsa.bundle), "fsd").code == 0
    try:
        assert capsa("start", "fsd").code == 0
        host = vm_processes(capsa, "fsd")
        daemon = host["virtiofsd"]
        worker = int(Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split()[0])
        for pid in (worker, daemon):
            with contextlib.suppress(ProcessLookupError):  # the daemon exits when its worker dies
                os.kill(pid, signal.SIGKILL)
        wait_status(capsa, "fsd", "stopped", 30)
        assert not is_running(host["qemu"]), "QEMU outlived its file server"
        killed = capsa("kill", "fsd", "TERM")
        assert killed.code != 0 and "not running" in killed.stderr
        deleted = capsa("delete", "fsd")
        assert deleted.code == 0, deleted.stderr
    finally:
        capsa("delete", "--force", "fsd")


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("capsa-")}


def proxy_of(capsa: Capsa, timeout: float) -> int | None:
    """The capsa-proxy a create under ``capsa.root`` started, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if comm == "capsa-proxy" and str(capsa.root).encode() in cmdline:
                return int(pid)
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_a_create_killed_halfway_leaves_a_true_state_and_a_clean_delete(capsa: Capsa, delay: float) -> None:
    capsa.spec(["sleep", "600"])
    before = shm_files()
    create = capsa.popen("create", "--bundle", str(capsa.bundle), "half")
    time.sleep(delay)
    create.send_signal(signal.SIGKILL)
    create.wait()
    state = capsa("state", "half")
    if state.code == 0:
        # Either the create finished before the kill, or the container never
        # came to be: its creator is gone.
        assert json.loads(state.stdout)["status"] in ("created", "stopped"), state.stdout
        deleted = capsa("delete", "half")
        assert deleted.code == 0, deleted.stderr
    else:
        assert "does not exist" in state.stderr  # killed before it claimed the ID
    # The fixture checks that no process, mount, file or socket directory is left.
    deadline = time.monotonic() + 30
    while shm_files() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shm_files() - before == set()


@pytest.mark.parametrize("delay", [0.4, 1.0])
def test_a_proxy_killed_during_create_leaves_no_ram_copy(capsa: Capsa, delay: float) -> None:
    capsa.spec(["sleep", "600"])
    before = shm_files()
    create = capsa.popen("create", "--bundle", str(capsa.bundle), "px", stderr=subprocess.PIPE)
    proxy = proxy_of(capsa, 30)
    assert proxy is not None, "no proxy started"
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proxy, signal.SIGKILL)
    _, err = create.communicate(timeout=120)
    if create.returncode == 0:
        capsa("delete", "--force", "px")  # it was ready before the kill: the VM is gone now
    else:
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err.decode(), err
    assert capsa("state", "px").code != 0 or capsa("delete", "--force", "px").code == 0
    assert shm_files() - before == set()


def test_a_vm_the_host_cannot_hold_is_refused_before_it_starts(capsa: Capsa, tmp_path: Path) -> None:
    # A reserve as large as the host's memory: no VM fits, whatever else runs.
    total_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    config = tmp_path / "configuration.toml"
    config.write_text(f"[runtime]\nhost_memory_reserve_mib = {total_mib}\n")
    capsa.spec(["true"])
    before = shm_files()
    result = capsa("--config", str(config), "create", "--bundle", str(capsa.bundle), "toomany")
    assert result.code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not enough host memory" in lines[0] and "short by" in lines[0], result.stderr
    assert capsa("state", "toomany").code != 0
    assert shm_files() == before
