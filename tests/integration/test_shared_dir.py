"""SharedDir for real: bind mounts in a private mount namespace, and their way into virtiofsd.

Needs root (mount(2), unshare(2)); no VM.  Each scenario runs in a child
Python process that enters its own mount namespace, so nothing it mounts can
reach the test process or the host; the test then checks, from outside,
that the host saw none of it and that everything was cleaned up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capsa.storage.virtiofsd import DEFAULT_VIRTIOFSD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, unshare)")

# Runs in the child: the host side of one sandbox, as the proxy will do it.
CHILD = textwrap.dedent(
    """
    import errno, json, os, socket, subprocess, sys, time
    from pathlib import Path
    from capsa.runtime.mounts import plan_mounts
    from capsa.storage.shared import SharedDir, enter_mount_namespace
    from capsa.storage.virtiofsd import VirtiofsdConfig, virtiofsd_argv

    work = Path(sys.argv[1])
    report = {}
    enter_mount_namespace()
    shared = SharedDir(work / "shared")
    shared.create()
    spec = json.loads((work / "config.json").read_text())
    plan = plan_mounts(spec, "c1", work / "rootfs", os.stat)
    shared.apply(plan.binds)
    root = work / "shared"
    report["rootfs"] = sorted(os.listdir(root / "c1" / "rootfs"))
    report["hosts"] = (root / "c1/mounts/1").read_text()
    (root / "c1/mounts/0/written-in-share").write_text("from the share")
    try:
        (root / "c1/mounts/2").write_text("changed")
        report["ro_write"] = "allowed"
    except OSError as exc:
        report["ro_write"] = errno.errorcode[exc.errno]
    report["ro_content"] = (root / "c1/mounts/2").read_text()

    # virtiofsd copies this namespace and makes it a slave after it
    # connects; a bind added afterwards (a pod's second container) must
    # show up in its view.
    argv = virtiofsd_argv(VirtiofsdConfig(shared_dir=root, socket_path=work / "vfs.sock"))
    virtiofsd = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (work / "vfs.sock").exists():
            assert time.monotonic() < deadline, "virtiofsd made no socket"
            time.sleep(0.05)
        vhost_user = socket.socket(socket.AF_UNIX)
        vhost_user.connect(str(work / "vfs.sock"))
        # The sandboxed child (PID 1 of its PID namespace) serves the share.
        while True:
            children = Path(f"/proc/{virtiofsd.pid}/task/{virtiofsd.pid}/children").read_text().split()
            if children and Path(f"/proc/{children[0]}/root/c1").exists():
                break
            assert time.monotonic() < deadline, "virtiofsd did not set up its sandbox"
            time.sleep(0.05)
        view = Path(f"/proc/{children[0]}/root")
        second = plan_mounts(json.loads((work / "config2.json").read_text()), "c2", work / "rootfs", os.stat)
        shared.apply(second.binds)
        report["virtiofsd_sees_later_bind"] = (view / "c2/mounts/0/data").read_text()
        report["virtiofsd_sees_first"] = (view / "c1/mounts/1").read_text()
        shared.release(second.binds)
        report["released"] = sorted(os.listdir(root))
        report["virtiofsd_after_release"] = (view / "c2").exists()
        vhost_user.close()
    finally:
        virtiofsd.kill()
        virtiofsd.wait()
    shared.destroy()
    report["destroyed"] = (work / "shared").exists()
    print(json.dumps(report))
    """
)


@pytest.fixture
def work() -> Iterator[Path]:
    # Short: virtiofsd's socket path must fit in sockaddr_un.
    path = Path(tempfile.mkdtemp(prefix="capsa-sd-", dir="/tmp"))
    try:
        yield path
    finally:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            assert str(path) not in line, f"left mounted on the host: {line}"
        shutil.rmtree(path, ignore_errors=True)


def bind(source: Path, destination: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source), "options": list(options)}


def test_binds_in_a_private_namespace_reach_virtiofsd(work: Path) -> None:
    if not DEFAULT_VIRTIOFSD.exists():
        pytest.skip(f"{DEFAULT_VIRTIOFSD} is missing")
    (work / "rootfs" / "bin").mkdir(parents=True)
    (work / "rootfs" / "etc").mkdir()
    volume = work / "volume"
    volume.mkdir()
    hosts = work / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    config = work / "app.ini"
    config.write_text("read only\n")
    # The child reads them as c1/mounts/0, 1 and 2.
    spec = {
        "mounts": [
            bind(volume, "/data", "rbind", "rw"),
            bind(hosts, "/etc/hosts", "bind", "rprivate"),
            bind(config, "/etc/app.ini", "rbind", "ro"),
        ]
    }
    (work / "config.json").write_text(json.dumps(spec))
    second_volume = work / "volume2"
    second_volume.mkdir()
    (second_volume / "data").write_text("second container")
    (work / "config2.json").write_text(json.dumps({"mounts": [bind(second_volume, "/v", "rbind")]}))

    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(work)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["rootfs"] == ["bin", "etc"]
    assert report["hosts"] == "127.0.0.1 localhost\n"
    assert (volume / "written-in-share").read_text() == "from the share"  # writes reach the host
    assert report["ro_write"] == "EROFS"
    assert config.read_text() == report["ro_content"] == "read only\n"
    assert report["virtiofsd_sees_later_bind"] == "second container"
    assert report["virtiofsd_sees_first"] == "127.0.0.1 localhost\n"
    assert report["released"] == ["c1"]
    assert report["virtiofsd_after_release"] is False
    assert report["destroyed"] is False
    # The mount points never existed outside the child's namespace.
    assert not (work / "shared").exists()
    assert sorted(os.listdir(volume)) == ["written-in-share"]


def test_a_failed_bind_undoes_the_whole_call(work: Path) -> None:
    script = textwrap.dedent(
        """
        import json, os, sys
        from pathlib import Path
        from capsa.errors import StorageError
        from capsa.runtime.mounts import HostBind
        from capsa.storage.shared import SharedDir, enter_mount_namespace

        work = Path(sys.argv[1])
        enter_mount_namespace()
        shared = SharedDir(work / "shared")
        shared.create()
        good = HostBind(work / "src", "c/mounts/0", readonly=False, directory=True, recursive=False)
        bad = HostBind(work / "gone", "c/mounts/1", readonly=False, directory=True, recursive=False)
        try:
            shared.apply([good, bad])
            error = None
        except StorageError as exc:
            error = str(exc)
        left = sorted(str(p.relative_to(work / "shared")) for p in (work / "shared").rglob("*"))
        mounted = [line for line in open("/proc/self/mountinfo") if str(work / "shared") + "/" in line]
        shared.destroy()
        print(json.dumps({"error": error, "left": left, "mounted": mounted}))
        """
    )
    (work / "src").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script, str(work)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] == f"cannot bind {work}/gone at {work}/shared/c/mounts/1: No such file or directory"
    assert report["left"] == []
    assert report["mounted"] == []
