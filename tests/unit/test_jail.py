"""The VMM's jail as data: what it may see, who it runs as, what it may use."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from capsa.hypervisor.base import SerialChannel, VirtioFsShare, VMConfig, VsockChannel
from capsa.hypervisor.jail import BASE_DEVICES, KVM_DEVICE, JailBind, jail_plan, jail_root, owned_paths

RUN = Path("/run/capsa-vm/0123456789abcdef01234567/vm")
STATE = Path("/run/docker/runtime-runc/moby/" + "a" * 64)


def vm(**overrides: Any) -> VMConfig:
    fields: dict[str, Any] = {
        "name": "c1",
        "run_dir": RUN,
        "log_dir": STATE,
        "hypervisor_path": Path("/usr/bin/qemu-system-x86_64"),
        "kernel": Path("/var/lib/capsa/guest/vmlinux"),
        "initrd": Path("/var/lib/capsa/guest/initrd.img"),
        "accelerator": "tcg",
        "agent_channel": SerialChannel(RUN / "agent.sock"),
        "shares": (VirtioFsShare("rootfs", RUN / "vfs.sock"),),
    }
    fields.update(overrides)
    return VMConfig(**fields)


def plan(config: VMConfig, **overrides: Any) -> Any:
    args: dict[str, Any] = {"root": jail_root(config), "uid": 2_130_000_007, "gid": 2_130_000_007, "kvm_gid": 108}
    args.update(overrides)
    return jail_plan(config, **args)


def test_the_jail_holds_only_what_qemu_opens() -> None:
    binds = {bind.path: bind.writable for bind in plan(vm()).binds}
    assert binds == {
        Path("/usr"): False,
        **{device: True for device in BASE_DEVICES},
        Path("/var/lib/capsa/guest/vmlinux"): False,
        Path("/var/lib/capsa/guest/initrd.img"): False,
        RUN: True,
    }
    # Nothing of the host's configuration, processes or users' files.
    for secret in ("/etc", "/proc", "/sys", "/home", "/root", "/run", str(STATE)):
        assert Path(secret) not in binds


def test_its_root_is_beside_its_sockets_not_among_them() -> None:
    assert jail_root(vm()) == RUN.with_name("vm.jail")
    assert plan(vm()).root == RUN.with_name("vm.jail")


def test_a_clone_gets_its_ram_file_and_kvm_its_device_and_group() -> None:
    memory = Path("/dev/shm/capsa-0123456789abcdef-1a2b3c4d.mem")
    clone = vm(accelerator="kvm", templated=True, incoming=True, memory_file=memory)
    jailed = plan(clone)
    assert JailBind(memory, writable=True) in jailed.binds
    # Its own /dev/kvm node in the jail: no host group needed.
    assert jailed.devices == (KVM_DEVICE,)
    assert jailed.groups == ()
    # Unjailed, the kvm group lets it open the host's node.
    assert plan(clone, jailed=False).groups == (108,)
    # Under TCG, neither the device nor the group.
    tcg = plan(vm())
    assert tcg.devices == ()
    assert tcg.groups == ()


def test_vsock_needs_its_device() -> None:
    jailed = plan(vm(agent_channel=VsockChannel(guest_cid=7, port=1024)))
    assert jailed.devices == (Path("/dev/vhost-vsock"),)


def test_its_identity_and_limits() -> None:
    jailed = plan(vm())
    assert (jailed.uid, jailed.gid) == (2_130_000_007, 2_130_000_007)
    limits = dict(jailed.rlimits)
    assert limits[resource.RLIMIT_CORE] == 0
    # Files it writes stay below its largest RAM block (a memfd counts) plus a margin.
    assert (512 << 20) < limits[resource.RLIMIT_FSIZE] <= (512 << 20) + (256 << 20)
    grown = dict(plan(vm(max_memory_mib=4096)).rlimits)
    assert grown[resource.RLIMIT_FSIZE] > 4096 << 20
    assert 0 < limits[resource.RLIMIT_NOFILE] <= 65536


def test_what_its_uid_owns() -> None:
    memory = Path("/dev/shm/capsa-x.mem")
    assert owned_paths(vm(templated=True, memory_file=memory)) == (RUN, memory)


def test_qemu_starts_behind_its_pid_namespace_parent_when_jailed() -> None:
    parent = Path("/usr/local/libexec/capsa/capsa-vmm")
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "c1"]
    assert plan(vm(), pid_parent=parent).wrap(argv) == [str(parent), *argv]
    # Without the program, or without a jail: QEMU itself, in the host's PID namespace.
    assert plan(vm()).wrap(argv) == argv
    assert plan(vm(), pid_parent=parent, jailed=False).wrap(argv) == argv
