"""The host side of a sandbox is confined: QEMU unprivileged and jailed, and an escape drill.

Each test boots real VMs (template and cold boot) through the runc CLI and
reads what the kernel says about their processes (``/proc/PID/status``,
``/proc/PID/root``, ``/proc/PID/ns``).  The drill then stands a process
exactly where a compromised QEMU stands (its namespaces and root through
``nsenter``, its uid, gid and capabilities through ``setpriv``, its cgroup)
and checks what it can reach.  QEMU's own seccomp filter is not copied onto
the drill: the drill is less restricted than QEMU, so what it cannot do,
QEMU cannot either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Capsa, vm_processes

from capsa.config import DEFAULT_SANDBOX_ID_BASE, DEFAULT_SANDBOX_ID_COUNT
from capsa.runtime.state import StateStore

pytestmark = pytest.mark.vm

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
UNPRIVILEGED = 65534  # nobody


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def namespace(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def ram_files(pid: int) -> list[str]:
    """The RAM files behind a sandbox's guest: the template's, which every clone's copy
    starts from (a clone's own copy is unlinked once restored; a cold VM's RAM is a memfd)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    own = {line.split(None, 5)[5].removesuffix(" (deleted)") for line in maps if "/dev/shm/capsa-" in line}
    return sorted(own | {str(p) for p in Path("/var/cache/capsa/templates").glob("*/memory")})


@pytest.fixture(params=["template", "cold"])
def boot(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    config = tmp_path / "configuration.toml"
    config.write_text(f'[hypervisor]\nboot = "{request.param}"\n')
    return str(config)


@pytest.fixture
def two(capsa: Capsa, boot: str) -> Iterator[tuple[dict[str, int], dict[str, int]]]:
    """Two running sandboxes, torn down after the test."""
    capsa.spec(["sleep", "600"])
    made = []
    try:
        for cid in ("a", "b"):
            result = capsa("--config", boot, "create", "--bundle", str(capsa.bundle), cid)
            assert result.code == 0, result.stderr
            made.append(cid)
        yield vm_processes(capsa, "a"), vm_processes(capsa, "b")
    finally:
        for cid in made:
            capsa("delete", "--force", cid)


def test_qemu_runs_unprivileged_jailed_and_apart(two: tuple[dict[str, int], dict[str, int]]) -> None:
    a, b = two
    uids = []
    for host in (a, b):
        qemu = status(host["qemu"])
        assert qemu["Name"].startswith("qemu-system"), qemu["Name"]
        uid = int(qemu["Uid"].split()[0])
        assert qemu["Uid"].split() == [str(uid)] * 4
        assert qemu["Gid"].split() == [str(uid)] * 4
        assert DEFAULT_SANDBOX_ID_BASE <= uid < DEFAULT_SANDBOX_ID_BASE + DEFAULT_SANDBOX_ID_COUNT
        assert qemu["Groups"] == ""
        for cap_set in CAP_SETS:
            assert int(qemu[cap_set], 16) == 0, f"{cap_set} {qemu[cap_set]}"
        assert qemu["NoNewPrivs"] == "1"
        assert qemu["Seccomp"] == "2"
        # PID 1 of a PID namespace of its own.
        assert qemu["NSpid"].split()[-1] == "1"
        for kind in ("mnt", "pid_for_children", "ipc", "net"):
            assert namespace(host["qemu"], kind) != namespace("self", kind), kind
        # Its root is the jail: /usr and its own files, nothing else of the host.
        root = Path(f"/proc/{host['qemu']}/root")
        top = sorted(p.name for p in root.iterdir())
        assert "usr" in top
        for absent in ("etc", "home", "root", "proc", "sys", "boot", "srv"):
            assert absent not in top, top
        assert not (root / "etc" / "shadow").exists()
        limits = Path(f"/proc/{host['qemu']}/limits").read_text()
        assert any(line.startswith("Max core file size") and line.split()[4] == "0" for line in limits.splitlines())
        uids.append(uid)
    assert uids[0] != uids[1], "two live sandboxes share a uid"
    assert namespace(a["qemu"], "pid") != namespace(b["qemu"], "pid")


def test_virtiofsd_keeps_only_what_it_needs(two: tuple[dict[str, int], dict[str, int]]) -> None:
    a, _ = two
    # virtiofsd forks its sandboxed worker at start; the worker serves the guest.
    children = Path(f"/proc/{a['virtiofsd']}/task/{a['virtiofsd']}/children").read_text().split()
    assert children, "virtiofsd has no sandboxed worker"
    worker = status(int(children[0]))
    assert worker["NoNewPrivs"] == "1"
    assert worker["Seccomp"] == "2"
    effective = int(worker["CapEff"], 16)
    cap_mknod, cap_sys_admin = 27, 21
    assert not effective & (1 << cap_mknod), "virtiofsd may make device nodes"
    assert not effective & (1 << cap_sys_admin)
    assert int(worker["CapBnd"], 16) == 0
    assert namespace(children[0], "mnt") != namespace("self", "mnt")
    assert namespace(children[0], "pid") != namespace("self", "pid")
    assert namespace(children[0], "net") != namespace("self", "net")


DRILL = textwrap.dedent(
    """
    import json, os, socket, sys
    other = json.loads(sys.argv[1])
    report = {"uid": os.getuid(), "pid": os.getpid()}

    def attempt(name, action):
        try:
            action()
            report[name] = "succeeded"
        except OSError as exc:
            report[name] = exc.__class__.__name__

    def read(path):
        with open(path, "rb") as f:
            f.read(1)

    def connect(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)

    def write_under(directory):
        with open(os.path.join(directory, "drill"), "w") as f:
            f.write("x")

    attempt("read /etc/shadow", lambda: read("/etc/shadow"))
    attempt("read /etc/passwd", lambda: read("/etc/passwd"))
    attempt("read host /root", lambda: os.listdir("/root"))
    attempt("read host PID 1's root", lambda: os.listdir("/proc/1/root/etc"))
    for path in other["ram"]:
        attempt("read other RAM " + path, lambda: read(path))
    for path in other["sockets"]:
        attempt("connect " + path, lambda: connect(path))
    attempt("write state root", lambda: write_under(other["state_root"]))
    attempt("write socket root", lambda: write_under(other["socket_root"]))
    attempt("signal other QEMU", lambda: os.kill(other["qemu"], 0))
    visible = []
    for pid in range(1, 65536):
        try:
            os.kill(pid, 0)
            visible.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            visible.append(pid)
    report["visible pids"] = visible
    print(json.dumps(report))
    """
)


def ns_thread_ids(pid: int) -> set[int]:
    """The ids ``pid``'s threads have in its own PID namespace (kill(2) takes thread ids too)."""
    ids = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ids.add(int(status(int(tid))["NSpid"].split()[-1]))
        except (OSError, KeyError):
            continue  # a worker thread that just ended
    return ids


def cgroup_dirs(pid: int) -> list[str]:
    """The directories of ``pid``'s cgroups in every mounted hierarchy (v1 and v2)."""
    unified = "/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup"
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        base = f"/sys/fs/cgroup/{controllers.removeprefix('name=')}" if controllers else unified
        if Path(base + path).is_dir():
            dirs.append(base + path)
    return dirs


def drill_target(capsa: Capsa, cid: str, host: dict[str, int]) -> dict[str, object]:
    """What a process in one sandbox's QEMU must not reach of sandbox ``cid``."""
    sockets = StateStore(capsa.root).socket_dir(cid)
    return {
        "ram": ram_files(host["qemu"]),
        "sockets": [str(sockets / "proxy.sock"), str(sockets / "vm" / "agent.sock"), str(sockets / "vm" / "vfs.sock")],
        "state_root": str(capsa.root / cid),
        "socket_root": str(sockets),
        "qemu": host["qemu"],
    }


def test_escape_drill_from_where_qemu_stands(capsa: Capsa, two: tuple[dict[str, int], dict[str, int]]) -> None:
    a, b = two
    qemu = a["qemu"]
    creds = status(qemu)
    uid = creds["Uid"].split()[0]
    gid = creds["Gid"].split()[0]
    target = drill_target(capsa, "b", b)
    # Into QEMU's cgroup first (every hierarchy), then its namespaces and root, then its credentials.
    argv = [
        "nsenter", f"--target={qemu}", "--mount", "--ipc", "--pid", "--root", "--wd",
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        "/usr/bin/python3", "-I", "-c", DRILL, json.dumps(target),
    ]  # fmt: skip
    join = "; ".join(f"echo $$ > {directory}/cgroup.procs" for directory in cgroup_dirs(qemu))
    before_threads = ns_thread_ids(qemu)
    result = subprocess.run(
        ["sh", "-c", f'{join}; exec "$@"', "drill", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["uid"] == int(uid)
    failures = {k: v for k, v in report.items() if v == "succeeded"}
    assert failures == {}, f"the drill reached: {failures}"
    # In QEMU's PID namespace only QEMU (1, and its threads' ids) and the drill itself exist.
    qemu_threads = before_threads | ns_thread_ids(qemu)
    assert 1 in qemu_threads
    assert set(report["visible pids"]) <= qemu_threads | {report["pid"]}, report["visible pids"]


def test_a_local_user_reaches_no_socket_state_or_ram(capsa: Capsa, two: tuple[dict[str, int], dict[str, int]]) -> None:
    a, b = two
    targets = []
    for cid, host in (("a", a), ("b", b)):
        target = drill_target(capsa, cid, host)
        targets += [*target["ram"], *target["sockets"]]  # type: ignore[misc]
        targets += [str(capsa.root / cid / "state.json"), str(capsa.root / cid / "console.log")]
    templates = Path("/var/cache/capsa/templates")
    targets += [str(p) for p in templates.glob("*/memory")]
    code = textwrap.dedent(
        """
        import json, socket, sys
        reached = []
        for path in json.loads(sys.argv[1]):
            try:
                if path.endswith(".sock"):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(path)
                else:
                    open(path, "rb").close()
                reached.append(path)
            except OSError:
                pass
        print(json.dumps(reached))
        """
    )
    # fmt: off
    result = subprocess.run(
        [
            "setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
            sys.executable, "-I", "-c", code, json.dumps(targets),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # fmt: on
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    # Template caches are root's alone, whatever the umask they were made under.
    if templates.exists():
        assert templates.stat().st_mode & 0o077 == 0
        for memory in templates.glob("*/memory"):
            assert memory.stat().st_uid == 0, "a template's RAM is still its maker's QEMU's"
