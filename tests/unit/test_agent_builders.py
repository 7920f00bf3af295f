"""The agent's pure parts: crun argv, crun's errors, bundle config, options, mounts, cgroups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsa.agent import cgroup, crun, init, libc, options, storage
from capsa.errors import BundleError, InvalidArgument
from capsa.protocols import agent_pb2 as pb

CRUN = crun.Crun(binary="/usr/bin/crun", root="/run/crun")
BASE = ["/usr/bin/crun", "--root", "/run/crun", "--log=file:/l", "--log-format=json"]


def test_create_argv_plain_and_with_terminal() -> None:
    assert crun.create_argv(CRUN, "/l", "c1", "/b", "/b/pid") == [
        *BASE,
        "create",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/pid",
        "--",
        "c1",
    ]
    argv = crun.create_argv(CRUN, "/l", "c1", "/b", "/b/pid", console_socket="/s.sock", no_pivot=True)
    assert argv[len(BASE) :] == [
        "create",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/pid",
        "--console-socket",
        "/s.sock",
        "--no-pivot",
        "--",
        "c1",
    ]


def test_other_commands_put_the_id_last_after_the_options() -> None:
    assert crun.start_argv(CRUN, "/l", "c1") == [*BASE, "start", "--", "c1"]
    assert crun.kill_argv(CRUN, "/l", "c1", 9) == [*BASE, "kill", "--", "c1", "9"]
    assert crun.kill_argv(CRUN, "/l", "c1", 15, all_processes=True) == [*BASE, "kill", "--all", "--", "c1", "15"]
    assert crun.delete_argv(CRUN, "/l", "c1") == [*BASE, "delete", "--force", "--", "c1"]
    assert crun.pause_argv(CRUN, "/l", "c1") == [*BASE, "pause", "--", "c1"]
    assert crun.resume_argv(CRUN, "/l", "c1") == [*BASE, "resume", "--", "c1"]
    assert crun.exec_argv(CRUN, "/l", "c1", "/p.json", "/p.pid", "/s") == [
        *BASE,
        "exec",
        "--process",
        "/p.json",
        "--detach",
        "--pid-file",
        "/p.pid",
        "--console-socket",
        "/s",
        "--",
        "c1",
    ]
    assert crun.version_argv(CRUN) == ["/usr/bin/crun", "--version"]


def test_parse_version() -> None:
    out = "crun version 1.8.1\ncommit: f8a096be\nrundir: /run/crun\nspec: 1.0.0\n+SYSTEMD +SECCOMP\n"
    assert crun.parse_version(out) == "1.8.1"
    assert crun.parse_version("") == ""


def test_error_message_prefers_the_last_error_record_of_the_log() -> None:
    log = "\n".join(
        [
            json.dumps({"msg": "some warning", "level": "warning", "time": "t"}),
            json.dumps({"msg": "first", "level": "error", "time": "t"}),
            json.dumps(
                {
                    "msg": "executable file `nosuch` not found in $PATH: No such file or directory",
                    "level": "error",
                    "time": "t",
                }
            ),
        ]
    )
    message = crun.error_message(log, "ignored stderr", "create", "exit status 1")
    assert message == "executable file `nosuch` not found in $PATH: No such file or directory"


def test_error_message_falls_back_to_stderr_then_to_the_status() -> None:
    assert crun.error_message("", "noise\ncrun: boom\n", "start", "exit status 1") == "crun: boom"
    assert crun.error_message("", "", "start", "killed by signal 9") == "crun start failed (killed by signal 9)"
    assert crun.error_message("not json at all\n", "", "kill", "exit status 1") == "not json at all"


def test_bundle_config_replaces_only_root_path() -> None:
    spec = crun.load_spec(b'{"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": true}, "process": {}}')
    out = json.loads(crun.bundle_config(spec, "/run/capsa/containers/c1/rootfs"))
    assert out == {
        "ociVersion": "1.0.2",
        "root": {"path": "/run/capsa/containers/c1/rootfs", "readonly": True},
        "process": {},
    }
    assert spec["root"]["path"] == "rootfs"  # the input is not modified
    assert json.loads(crun.bundle_config({}, "/r"))["root"] == {"path": "/r"}


def test_guest_spec_drops_what_only_means_something_on_the_host() -> None:
    spec = {
        "root": {"path": "rootfs"},
        "hooks": {"prestart": [{"path": "/usr/bin/dockerd", "args": ["libnetwork-setkey"]}]},
        "process": {"args": ["sh"], "apparmorProfile": "docker-default", "selinuxLabel": "x"},
        "linux": {
            "mountLabel": "y",
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/run/netns/cni-1234"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "mount"},
            ],
            "cgroupsPath": "/docker/abc",
        },
    }
    out = crun.guest_spec(spec, "/g/rootfs")
    assert out == {
        "root": {"path": "/g/rootfs"},
        "process": {"args": ["sh"]},
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/proc/1/ns/net"},
                {"type": "ipc"},
                {"type": "mount"},
            ],
            "cgroupsPath": "/docker/abc",
        },
    }
    assert spec["linux"]["namespaces"][1]["path"] == "/run/netns/cni-1234"  # input untouched
    # A network namespace without a path too: the guest's network is the one an engine
    # configures later in the container's namespace on the host (or loopback only).
    assert crun.guest_spec({"linux": {"namespaces": [{"type": "network"}]}}, "/r")["linux"] == {
        "namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]
    }


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'{"process": 3}'])
def test_load_spec_rejects_what_crun_could_not_use(raw: bytes) -> None:
    with pytest.raises(BundleError):
        crun.load_spec(raw)


def test_wants_terminal() -> None:
    assert crun.wants_terminal({"terminal": True})
    assert not crun.wants_terminal({"terminal": False})
    assert not crun.wants_terminal({})
    assert not crun.wants_terminal(None)


def test_kernel_cmdline_defaults_and_overrides() -> None:
    default = options.from_kernel_cmdline("console=ttyS0 panic=-1 random.trust_cpu=on\n")
    assert (default.channel, default.vsock_port, default.debug, default.guest) == ("serial", 1024, False, True)
    chosen = options.from_kernel_cmdline("capsa.channel=vsock capsa.vsock_port=2048 capsa.debug=1 quiet")
    assert (chosen.channel, chosen.vsock_port, chosen.debug) == ("vsock", 2048, True)
    assert not default.template and not chosen.template
    assert options.from_kernel_cmdline("quiet capsa.template=1").template


def test_kernel_cmdline_quotes_and_bare_words() -> None:
    params = options.split_kernel_cmdline('a=1 quiet b="x y" a=2')
    assert params == {"a": "2", "quiet": "", "b": "x y"}


@pytest.mark.parametrize("cmdline", ["capsa.channel=pigeon", "capsa.vsock_port=x", "capsa.vsock_port=0"])
def test_kernel_cmdline_rejects_bad_values(cmdline: str) -> None:
    with pytest.raises(InvalidArgument):
        options.from_kernel_cmdline(cmdline)


@given(st.text())
def test_split_kernel_cmdline_never_fails(text: str) -> None:
    assert isinstance(options.split_kernel_cmdline(text), dict)


def test_host_argv() -> None:
    opts = options.from_argv(["--listen", "unix:/tmp/a.sock", "--crun", "/x/crun", "--state-dir", "/s"])
    assert (opts.channel, opts.listen_path, opts.crun, opts.state_dir, opts.guest) == (
        "unix",
        "/tmp/a.sock",
        "/x/crun",
        "/s",
        False,
    )
    with pytest.raises(SystemExit):
        options.from_argv(["--listen", "tcp:1"])


def test_split_mount_options() -> None:
    flags, data = storage.split_options(["ro,nosuid", "dax", "cache=mmap", "rw", "ro"])
    assert flags == libc.MS_RDONLY | libc.MS_NOSUID
    assert data == "dax,cache=mmap"


def test_virtiofs_and_9p_mount_requests() -> None:
    rootfs = pb.Storage(driver="virtiofs", source="rootfs0")
    assert storage.mount_request(rootfs, "/run/capsa/containers/c1/rootfs") == storage.MountRequest(
        "rootfs0", "/run/capsa/containers/c1/rootfs", "virtiofs", 0, ""
    )
    nine = pb.Storage(driver="9p", source="rootfs", mount_point="/mnt/r", options=["ro", "msize=65536"])
    assert storage.mount_request(nine) == storage.MountRequest(
        "rootfs", "/mnt/r", "9p", libc.MS_RDONLY, "trans=virtio,version=9p2000.L,msize=65536"
    )
    default_9p = storage.mount_request(pb.Storage(driver="9p", source="t", mount_point="/m"))
    assert default_9p.data == "trans=virtio,version=9p2000.L,msize=512000"


def test_blk_and_local_mount_requests() -> None:
    blk = pb.Storage(driver="blk", source="/dev/vda", fstype="ext4", mount_point="/v")
    assert storage.mount_request(blk) == storage.MountRequest("/dev/vda", "/v", "ext4")
    local = storage.mount_request(pb.Storage(driver="local", mount_point="/scratch", options=["size=64m"]))
    assert local == storage.MountRequest("tmpfs", "/scratch", "tmpfs", 0, "size=64m")


@pytest.mark.parametrize(
    "item",
    [
        pb.Storage(driver="nfs", source="x", mount_point="/m"),
        pb.Storage(driver="virtiofs", source="x"),
        pb.Storage(driver="virtiofs", source="x", mount_point="relative"),
        pb.Storage(driver="virtiofs", mount_point="/m"),
        pb.Storage(driver="blk", source="/dev/vda", mount_point="/m"),
    ],
)
def test_bad_storages_are_invalid_arguments(item: pb.Storage) -> None:
    with pytest.raises(InvalidArgument):
        storage.mount_request(item)


def test_cgroup_parsing() -> None:
    assert cgroup.unified_path("12:cpu:/x\n0::/machine/c1\n") == "/machine/c1"
    assert cgroup.unified_path("1:name=systemd:/\n") == ""
    assert cgroup.parse_flat_keyed("usage_usec 1500\nuser_usec 1000\nbad\n") == {"usage_usec": 1500, "user_usec": 1000}
    assert cgroup.parse_single_value("max\n") == 0
    assert cgroup.parse_single_value("4096\n") == 4096
    assert cgroup.directory("/a/b", "/sys/fs/cgroup") == "/sys/fs/cgroup/a/b"


def test_cgroup_stats_from_files(tmp_path: Path) -> None:
    directory = str(tmp_path)
    for name, text in {
        "cpu.stat": "usage_usec 2500\nuser_usec 2000\n",
        "memory.current": "1048576\n",
        "memory.max": "max\n",
        "cgroup.procs": "17\n23\n",
    }.items():
        with open(f"{directory}/{name}", "w") as file:
            file.write(text)
    assert cgroup.read_stats(directory) == cgroup.CgroupStats(2500, 1048576, 0, 0)
    assert cgroup.read_pids(directory) == [17, 23]


def test_subtree_control_line() -> None:
    assert init.subtree_control_line("cpuset cpu io memory hugetlb pids rdma misc\n") == (
        "+cpuset +cpu +io +memory +hugetlb +pids +rdma +misc"
    )
    assert init.subtree_control_line("\n") == ""


def test_root_is_initramfs() -> None:
    initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=241584k\n22 1 0:20 / /proc rw,nosuid - proc proc rw\n"
    assert init.root_is_initramfs(initramfs)
    disk = "29 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    assert not init.root_is_initramfs(disk)
    assert not init.root_is_initramfs("")


def test_root_image_read_only_needs_the_device_and_a_block_device(tmp_path: Path) -> None:
    assert init.make_root_image_read_only(str(tmp_path / "pmem0")) is None  # an initrd boot: no device
    not_a_disk = tmp_path / "file"
    not_a_disk.write_bytes(b"")
    problem = init.make_root_image_read_only(str(not_a_disk))
    assert problem is not None and problem.startswith(f"{not_a_disk}: BLKROSET")


def test_init_mounts_come_in_dependency_order() -> None:
    targets = [request.target for request in init.INIT_MOUNTS]
    for index, target in enumerate(targets):
        parents = [t for t in targets if target != t and target.startswith(t.rstrip("/") + "/")]
        assert all(targets.index(parent) < index for parent in parents), target


def test_init_exec_time_comes_from_the_kernel_log() -> None:
    records = [
        "6,300,3040000,-;Freeing unused kernel image (initmem) memory: 952K\n",
        "6,301,3053413,-;Run /init as init process\n",
        " SUBSYSTEM=whatever\n",
    ]
    assert init.init_exec_uptime(records) == 3.053413
    assert init.init_exec_uptime(records[:1]) is None


def test_a_pods_container_joins_the_sandbox_containers_namespaces() -> None:
    spec = {
        "linux": {
            "namespaces": [
                {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                {"type": "uts", "path": "/proc/4242/ns/uts"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "pid"},
            ]
        }
    }
    joined = crun.guest_spec(spec, "/r", join_pid=37)["linux"]["namespaces"]
    # The guest process of the sandbox, not the host PID; the network is the guest's own.
    guest_network = {"type": "network", "path": "/proc/1/ns/net"}
    assert joined == [
        {"type": "ipc", "path": "/proc/37/ns/ipc"},
        {"type": "uts", "path": "/proc/37/ns/uts"},
        guest_network,
        {"type": "pid"},
    ]
    alone = crun.guest_spec(spec, "/r")["linux"]["namespaces"]
    assert alone == [{"type": "ipc"}, {"type": "uts"}, guest_network, {"type": "pid"}]


def test_oom_kills_are_counted_from_memory_events(tmp_path: Path) -> None:
    assert cgroup.oom_kills(str(tmp_path)) == 0  # no memory controller: no file, no kills
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n")
    assert cgroup.oom_kills(str(tmp_path)) == 2


def test_the_guest_kernel_is_hardened_before_any_container(tmp_path: Path) -> None:
    from capsa.agent.init import HARDENING_SYSCTLS, harden

    for name, _ in HARDENING_SYSCTLS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0")
    assert harden(proc_sys=str(tmp_path)) == []
    assert (tmp_path / "kernel/kptr_restrict").read_text() == "2"
    assert (tmp_path / "kernel/dmesg_restrict").read_text() == "1"
    assert (tmp_path / "vm/unprivileged_userfaultfd").read_text() == "0"
    # A sysctl this kernel lacks is a feature built out of it: skipped.
    assert harden((("vm/nosuch_knob", "1"),), proc_sys=str(tmp_path)) == []
    assert not (tmp_path / "vm/nosuch_knob").exists()
    # One it refuses is reported, not fatal.
    (tmp_path / "kernel/kptr_restrict").chmod(0o444)
    (tmp_path / "kernel").chmod(0o555)
    try:
        if os.geteuid() != 0:  # root writes through file modes
            assert harden((("kernel/kptr_restrict", "2"),), proc_sys=str(tmp_path)) == [
                "kernel/kptr_restrict: Permission denied"
            ]
    finally:
        (tmp_path / "kernel").chmod(0o755)
