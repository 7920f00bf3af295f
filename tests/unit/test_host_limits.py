"""runtime/hostcgroup.py's limits: what a VM's host cgroup gets (pure), and the files written
in a fake cgroup tree under tmp_path (this host's hybrid layout, and cgroup2 alone)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from capsa.config import Config, HypervisorConfig
from capsa.errors import InvalidArgument
from capsa.runtime import hostcgroup, lifecycle
from capsa.runtime.hostcgroup import (
    HOST_PIDS_MAX,
    HostCgroup,
    HostLimits,
    cpu_weight,
    create,
    host_limits,
    limit_files,
    parse_mountinfo,
    vmm_overhead_mib,
)
from capsa.runtime.resources import VMSize

MiB = 1 << 20

# -- what the limits are ---------------------------------------------------------------------------


def test_without_resources_the_limits_follow_the_vm() -> None:
    assert host_limits({}, 2, 1024, 384) == HostLimits(
        memory_bytes=(1024 + 384) * MiB,
        pids=HOST_PIDS_MAX,
        cpu_period_us=100_000,  # the kernel's default period
        cpu_quota_us=300_000,  # two vCPUs and one for emulation, I/O and the helpers
    )
    assert host_limits(None, 1, 256, 128).memory_bytes == 384 * MiB


def test_the_spec_gives_period_weight_and_cpuset_but_not_the_quota() -> None:
    resources = {
        "memory": {"limit": 512 * MiB},  # the VM's size says it: 1024 + 512
        "cpu": {"shares": 512, "quota": 50_000, "period": 50_000, "cpus": "0-1", "mems": "0"},
        "pids": {"limit": 10},  # the container's processes, in the guest
    }
    limits = host_limits(resources, 2, 1536, 384)
    assert limits == HostLimits(
        memory_bytes=(1536 + 384) * MiB,
        pids=HOST_PIDS_MAX,
        cpu_period_us=50_000,
        cpu_quota_us=150_000,
        cpu_shares=512,
        cpuset_cpus="0-1",
        cpuset_mems="0",
    )
    assert limits.cpu_weight == 20


def test_unset_values_are_left_alone() -> None:
    limits = host_limits({"cpu": {"shares": 0, "period": 0, "cpus": "", "mems": None}}, 1, 1024, 128)
    assert limits.cpu_shares is None and limits.cpu_weight is None
    assert limits.cpu_period_us == 100_000
    assert limits.cpuset_cpus is None and limits.cpuset_mems is None


@pytest.mark.parametrize(
    ("shares", "weight"),
    # runc's ConvertCPUSharesToCgroupV2Value; out of v1's range clamped first.
    [(2, 1), (1024, 39), (512, 20), (262144, 10000), (1, 1), (1 << 20, 10000)],
)
def test_cpu_weight_as_runc_converts_shares(shares: int, weight: int) -> None:
    assert cpu_weight(shares) == weight


def test_overhead_of_the_vm_processes() -> None:
    assert vmm_overhead_mib("kvm", exec_helpers=False) == 128
    assert vmm_overhead_mib("kvm", exec_helpers=True) == 128 + 256
    # TCG's translated code: QEMU's 1 GiB buffer and its metadata.
    assert vmm_overhead_mib("tcg", exec_helpers=True) == 128 + 256 + 1152


def test_files_of_v1_and_v2() -> None:
    limits = host_limits({"cpu": {"shares": 1024, "cpus": "1", "mems": "0"}}, 1, 1024, 128)
    memory = str(1152 * MiB)
    v1 = [limit_files(limits, 1, frozenset({c})) for c in ("memory", "pids", "cpu", "cpuset", "blkio")]
    assert v1 == [
        [("memory", "memory.limit_in_bytes", memory)],
        [("pids", "pids.max", "1024")],
        [("cpu", "cpu.shares", "1024"), ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "200000")],
        [("cpuset", "cpuset.cpus", "1"), ("cpuset", "cpuset.mems", "0")],
        [],
    ]
    assert limit_files(limits, 2, frozenset({"cpuset", "cpu", "io", "memory", "pids"})) == [
        ("memory", "memory.max", memory),
        ("pids", "pids.max", "1024"),
        ("cpu", "cpu.weight", "39"),
        ("cpu", "cpu.max", "200000 100000"),
        ("cpuset", "cpuset.cpus", "1"),
        ("cpuset", "cpuset.mems", "0"),
    ]
    # cgroup2 on a hybrid host has no controllers: nothing to write there.
    assert limit_files(limits, 2, frozenset()) == []


# -- writing them ----------------------------------------------------------------------------------

V1_FILES = {
    "memory": ("memory.limit_in_bytes",),
    "pids": ("pids.max",),
    "cpu": ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"),
    "cpuset": ("cpuset.cpus", "cpuset.mems"),
}
V2_FILES = ("memory.max", "pids.max", "cpu.weight", "cpu.max", "cpuset.cpus", "cpuset.mems")


def hybrid_host(tmp_path: Path) -> tuple[hostcgroup.Hierarchies, Path]:
    """This host's layout: v1 memory, pids, cpu, cpuset and a controller-less cgroup2."""
    root = tmp_path / "cg"
    lines = []
    for number, name in enumerate((*V1_FILES, "unified")):
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
        kind = "cgroup2 cgroup2 rw" if name == "unified" else f"cgroup cgroup rw,{name}"
        lines.append(f"{40 + number} 31 0:{30 + number} / {root}/{name} rw - {kind}\n")
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    return parse_mountinfo("".join(lines)), root


def kernel_files(directory: Path, names: tuple[str, ...]) -> None:
    """What the kernel shows in a new cgroup's directory (a plain mkdir here shows nothing)."""
    for name in names:
        if not (directory / name).exists():
            (directory / name).write_text("")


def made_on_hybrid(tmp_path: Path) -> tuple[HostCgroup, hostcgroup.Hierarchies, Path]:
    hierarchies, root = hybrid_host(tmp_path)
    made = create("/machine/c1", hierarchies, {})
    for name, files in V1_FILES.items():
        kernel_files(root / name / "machine/c1", files)
    return made, hierarchies, root


def test_hybrid_host_gets_each_limit_in_its_v1_hierarchy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    made, hierarchies, root = made_on_hybrid(tmp_path)
    resources = {"cpu": {"shares": 512, "cpus": "1", "mems": "0"}, "devices": [{"allow": False, "access": "rwm"}]}
    made.limit(resources, 1, 1024, 384, hierarchies)
    leaf = "machine/c1"
    assert (root / "memory" / leaf / "memory.limit_in_bytes").read_text() == str(1408 * MiB)
    assert (root / "pids" / leaf / "pids.max").read_text() == "1024"
    assert (root / "cpu" / leaf / "cpu.shares").read_text() == "512"
    assert (root / "cpu" / leaf / "cpu.cfs_period_us").read_text() == "100000"
    assert (root / "cpu" / leaf / "cpu.cfs_quota_us").read_text() == "200000"
    assert (root / "cpuset" / leaf / "cpuset.cpus").read_text() == "1"
    assert (root / "cpuset" / leaf / "cpuset.mems").read_text() == "0"
    assert sorted(p.name for p in (root / "unified" / leaf).iterdir()) == []  # nothing made up there
    assert caplog.records == []
    # Recorded, for update.
    assert (made.resources, made.vcpus, made.memory_mib, made.overhead_mib) == (
        {"cpu": {"shares": 512, "cpus": "1", "mems": "0"}},
        1,
        1024,
        384,
    )
    assert HostCgroup.from_dict(made.to_dict()) == made


def test_update_lays_resources_over_and_never_shrinks(tmp_path: Path) -> None:
    made, hierarchies, root = made_on_hybrid(tmp_path)
    made.limit({"cpu": {"shares": 512, "period": 50_000}}, 2, 2048, 384, hierarchies)
    # `update --memory 512m` asks for a VM of 1536 MiB; it is 2048 already.
    limits = made.grow({"memory": {"limit": 512 * MiB}, "cpu": {"shares": 256}}, 1, 1536, 9999, hierarchies)
    assert limits.memory_bytes == (2048 + 384) * MiB  # the recorded overhead, not the fallback
    assert limits.cpu_quota_us == 3 * 50_000  # the spec's period kept
    assert (root / "cpu/machine/c1/cpu.shares").read_text() == "256"
    # Recorded: what the limits follow of the resources (the memory limit is in the VM's size).
    assert made.resources == {"cpu": {"shares": 256, "period": 50_000}}
    made.grow({}, 3, 4096, 384, hierarchies)
    assert (root / "memory/machine/c1/memory.limit_in_bytes").read_text() == str((4096 + 384) * MiB)
    assert (root / "cpu/machine/c1/cpu.cfs_quota_us").read_text() == "200000"


def test_a_refused_write_is_retried_after_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """runc writes the period again after the quota: a shorter period may not fit the old quota."""
    made, hierarchies, root = made_on_hybrid(tmp_path)
    real_write = hostcgroup._write
    refused: list[str] = []

    def write(path: str, value: str) -> None:
        if path.endswith("cpu.cfs_period_us") and not refused:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write(path, value)

    monkeypatch.setattr(hostcgroup, "_write", write)
    assert hostcgroup.write_limits(made, host_limits({"cpu": {"period": 10_000}}, 1, 1024, 128), hierarchies) == []
    assert refused and (root / "cpu/machine/c1/cpu.cfs_period_us").read_text() == "10000"


def test_a_v1_quota_above_an_ancestors_is_no_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 refuses a child's quota above its parent's (EINVAL); the parent's then bounds the VM."""
    made, hierarchies, root = made_on_hybrid(tmp_path)
    real_write = hostcgroup._write

    def write(path: str, value: str) -> None:
        if path.endswith("cpu.cfs_quota_us"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write(path, value)

    monkeypatch.setattr(hostcgroup, "_write", write)
    assert hostcgroup.write_limits(made, host_limits({}, 1, 1024, 128), hierarchies) == []
    assert (root / "memory/machine/c1/memory.limit_in_bytes").read_text() == str(1152 * MiB)


def test_what_cannot_be_written_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    made, hierarchies, root = made_on_hybrid(tmp_path)
    (root / "pids/machine/c1/pids.max").unlink()  # a kernel without it: not made up
    (root / "cpuset/machine/c1/cpuset.cpus").unlink()
    (root / "cpuset/machine/c1/cpuset.cpus").mkdir()  # refuses every write
    with caplog.at_level(logging.WARNING, logger=hostcgroup.log.name):
        made.limit({"cpu": {"cpus": "7"}}, 1, 1024, 128, hierarchies)
    assert not (root / "pids/machine/c1/pids.max").exists()
    assert (root / "memory/machine/c1/memory.limit_in_bytes").read_text() == str(1152 * MiB)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "limits not applied" in warning and "pids.max" in warning and "cpuset.cpus = 7" in warning


def test_unified_host_writes_v2_files_where_the_controllers_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    hierarchies = parse_mountinfo(f"35 24 0:30 / {root} rw - cgroup2 cgroup2 rw\n")
    made = create("/kubepods/pod1/sandbox", hierarchies, {})
    leaf = root / "kubepods/pod1/sandbox"
    (leaf / "cgroup.controllers").write_text("cpu io memory pids\n")  # no cpuset enabled above
    kernel_files(leaf, V2_FILES[:4])
    with caplog.at_level(logging.WARNING, logger=hostcgroup.log.name):
        made.limit({"cpu": {"shares": 2, "cpus": "0"}}, 2, 2048, 128, hierarchies)
    assert (leaf / "memory.max").read_text() == str(2176 * MiB)
    assert (leaf / "pids.max").read_text() == "1024"
    assert (leaf / "cpu.weight").read_text() == "1"
    assert (leaf / "cpu.max").read_text() == "300000 100000"
    assert not (leaf / "cpuset.cpus").exists()
    assert "no cpuset controller" in caplog.text


# -- the VM's size at create (runtime/lifecycle.py) ------------------------------------------------


def test_create_grows_the_vm_for_the_spec_unless_it_cannot_hot_plug() -> None:
    config = Config(hypervisor=HypervisorConfig(default_memory_mib=1024, max_memory_mib=4096))
    resources = {"memory": {"limit": 512 * MiB}}
    assert lifecycle.create_size(config, resources) == VMSize(1, 1536)
    assert lifecycle.create_size(config, {}) == lifecycle.base_size(config) == VMSize(1, 1024)
    microvm = Config(hypervisor=HypervisorConfig(machine_type="microvm"))
    assert lifecycle.create_size(microvm, resources) == VMSize(1, 1024)


def test_a_malformed_spec_resource_names_the_spec_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^linux\.resources: cpu\.shares must be an integer"):
        lifecycle.spec_resources({"linux": {"resources": {"cpu": {"shares": "lots"}}}})
    assert lifecycle.spec_resources({"linux": {}}) == {}
