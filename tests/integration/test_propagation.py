"""Bind propagation across the proxy's mount namespace and virtiofsd's, with no VM.

Needs root (mount(2), unshare(2)) and Debian's virtiofsd.  The test runs a
stand-in *host* in a child process with a mount namespace of its own (so
nothing reaches the real host): a shared tmpfs holds the bind sources, as
a systemd host's shared ``/`` would.  The host starts a *proxy* process
that does what capsa-proxy does (:func:`enter_mount_namespace`,
:class:`SharedDir`, virtiofsd), then mounts under the bind sources after
the binds were made, and asks the proxy what it and virtiofsd see.

The whole chain, into a container in a VM, is
tests/integration/test_propagation_vm.py.
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

import pytest

from capsa.storage.virtiofsd import DEFAULT_VIRTIOFSD

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, unshare)"),
    pytest.mark.skipif(not DEFAULT_VIRTIOFSD.exists(), reason=f"{DEFAULT_VIRTIOFSD} is missing"),
]

# The proxy: binds three sources, starts virtiofsd, then answers "look" lines
# with what it and virtiofsd see, until "quit".
PROXY = textwrap.dedent(
    """
    import errno, json, os, socket, subprocess, sys, time
    from pathlib import Path
    from capsa.agent import libc
    from capsa.runtime.mounts import plan_mounts
    from capsa.storage.shared import SharedDir, enter_mount_namespace
    from capsa.storage.virtiofsd import VirtiofsdConfig, virtiofsd_argv

    work = Path(sys.argv[1])
    enter_mount_namespace()
    shared = SharedDir(work / "run" / "shared")
    shared.create()
    root = shared.path
    (root / ".marker").touch()
    argv = virtiofsd_argv(VirtiofsdConfig(shared_dir=root, socket_path=work / "run" / "vfs.sock"))
    virtiofsd = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    vhost_user = socket.socket(socket.AF_UNIX)
    try:
        # virtiofsd first, as in capsa-proxy: the VM boots before its containers are bound.
        deadline = time.monotonic() + 10
        while not (work / "run" / "vfs.sock").exists():
            assert time.monotonic() < deadline, "virtiofsd made no socket"
            time.sleep(0.05)
        vhost_user.connect(str(work / "run" / "vfs.sock"))
        while True:
            children = Path(f"/proc/{virtiofsd.pid}/task/{virtiofsd.pid}/children").read_text().split()
            # Its root is the shared dir once it pivot_root()ed: the marker shows.
            if children and Path(f"/proc/{children[0]}/root/.marker").exists():
                break
            assert time.monotonic() < deadline, "virtiofsd did not set up its sandbox"
            time.sleep(0.05)
        view = Path(f"/proc/{children[0]}/root")
        (root / ".marker").unlink()
        spec = json.loads((work / "config.json").read_text())
        plan = plan_mounts(spec, "c1", work / "rootfs", os.stat, bundle=work)
        shared.apply(plan.binds)
        staging = sorted(p.name for p in (work / "run").iterdir() if p.name.startswith(".bind-"))
        print(json.dumps({"ready": True, "staging_left": staging}), flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            report = {}
            for index, name in enumerate(("slave", "private", "ro", "default")):
                for where, top in (("proxy", root), ("virtiofsd", view)):
                    path = top / "c1" / "mounts" / str(index) / "sub" / "f"
                    report[f"{where}_{name}"] = path.read_text() if path.exists() else None
            try:
                (view / "c1/mounts/2/written").write_text("x")
                report["virtiofsd_ro_write"] = "allowed"
            except OSError as exc:
                report["virtiofsd_ro_write"] = errno.errorcode[exc.errno]
            # One way only: a mount made here under a slave bind stays here.
            inner = root / "c1/mounts/0/inner"
            if not os.path.ismount(inner):
                inner.mkdir(exist_ok=True)
                libc.mount("tmpfs", str(inner), "tmpfs")
                (inner / "g").write_text("proxy")
            print(json.dumps(report), flush=True)
        libc.umount(str(root / "c1/mounts/0/inner"), libc.MNT_DETACH)
        shared.destroy()
    finally:
        vhost_user.close()
        virtiofsd.kill()
        virtiofsd.wait()
    """
)

# The stand-in host: a shared tmpfs of bind sources, the proxy, mounts after
# the binds, and the proxy's answers before and after unmounting them.
HOST = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from pathlib import Path
    from capsa.agent import libc

    work = Path(sys.argv[1])
    proxy_code = sys.argv[2]
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount("none", "/", "", libc.MS_REC | libc.MS_PRIVATE)
    host = work / "host"
    host.mkdir()
    libc.mount("tmpfs", str(host), "tmpfs")
    libc.mount("none", str(host), "", libc.MS_SHARED)
    names = ("slave", "private", "ro", "default")
    for name in names:
        (host / name / "sub").mkdir(parents=True)
    options = {"slave": ["rbind", "rslave"], "private": ["rbind", "rprivate"], "ro": ["rbind", "rslave", "ro"],
               "default": ["rbind"]}
    spec = {"mounts": [{"destination": "/" + name, "type": "bind", "source": str(host / name),
                        "options": options[name]} for name in names]}
    (work / "config.json").write_text(json.dumps(spec))
    (work / "rootfs").mkdir()
    (work / "run").mkdir()
    proxy = subprocess.Popen([sys.executable, "-c", proxy_code, str(work)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    result = {}
    try:
        result["start"] = json.loads(proxy.stdout.readline())
        for name in names:
            libc.mount("tmpfs", str(host / name / "sub"), "tmpfs")
            (host / name / "sub" / "f").write_text("host " + name)
        proxy.stdin.write("look\\n"); proxy.stdin.flush()
        result["mounted"] = json.loads(proxy.stdout.readline())
        result["host_sees_proxy_mount"] = os.path.ismount(host / "slave" / "inner")
        for name in names:
            libc.umount(str(host / name / "sub"))
        proxy.stdin.write("look\\n"); proxy.stdin.flush()
        result["unmounted"] = json.loads(proxy.stdout.readline())
        proxy.stdin.write("quit\\n"); proxy.stdin.flush()
    finally:
        proxy.stdin.close()
        result["proxy_status"] = proxy.wait(timeout=30)
    result["staging_after"] = sorted(p.name for p in (work / "run").iterdir())
    print(json.dumps(result))
    """
)


@pytest.fixture
def work() -> Iterator[Path]:
    # Short: virtiofsd's socket path must fit in sockaddr_un.
    path = Path(tempfile.mkdtemp(prefix="capsa-pr-", dir="/tmp"))
    try:
        yield path
    finally:
        leaked = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]
        shutil.rmtree(path, ignore_errors=True)
        assert not leaked, f"left mounted on the host: {leaked}"


def test_host_mounts_after_the_binds_follow_the_propagation(work: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", HOST, str(work), PROXY], capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["start"] == {"ready": True, "staging_left": []}
    mounted = report["mounted"]
    # rslave (HostToContainer) and no word at all (runc's rslave root): the host's
    # later mount reaches the proxy's bind and virtiofsd's copy of it.
    for name in ("slave", "default", "ro"):
        assert mounted[f"proxy_{name}"] == mounted[f"virtiofsd_{name}"] == f"host {name}", name
    # rprivate: it does not, not even in virtiofsd, which copied the bind when it was made.
    assert mounted["proxy_private"] is None
    assert mounted["virtiofsd_private"] is None
    # ro reached virtiofsd's copy too (made read-only before it was bound into the share).
    assert mounted["virtiofsd_ro_write"] == "EROFS"
    # Nothing mounted in the proxy's namespace reaches the host.
    assert report["host_sees_proxy_mount"] is False
    # The host's umount propagates as well: no copy keeps the volume alive.
    unmounted = report["unmounted"]
    assert all(value is None for key, value in unmounted.items() if key != "virtiofsd_ro_write"), unmounted
    assert report["proxy_status"] == 0
    assert report["staging_after"] == ["vfs.sock"] or report["staging_after"] == []
