"""The same bundle under runc 1.1 and under capsa: where a VM can behave as runc does, it does.

Each case runs one bundle with the host's runc and with capsa (a real VM)
and compares what a user sees: the exit status, the output, and for a
refusal that both refuse, with capsa's one line naming the problem.  Where
capsa differs on purpose (docs/vm-differences.md), the case asserts the
documented difference exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa, cmdline, leftovers, socket_dirs, subreaper
from test_host_cgroup_vm import MiB, cgroup_files, cgroups_of, directory, v1
from test_lifecycle import create, start
from test_propagation_vm import host_mount, shared_volume

from capsa.config import load_config
from capsa.runtime import hostcgroup
from capsa.runtime.hostcgroup import HOST_PIDS_MAX
from capsa.runtime.lifecycle import create_size

pytestmark = pytest.mark.vm

RUNC = shutil.which("runc")


def runc(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's runc with a state root of the test's own.

    Files, not pipes, for its output: a detached container keeps the stdio
    runc gave it, and a pipe would hold us up until the container exits.
    """
    if RUNC is None:
        pytest.skip("runc is not installed")
    argv = [RUNC, "--root", str(tmp_path / "runc-root"), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=60)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            argv, proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


def runc_run(capsa: Capsa, tmp_path: Path, cid: str) -> subprocess.CompletedProcess[str]:
    try:
        return runc(tmp_path, "run", "--bundle", str(capsa.bundle), cid)
    finally:
        runc(tmp_path, "delete", "--force", cid)


@contextlib.contextmanager
def runc_detached(capsa: Capsa, tmp_path: Path, cid: str) -> Iterator[None]:
    """The bundle created and started under runc, as an engine does; deleted (``--force``) at the end."""
    try:
        created = runc(tmp_path, "create", "--bundle", str(capsa.bundle), cid)
        assert created.returncode == 0, created.stderr
        started = runc(tmp_path, "start", cid)
        assert started.returncode == 0, started.stderr
        yield
    finally:
        deleted = runc(tmp_path, "delete", "--force", cid)
    assert deleted.returncode == 0, deleted.stderr


@contextlib.contextmanager
def capsa_detached(capsa: Capsa, cid: str) -> Iterator[None]:
    """The same under capsa; the shim is our child meanwhile (conmon's way), reaped at the end."""
    with subreaper():
        create(capsa, cid)
        try:
            start(capsa, cid)
            yield
        finally:
            deleted = capsa("delete", "--force", cid)
        assert deleted.code == 0, deleted.stderr


def edit_spec(capsa: Capsa, change: Any) -> None:
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    change(spec)
    config.write_text(json.dumps(spec))


def test_kernel_memory_limits_are_ignored_with_a_warning_as_runc_does(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["echo", "ran"])

    def limits(spec: dict[str, Any]) -> None:
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": 256 << 20, "kernel": 64 << 20}

    edit_spec(capsa, limits)
    by_runc = runc_run(capsa, tmp_path, "kmem-runc")
    by_capsa = capsa.run("kmem-capsa")
    assert (by_capsa.code, by_capsa.stdout) == (by_runc.returncode, by_runc.stdout) == (0, "ran\n"), by_capsa.stderr
    assert "memory.kernel ignored" in by_capsa.stderr and "Traceback" not in by_capsa.stderr


def test_a_namespace_path_of_the_wrong_type_is_refused_as_runc_refuses_it(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["echo", "ran"])
    uts = f"/proc/{os.getpid()}/ns/uts"

    def wrong_type(spec: dict[str, Any]) -> None:
        spec["linux"]["namespaces"] = [
            {"type": "ipc", "path": uts} if ns["type"] == "ipc" else ns for ns in spec["linux"]["namespaces"]
        ]

    edit_spec(capsa, wrong_type)
    by_runc = runc_run(capsa, tmp_path, "ns-runc")
    by_capsa = capsa.run("ns-capsa")
    assert by_runc.returncode != 0 and "ran" not in by_runc.stdout
    assert by_capsa.code != 0 and "ran" not in by_capsa.stdout
    refusal = by_capsa.stderr.strip()
    assert refusal.endswith(f"linux.namespaces: ipc namespace path {uts} is a uts namespace"), refusal
    assert len(refusal.splitlines()) == 1


# -- host resource limits under cgroupsPath ----------------------------------------------------------

#: What a host tool reads in a v1 controller's directory of the cgroup.
V1_LIMIT_FILES = {
    "cpu": ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"),
    "cpuset": ("cpuset.cpus", "cpuset.mems"),
    "memory": ("memory.limit_in_bytes",),
    "pids": ("pids.max",),
}


def host_dirs(cgroup: str) -> list[Path]:
    """An absolute cgroupsPath's directory in every hierarchy this process is in (each v1 one and cgroup2)."""
    return [directory(hierarchy, cgroup) for hierarchy in cgroups_of(os.getpid())]


def v1_limits(cgroup: str) -> dict[str, str]:
    """The limits in the cgroup an absolute cgroupsPath names, read where a host tool reads them."""
    hierarchies = hostcgroup.host_hierarchies().joined()
    where = cgroup_files({h.mountpoint: h.mountpoint + cgroup for h in hierarchies})
    return {
        name: (where[controller] / name).read_text().strip()
        for controller, names in V1_LIMIT_FILES.items()
        for name in names
    }


def guest_cpus(capsa: Capsa, cid: str) -> int:
    result = capsa("exec", cid, "grep", "-c", "^processor", "/proc/cpuinfo")
    assert result.code == 0, result.stderr
    return int(result.stdout)


def test_host_cgroup_limits_follow_runc_or_the_documented_translation(capsa: Capsa, tmp_path: Path) -> None:
    """The cgroup ``linux.cgroupsPath`` names, as a host tool reads it after runc's and capsa's create+start.

    CPU shares, the CFS period and the cpuset are the spec's under both.
    The rest bounds the whole VM (docs/architecture.md "Host cgroups",
    ``hostcgroup.host_limits``): quota ``(vCPUs + 1) x period`` for the
    vCPUs the spec's quota and cpuset gave the VM, memory the VM's guest
    RAM (its base plus the spec's limit) plus the measured overhead, and
    pids capsa's own bound on the VM's host tasks.
    """
    if not v1():
        pytest.skip("reads cgroup v1 files: this host is unified")
    tag = secrets.token_hex(3)
    cgroup = f"/capsa-parity-{tag}"
    resources: dict[str, Any] = {
        "memory": {"limit": 256 * MiB},
        "cpu": {"shares": 512, "quota": 100_000, "period": 200_000, "cpus": "0", "mems": "0"},
        "pids": {"limit": 100},
    }
    capsa.spec(["sleep", "600"])
    edit_spec(capsa, lambda spec: spec["linux"].update(cgroupsPath=cgroup, resources=resources))
    dirs = host_dirs(cgroup)
    assert [d for d in dirs if d.exists()] == []
    try:
        with runc_detached(capsa, tmp_path, "cg-runc-" + tag):
            by_runc = v1_limits(cgroup)
            made_by_runc = [d for d in dirs if d.exists()]
        left_by_runc = [d for d in dirs if d.exists()]
        with capsa_detached(capsa, "cg-capsa-" + tag):
            by_capsa = v1_limits(cgroup)
            made_by_capsa = [d for d in dirs if d.exists()]
            vcpus_seen = guest_cpus(capsa, "cg-capsa-" + tag)
        left_by_capsa = [d for d in dirs if d.exists()]
    finally:
        for leftover in dirs:
            with contextlib.suppress(OSError):
                leftover.rmdir()

    # runc writes the spec's values.
    assert by_runc == {
        "cpu.shares": "512",
        "cpu.cfs_period_us": "200000",
        "cpu.cfs_quota_us": "100000",
        "cpuset.cpus": "0",
        "cpuset.mems": "0",
        "memory.limit_in_bytes": str(256 * MiB),
        "pids.max": "100",
    }
    # Where capsa follows the spec, it is what runc wrote.
    same = ("cpu.shares", "cpu.cfs_period_us", "cpuset.cpus", "cpuset.mems")
    assert {k: by_capsa[k] for k in same} == {k: by_runc[k] for k in same}
    # Where it translates, the rule from the spec and the VM the spec sized.
    config = load_config()
    size = create_size(config, resources)  # base + ceil(quota / period) vCPUs, base + limit MiB
    assert vcpus_seen == size.vcpus
    overhead = hostcgroup.vmm_overhead_mib(hostcgroup.accelerator_of(config), exec_helpers=True)
    assert {k: v for k, v in by_capsa.items() if k not in same} == {
        "cpu.cfs_quota_us": str((size.vcpus + 1) * 200_000),
        "memory.limit_in_bytes": str((size.memory_mib + overhead) * MiB),
        "pids.max": str(HOST_PIDS_MAX),
    }
    assert size.memory_mib == config.hypervisor.default_memory_mib + 256
    # Both make it in every hierarchy (each v1 one, name=systemd, cgroup2) and remove it at delete.
    assert made_by_runc == made_by_capsa == dirs
    assert left_by_runc == left_by_capsa == []


# -- mount propagation ---------------------------------------------------------------------------------


def rslave_bundle(capsa: Capsa, source: Path) -> None:
    """A ``sleep`` bundle with ``source`` bound at /slave ``rbind,rslave`` (Podman's ``-v SRC:/slave:rslave``)."""
    capsa.spec(["sleep", "600"])

    def rslave_bind(spec: dict[str, Any]) -> None:
        spec["linux"]["rootfsPropagation"] = "rslave"  # as Podman writes it for -v SRC:DST:rslave
        spec["mounts"].append(
            {"destination": "/slave", "type": "bind", "source": str(source), "options": ["rbind", "rslave"]}
        )

    edit_spec(capsa, rslave_bind)


Seen = tuple[int, str, str]


def detached(engine: str, capsa: Capsa, tmp_path: Path, cid: str) -> contextlib.AbstractContextManager[None]:
    return runc_detached(capsa, tmp_path, cid) if engine == "runc" else capsa_detached(capsa, cid)


def exec_as(engine: str, capsa: Capsa, tmp_path: Path, cid: str, *argv: str) -> Seen:
    """``exec`` under ``engine``: its exit status, output and error output."""
    if engine == "runc":
        done = runc(tmp_path, "exec", cid, *argv)
        return (done.returncode, done.stdout, done.stderr)
    result = capsa("exec", cid, *argv)
    return (result.code, result.stdout, result.stderr)


def host_umount(*args: str) -> Seen:
    done = subprocess.run(["umount", *args], capture_output=True, text=True)
    return (done.returncode, done.stdout, done.stderr)


def unmount_all(target: Path) -> None:
    """Whatever a failed case left mounted on ``target``, lazily undone (a busy mount cannot be otherwise)."""
    for _ in range(8):
        if not os.path.ismount(target):
            return
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_host_mounts_reach_an_rslave_bind_at_the_first_look_as_under_runc(capsa: Capsa, tmp_path: Path) -> None:
    """Kubernetes' HostToContainer: a host mount made under the bind's source after start, then read by exec."""
    tag = secrets.token_hex(3)
    with shared_volume(tmp_path / "volume") as volume:
        source = volume / "slave"
        source.mkdir()
        rslave_bundle(capsa, source)
        seen: dict[str, Seen] = {}
        for engine, cid in (("runc", "rs-runc-" + tag), ("capsa", "rs-capsa-" + tag)):
            # A directory of each engine's own: the mount is made after its start.
            (source / engine).mkdir()
            try:
                with detached(engine, capsa, tmp_path, cid):
                    # Looked at (and cached by the guest) while still empty.
                    before = exec_as(engine, capsa, tmp_path, cid, "ls", "-a", f"/slave/{engine}")
                    assert before[1] == ".\n..\n", (engine, before)
                    host_mount("-t", "tmpfs", "tmpfs", str(source / engine))
                    (source / engine / "f").write_text(f"host mount for {engine}\n")
                    seen[engine] = exec_as(engine, capsa, tmp_path, cid, "cat", f"/slave/{engine}/f")
            finally:
                # Once the container is gone: under capsa, the volume share's virtiofsd holds
                # the looked-up directory open, and the host's plain umount is refused while it
                # runs (the next test). What stays mounted after a failure, shared_volume() unmounts.
                host_umount(str(source / engine))
    assert seen == {
        "runc": (0, "host mount for runc\n", ""),
        "capsa": (0, "host mount for capsa\n", ""),
    }


def test_a_host_umount_under_an_rslave_bind_is_busy_under_capsa_and_lazy_umount_works(
    capsa: Capsa, tmp_path: Path
) -> None:
    """The host unmounts what the container saw, while the container runs (docs/vm-differences.md).

    Under runc a plain ``umount`` succeeds.  Under capsa it is refused, ``target
    is busy.``, while the container runs: the volume share's virtiofsd,
    in a mount namespace of its own (a slave copy of the host's), holds an
    ``O_PATH`` handle on every directory the guest looked up.  ``umount -l``
    succeeds, and then the container sees what it sees under runc: the
    source's directory again, without the mount's file; it goes on answering
    exec, and a later host mount reaches it as the first one did.
    """
    tag = secrets.token_hex(3)
    with shared_volume(tmp_path / "volume") as volume:
        source = volume / "slave"
        source.mkdir()
        rslave_bundle(capsa, source)
        seen: dict[str, dict[str, Seen]] = {}
        for engine, cid in (("runc", "ru-runc-" + tag), ("capsa", "ru-capsa-" + tag)):
            target = source / engine
            target.mkdir()
            steps: dict[str, Seen] = seen.setdefault(engine, {})
            try:
                with detached(engine, capsa, tmp_path, cid):
                    host_mount("-t", "tmpfs", "tmpfs", str(target))
                    (target / "f").write_text(f"host mount for {engine}\n")
                    steps["cat"] = exec_as(engine, capsa, tmp_path, cid, "cat", f"/slave/{engine}/f")
                    steps["umount"] = host_umount(str(target))
                    if engine == "capsa":
                        steps["umount -l"] = host_umount("-l", str(target))
                    steps["mounted"] = (int(os.path.ismount(target)), "", "")
                    steps["ls after"] = exec_as(engine, capsa, tmp_path, cid, "ls", "-a", f"/slave/{engine}")
                    steps["cat after"] = exec_as(engine, capsa, tmp_path, cid, "cat", f"/slave/{engine}/f")
                    # A new mount on the same directory reaches the container as the first did.
                    host_mount("-t", "tmpfs", "tmpfs", str(target))
                    (target / "g").write_text(f"second mount for {engine}\n")
                    steps["cat again"] = exec_as(engine, capsa, tmp_path, cid, "cat", f"/slave/{engine}/g")
                    steps["umount again"] = host_umount(str(target))
                    if engine == "capsa":
                        steps["umount -l again"] = host_umount("-l", str(target))
                # Deleted: the fixture checks that no process, mount or file of capsa's is left behind.
            finally:
                unmount_all(target)

    def missing(engine: str) -> Seen:
        return (1, "", f"cat: can't open '/slave/{engine}/f': No such file or directory\n")

    assert seen["runc"] == {
        "cat": (0, "host mount for runc\n", ""),
        "umount": (0, "", ""),
        "mounted": (0, "", ""),
        "ls after": (0, ".\n..\n", ""),
        "cat after": missing("runc"),
        "cat again": (0, "second mount for runc\n", ""),
        "umount again": (0, "", ""),
    }
    assert seen["capsa"] == {
        "cat": (0, "host mount for capsa\n", ""),
        "umount": (32, "", f"umount: {source / 'capsa'}: target is busy.\n"),
        "umount -l": (0, "", ""),
        "mounted": (0, "", ""),
        "ls after": (0, ".\n..\n", ""),
        "cat after": missing("capsa"),
        "cat again": (0, "second mount for capsa\n", ""),
        "umount again": (32, "", f"umount: {source / 'capsa'}: target is busy.\n"),
        "umount -l again": (0, "", ""),
    }


def test_rshared_is_run_by_runc_and_refused_by_capsa_with_one_line(capsa: Capsa, tmp_path: Path) -> None:
    """Kubernetes' Bidirectional: runc runs it; a mount in the VM cannot reach the host, so capsa says so."""
    tag = secrets.token_hex(3)
    with shared_volume(tmp_path / "volume") as volume:
        capsa.spec(["echo", "ran"])

        def rshared_bind(spec: dict[str, Any]) -> None:
            spec["linux"]["rootfsPropagation"] = "shared"  # as Docker writes it beside an rshared bind
            spec["mounts"].append(
                {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rshared"]}
            )

        edit_spec(capsa, rshared_bind)
        by_runc = runc_run(capsa, tmp_path, "sh-runc-" + tag)
        cid = "sh-capsa-" + tag
        by_capsa = capsa("create", "--bundle", str(capsa.bundle), cid)

    assert (by_runc.returncode, by_runc.stdout) == (0, "ran\n"), by_runc.stderr
    assert by_capsa.code != 0
    assert by_capsa.stderr.splitlines() == [
        "capsa: mount propagation rshared of /vol cannot cross the VM boundary: mounts made in the VM never "
        "reach the host (rslave, HostToContainer, does: host mounts reach the container)"
    ]
    # Refused before anything started: no state, no sockets, no VM.
    assert not (capsa.root / cid).exists()
    assert leftovers(capsa.root) == [] and socket_dirs(capsa.root) == set()
    # QEMU's -name is capsa-<sandbox id>, the container's ID for a runc-CLI container.
    assert [pid for pid in filter(str.isdigit, os.listdir("/proc")) if f"capsa-{cid}," in cmdline(int(pid))] == []
