"""runtime/hostcgroup.py: layouts from mountinfo, cgroupsPath resolution (runc's fs and systemd
naming), and create / move / remove against a fake cgroup tree under tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from capsa.errors import InvalidArgument
from capsa.runtime import hostcgroup
from capsa.runtime.hostcgroup import (
    HostCgroup,
    Layout,
    clean_path,
    create,
    expand_slice,
    looks_like_systemd,
    parse_mountinfo,
    parse_proc_cgroup,
    resolve,
)

# Debian 12 booted with systemd.unified_cgroup_hierarchy=0 (this machine's layout, cpu and cpuacct apart).
HYBRID = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# A systemd v1 host: cpu and cpuacct co-mounted (both names are symlinks to one mount).
LEGACY = """\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/systemd rw,relatime shared:10 - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,blkio
"""
UNIFIED = """\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
60 35 0:30 / /var/lib/kubelet/x rw,relatime - cgroup2 cgroup2 rw
"""


def test_layouts() -> None:
    hybrid = parse_mountinfo(HYBRID)
    assert hybrid.layout == Layout.HYBRID
    assert [h.name for h in hybrid.joined()] == [
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "pids",
        "name=systemd",
        "",
    ]
    assert hybrid.mounts[-1].mountpoint == "/sys/fs/cgroup/unified" and hybrid.mounts[-1].version == 2

    legacy = parse_mountinfo(LEGACY)
    assert legacy.layout == Layout.LEGACY
    assert [(h.name, h.mountpoint) for h in legacy.joined()] == [
        ("name=systemd", "/sys/fs/cgroup/systemd"),
        ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
        ("memory", "/sys/fs/cgroup/memory"),
        ("blkio", "/sys/fs/cgroup/blkio"),
    ]

    unified = parse_mountinfo(UNIFIED)
    assert unified.layout == Layout.UNIFIED
    # The second mount of the same hierarchy is not a second place to go.
    assert [h.mountpoint for h in unified.joined()] == ["/sys/fs/cgroup"]

    assert parse_mountinfo("22 1 0:21 / /sys rw - sysfs sysfs rw\n").layout == Layout.NONE


def test_mountinfo_escapes_and_read_only() -> None:
    text = "40 31 0:37 / /tmp/my\\040cg ro,relatime - cgroup cgroup rw,memory\n"
    (memory,) = parse_mountinfo(text).mounts
    assert memory.mountpoint == "/tmp/my cg"
    assert memory.read_only


def test_proc_cgroup() -> None:
    own = parse_proc_cgroup("9:name=systemd:/\n2:cpuacct,cpu:/a\n4:memory:/process_api/x\n0::/user.slice\n")
    assert own == {"name=systemd": "/", "cpu,cpuacct": "/a", "memory": "/process_api/x", "": "/user.slice"}


@pytest.mark.parametrize(
    ("given", "cleaned"),
    [
        ("/libpod_parent/libpod-abc", "/libpod_parent/libpod-abc"),
        ("/a/../../b/", "/b"),
        ("a/../../../b", "b"),
        ("pod//x/./y", "pod/x/y"),
        ("..", ""),
        ("", ""),
    ],
)
def test_clean_path_never_climbs_out(given: str, cleaned: str) -> None:
    assert clean_path(given) == cleaned


def test_expand_slice() -> None:
    assert expand_slice("system.slice") == "/system.slice"
    assert expand_slice("kubepods-burstable-pod12.slice") == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice"
    )
    assert expand_slice("-.slice") == "/"
    for bad in ("a--b.slice", "-a.slice", "a.scope", ".slice", "a/b.slice"):
        with pytest.raises(InvalidArgument, match="invalid slice name"):
            expand_slice(bad)


def test_resolve_cgroupfs() -> None:
    assert resolve("/docker/abc", "abc", systemd=False) == "/docker/abc"
    assert resolve("kubepods/pod1/abc", "abc", systemd=False) == "kubepods/pod1/abc"
    # runc's default: the container's ID under the caller's own cgroup.
    assert resolve("", "abc", systemd=False) == "abc"
    assert resolve("", None, systemd=False) is None


def test_resolve_systemd() -> None:
    assert resolve("system.slice:docker:abc", "abc", systemd=True) == "/system.slice/docker-abc.scope"
    assert (
        resolve("kubepods-besteffort-pod1.slice:cri-containerd:abc", "abc", systemd=True)
        == "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
    )
    # An empty slice is runc's default slice; no path at all is runc's whole default.
    assert resolve(":crio:abc", "abc", systemd=True) == "/system.slice/crio-abc.scope"
    assert resolve("", "abc", systemd=True) == "/system.slice/runc-abc.scope"
    assert resolve("-.slice:p:machine-x.slice", "x", systemd=True) == "/machine.slice/machine-x.slice"
    with pytest.raises(InvalidArgument, match='format "slice:prefix:name"'):
        resolve("/docker/abc", "abc", systemd=True)
    with pytest.raises(InvalidArgument, match="invalid slice name"):
        resolve("docker:p:abc", "abc", systemd=True)


def test_looks_like_systemd() -> None:
    assert looks_like_systemd("kubepods-burstable-pod1_2.slice:cri-containerd:0123abc")
    assert looks_like_systemd("system.slice:docker:abc")
    assert not looks_like_systemd("/kubepods/burstable/pod1/abc")
    assert not looks_like_systemd("k8s.io/abc")


# -- a fake cgroup tree --------------------------------------------------------------------------


def fake_host(tmp_path: Path) -> tuple[hostcgroup.Hierarchies, Path]:
    """A hybrid host under tmp_path: cpuset (with CPUs and nodes at its root), memory and cgroup2."""
    root = tmp_path / "cg"
    for name in ("cpuset", "memory", "unified"):
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    text = (
        f"34 31 0:31 / {root}/cpuset rw - cgroup cgroup rw,cpuset\n"
        f"35 31 0:32 / {root}/memory rw - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw\n"
    )
    (tmp_path / "mountinfo").write_text(text)
    return parse_mountinfo(text), root


def test_create_absolute_in_every_hierarchy(tmp_path: Path) -> None:
    hierarchies, root = fake_host(tmp_path)
    (root / "memory" / "docker").mkdir()  # already there: not ours to remove
    made = create("/docker/abc", hierarchies, {"memory": "/elsewhere"})
    assert made.dirs == {
        f"{root}/cpuset": f"{root}/cpuset/docker/abc",
        f"{root}/memory": f"{root}/memory/docker/abc",
        f"{root}/unified": f"{root}/unified/docker/abc",
    }
    assert made.created == [
        f"{root}/cpuset/docker",
        f"{root}/cpuset/docker/abc",
        f"{root}/memory/docker/abc",
        f"{root}/unified/docker",
        f"{root}/unified/docker/abc",
    ]
    # Each new cpuset cgroup got its parent's CPUs and memory nodes (else it refuses tasks).
    assert (root / "cpuset/docker/abc/cpuset.cpus").read_text() == "0-1"
    assert (root / "cpuset/docker/abc/cpuset.mems").read_text() == "0"


def test_create_relative_under_our_own_cgroup(tmp_path: Path) -> None:
    hierarchies, root = fake_host(tmp_path)
    (root / "memory" / "process_api" / "x").mkdir(parents=True)
    made = create("abc", hierarchies, {"memory": "/process_api/x", "cpuset": "/", "": "/"})
    assert made.dirs[f"{root}/memory"] == f"{root}/memory/process_api/x/abc"
    assert made.dirs[f"{root}/cpuset"] == f"{root}/cpuset/abc"
    assert made.created[-1] == f"{root}/unified/abc"


def test_a_relative_path_below_a_namespaced_mount_root(tmp_path: Path) -> None:
    """In a cgroup namespace (or a bind of a subtree) the mount shows /kubepods/x as its root."""
    hierarchy = hostcgroup.Hierarchy(1, "/sys/fs/cgroup/memory", "/kubepods/x", frozenset({"memory"}))
    own = {"memory": "/kubepods/x/pod1"}
    assert hostcgroup.directory_in(hierarchy, "abc", own) == "/sys/fs/cgroup/memory/pod1/abc"
    assert hostcgroup.directory_in(hierarchy, "/abs", own) == "/sys/fs/cgroup/memory/abs"


def test_a_read_only_hierarchy_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, root = fake_host(tmp_path)
    text = (tmp_path / "mountinfo").read_text().replace(f"{root}/memory rw", f"{root}/memory ro")
    made = create("/c1", parse_mountinfo(text), {})
    assert f"{root}/memory" not in made.dirs and f"{root}/cpuset" in made.dirs
    assert len(caplog.records) == 1 and "read-only" in caplog.records[0].getMessage()


def test_a_cgroup_that_cannot_be_made_leaves_the_container_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hierarchies, root = fake_host(tmp_path)
    (root / "memory" / "file").write_text("")  # mkdir below a file: ENOTDIR
    made = create("/file/c1", hierarchies, {})
    assert f"{root}/memory" not in made.dirs
    assert "cannot make it" in caplog.text
    made.add([os.getpid()])  # moves into what exists; nothing raises


def test_add_and_join_write_cgroup_procs(tmp_path: Path) -> None:
    hierarchies, root = fake_host(tmp_path)
    made = create("/c1", hierarchies, {})
    made.add([4242])
    assert (root / "memory/c1/cgroup.procs").read_text() == "4242"
    proc_cgroup = tmp_path / "self-cgroup"
    proc_cgroup.write_text("3:cpuset:/\n4:memory:/\n0::/\n")
    with made.joined(tmp_path / "mountinfo", proc_cgroup):
        assert (root / "unified/c1/cgroup.procs").read_text() == str(os.getpid())
        assert (root / "unified/cgroup.procs").read_text() == ""
    # Back where we came from.
    assert (root / "unified/cgroup.procs").read_text() == str(os.getpid())
    assert (root / "memory/cgroup.procs").read_text() == str(os.getpid())


def test_state_round_trip(tmp_path: Path) -> None:
    hierarchies, _ = fake_host(tmp_path)
    made = create("/c1", hierarchies, {})
    assert HostCgroup.from_dict(made.to_dict()) == made
    made.save(tmp_path / "hc.json")
    assert HostCgroup.load(tmp_path / "hc.json") == made
    assert HostCgroup.load(tmp_path / "missing.json") == HostCgroup()
    assert not HostCgroup.from_dict({})


def test_remove_only_what_we_made(tmp_path: Path) -> None:
    hierarchies, root = fake_host(tmp_path)
    no_cpuset = hostcgroup.Hierarchies(hierarchies.layout, hierarchies.mounts[1:])
    (root / "memory" / "docker").mkdir()
    made = create("/docker/abc", no_cpuset, {})
    (root / "unified" / "docker" / "other").mkdir()  # another container's, made after ours
    assert made.remove(timeout=0.5)
    assert not (root / "memory/docker/abc").exists() and (root / "memory/docker").is_dir()
    assert not (root / "unified/docker/abc").exists()
    assert (root / "unified/docker/other").is_dir()  # our parent stays while another uses it
    assert made.remove(timeout=0.5)  # twice is harmless


def test_remove_waits_while_tasks_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hierarchies, root = fake_host(tmp_path)
    made = create("/c1", hostcgroup.Hierarchies(hierarchies.layout, hierarchies.mounts[1:]), {})
    real_rmdir = os.rmdir
    busy = {"left": 3}

    def rmdir(path: str) -> None:
        if busy["left"]:
            busy["left"] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rmdir(path)

    monkeypatch.setattr(hostcgroup.os, "rmdir", rmdir)
    assert made.remove(timeout=5)
    assert busy["left"] == 0 and not (root / "memory/c1").exists()


def test_remove_kills_what_outlived_the_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hierarchies, _ = fake_host(tmp_path)
    made = create("/c1", hostcgroup.Hierarchies(hierarchies.layout, hierarchies.mounts[1:]), {})
    monkeypatch.setattr(hostcgroup, "_pids_in", lambda directory: [999999, os.getpid()])
    killed: list[int] = []
    monkeypatch.setattr(hostcgroup.os, "kill", lambda pid, sig: killed.append(pid))
    real_rmdir = os.rmdir

    def rmdir(path: str) -> None:
        if not killed:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rmdir(path)

    monkeypatch.setattr(hostcgroup.os, "rmdir", rmdir)
    assert made.remove(timeout=0.1)
    assert set(killed) == {999999}  # never ourselves


def test_setup_without_a_cgroups_path_or_hierarchies(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text("")
    assert not hostcgroup.setup("", None, systemd=False)
    made = hostcgroup.setup("/c1", "c1", systemd=False, mountinfo=tmp_path / "mountinfo")
    assert not made and made.cgroup == "/c1"


def test_unified_enables_the_accounting_controllers_down_to_the_parent(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    text = f"35 24 0:30 / {root} rw - cgroup2 cgroup2 rw\n"
    made = create("/kubepods/pod1/abc", parse_mountinfo(text), {})
    assert made.created == [f"{root}/kubepods", f"{root}/kubepods/pod1", f"{root}/kubepods/pod1/abc"]
    # A plain file keeps the last write: the root's was asked for cpu, io and pids one by one (memory was on).
    assert (root / "cgroup.subtree_control").read_text() == "+pids"
    assert not (root / "kubepods/pod1/abc/cgroup.subtree_control").exists()


def test_memory_limit_of_v1_and_v2(tmp_path: Path) -> None:
    hierarchies, root = fake_host(tmp_path)
    made = create("/kubepods/pod1/abc", hostcgroup.Hierarchies(hierarchies.layout, hierarchies.mounts[1:]), {})
    assert hostcgroup.memory_limit_mib(made, hierarchies) is None  # nothing says a limit
    # v1: the kernel sums up the ancestors' limits in memory.stat.
    (root / "memory/kubepods/pod1/abc/memory.stat").write_text(
        "cache 0\nhierarchical_memory_limit 9223372036854771712\n"
    )
    assert hostcgroup.memory_limit_mib(made, hierarchies) is None  # "unlimited"
    (root / "memory/kubepods/pod1/abc/memory.stat").write_text("cache 0\nhierarchical_memory_limit 805306368\n")
    assert hostcgroup.memory_limit_mib(made, hierarchies) == 768
    # v2: the least memory.max on the way up; "max" is none.
    (root / "unified/kubepods/pod1/abc/memory.max").write_text("max\n")
    (root / "unified/kubepods/pod1/memory.max").write_text(f"{512 << 20}\n")
    (root / "unified/kubepods/memory.max").write_text(f"{1024 << 20}\n")
    assert hostcgroup.memory_limit_mib(made, hierarchies) == 512
