"""QEMU's command line as data: what each VM description turns into."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from capsa.errors import HypervisorError
from capsa.hypervisor.base import HOTPLUG_SLOTS, NinePShare, SerialChannel, VirtioFsShare, VMConfig, VsockChannel
from capsa.hypervisor.qemu import dimm_mib, escape_option, ospm_outcome, pmem_size, qemu_argv

RUN = Path("/run/capsa/c1")
MiB = 1 << 20


def config(**overrides: Any) -> VMConfig:
    fields: dict[str, Any] = {
        "name": "c1",
        "run_dir": RUN,
        "hypervisor_path": Path("/usr/bin/qemu-system-x86_64"),
        "kernel": Path("/var/lib/capsa/guest/vmlinux"),
        "initrd": Path("/var/lib/capsa/guest/initrd.img"),
        "accelerator": "tcg",
        "agent_channel": SerialChannel(RUN / "agent.sock"),
        "memory_mib": 1024,
        "kernel_params": ("quiet", "capsa.channel=serial"),
    }
    fields.update(overrides)
    return VMConfig(**fields)


def argv(cfg: VMConfig, **kwargs: Any) -> list[str]:
    return qemu_argv(cfg, qmp_fd=7, **kwargs)


def values(args: list[str], option: str) -> list[str]:
    """Every value given to ``option``, in order."""
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]


def devices(args: list[str]) -> list[str]:
    return [d.split(",")[0] for d in values(args, "-device")]


def test_no_default_hardware_and_guest_exit_ends_qemu() -> None:
    args = argv(config())
    assert args[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in args
    assert values(args, "-display") == ["none"]
    assert values(args, "-name") == ["capsa-c1,debug-threads=on"]


def test_qemu_runs_under_its_seccomp_sandbox() -> None:
    (policy,) = values(argv(config()), "-sandbox")
    assert policy.startswith("on,")
    for rule in ("spawn=deny", "elevateprivileges=deny", "obsolete=deny", "resourcecontrol=deny"):
        assert rule in policy.split(",")


def test_q35_uses_pci_devices() -> None:
    args = argv(config(shares=(VirtioFsShare("rootfs", RUN / "vfs.sock"),)))
    assert values(args, "-machine") == ["q35,sata=off,smbus=off,vmport=off,memory-backend=mem"]
    assert devices(args) == [
        "virtio-rng-pci",
        "virtio-serial-pci",
        "virtconsole",
        "virtserialport",
        "vhost-user-fs-pci",
        *["pcie-root-port"] * HOTPLUG_SLOTS,  # free for disks and NICs plugged after boot
    ]


def test_microvm_uses_mmio_devices_and_no_option_roms() -> None:
    args = argv(config(machine_type="microvm", agent_channel=VsockChannel(guest_cid=7)))
    assert values(args, "-machine") == ["microvm,x-option-roms=off,isa-serial=off"]
    assert devices(args) == ["virtio-rng-device", "virtio-serial-device", "virtconsole", "vhost-vsock-device"]


def test_tcg_and_kvm_flags() -> None:
    tcg = argv(config())
    assert values(tcg, "-accel") == ["tcg,thread=single"]
    assert values(tcg, "-cpu") == ["max"]
    mttcg = argv(config(vcpus=2, max_vcpus=2))
    assert values(mttcg, "-accel") == ["tcg,thread=multi"]
    assert values(mttcg, "-smp") == ["2,maxcpus=2"]
    kvm = argv(config(accelerator="kvm"))
    assert values(kvm, "-accel") == ["kvm"]
    assert values(kvm, "-cpu") == ["host"]


def test_kernel_initrd_and_params_with_console() -> None:
    args = argv(config())
    assert values(args, "-kernel") == ["/var/lib/capsa/guest/vmlinux"]
    assert values(args, "-initrd") == ["/var/lib/capsa/guest/initrd.img"]
    # The driver adds only what its hardware needs: the console it created.
    assert values(args, "-append") == ["console=hvc0 quiet capsa.channel=serial"]
    assert values(args, "-chardev")[0] == "file,id=console,path=/run/capsa/c1/console.log"
    assert "virtconsole,bus=vserial0.0,chardev=console" in values(args, "-device")
    assert "-serial" not in args


def test_debug_console_is_the_serial_port() -> None:
    args = argv(config(debug=True))
    assert values(args, "-serial") == ["chardev:console"]
    assert values(args, "-append")[0].startswith("console=ttyS0 ")
    assert "virtconsole" not in devices(args)
    microvm = argv(config(debug=True, machine_type="microvm"))
    assert values(microvm, "-machine") == ["microvm,x-option-roms=off,isa-serial=on"]


def test_firmware() -> None:
    assert "-bios" not in argv(config())
    assert values(argv(config(firmware=Path("/usr/share/qemu/qboot.rom"))), "-bios") == ["/usr/share/qemu/qboot.rom"]


def test_rng_from_urandom() -> None:
    args = argv(config())
    assert values(args, "-object") == ["rng-random,id=rng0,filename=/dev/urandom"]
    assert "virtio-rng-pci,rng=rng0" in values(args, "-device")


def test_serial_agent_channel() -> None:
    args = argv(config())
    assert "socket,id=agent,path=/run/capsa/c1/agent.sock,server=on,wait=off" in values(args, "-chardev")
    assert "virtserialport,bus=vserial0.0,chardev=agent,name=capsa.agent" in values(args, "-device")
    assert "vhost-vsock-pci" not in devices(args)


def test_vsock_agent_channel() -> None:
    args = argv(config(agent_channel=VsockChannel(guest_cid=1234)))
    assert "vhost-vsock-pci,id=vsock0,guest-cid=1234" in values(args, "-device")
    assert "virtserialport" not in devices(args)
    assert not any(c.startswith("socket,id=agent") for c in values(args, "-chardev"))


def test_qmp_on_the_inherited_socket() -> None:
    args = argv(config())
    assert "socket,id=qmp,fd=7" in values(args, "-chardev")
    assert values(args, "-mon") == ["chardev=qmp,mode=control"]


def test_virtiofs_needs_shared_guest_memory() -> None:
    args = argv(config(shares=(VirtioFsShare("rootfs", RUN / "vfs.sock"),)))
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in values(args, "-object")
    assert values(args, "-machine")[0].endswith(",memory-backend=mem")
    assert values(args, "-m") == ["1024M"]
    assert "socket,id=vfs0,path=/run/capsa/c1/vfs.sock" in values(args, "-chardev")
    assert "vhost-user-fs-pci,chardev=vfs0,tag=rootfs,queue-size=1024" in values(args, "-device")


def test_9p_needs_no_shared_memory() -> None:
    args = argv(config(shares=(NinePShare("rootfs", Path("/srv/rootfs")), NinePShare("vol", Path("/srv/v"), True))))
    assert values(args, "-fsdev") == [
        "local,id=fs0,path=/srv/rootfs,security_model=none,multidevs=remap",
        "local,id=fs1,path=/srv/v,security_model=none,multidevs=remap,readonly=on",
    ]
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs" in values(args, "-device")
    assert "virtio-9p-pci,fsdev=fs1,mount_tag=vol" in values(args, "-device")
    assert not any(o.startswith("memory-backend") for o in values(args, "-object"))


def test_rootfs_image_is_a_shared_readonly_virtio_pmem() -> None:
    image = Path("/var/lib/capsa/guest/rootfs.img")
    args = argv(config(initrd=None, rootfs_image=image), rootfs_image_bytes=128 * MiB)
    assert values(args, "-machine") == ["q35,sata=off,smbus=off,vmport=off"]
    assert values(args, "-m") == ["1024M,slots=1,maxmem=1152M"]
    # Shared: one copy in the host's page cache for every VM, and left out of
    # a template's state; read-only: no guest changes it.
    assert f"memory-backend-file,id=rootimg,mem-path={image},size={128 * MiB},share=on,readonly=on" in values(
        args, "-object"
    )
    assert "virtio-pmem-pci,id=rootpmem,memdev=rootimg" in values(args, "-device")
    assert "-initrd" not in args


def test_rootfs_image_needs_q35_and_an_aligned_size() -> None:
    image = Path("/img")
    with pytest.raises(HypervisorError, match="microvm"):
        argv(config(initrd=None, rootfs_image=image, machine_type="microvm"), rootfs_image_bytes=128 * MiB)
    # Whole memory blocks, so DIMMs plugged after the image stay block-aligned.
    with pytest.raises(HypervisorError, match="128 MiB"):
        argv(config(initrd=None, rootfs_image=image), rootfs_image_bytes=64 * MiB)
    with pytest.raises(HypervisorError, match="size"):
        argv(config(initrd=None, rootfs_image=image))
    assert pmem_size(1) == 128 * MiB
    assert pmem_size(128 * MiB) == 128 * MiB
    assert pmem_size(128 * MiB + 1) == 256 * MiB


def test_commas_in_values_are_doubled() -> None:
    assert escape_option("/a,b") == "/a,,b"
    args = argv(config(name="x,y", run_dir=Path("/r,1"), agent_channel=SerialChannel(Path("/r,1/agent.sock"))))
    assert values(args, "-name") == ["capsa-x,,y,debug-threads=on"]
    assert "socket,id=agent,path=/r,,1/agent.sock,server=on,wait=off" in values(args, "-chardev")


def test_extra_args_come_last() -> None:
    args = argv(config(extra_args=("-device", "pvpanic")))
    assert args[-2:] == ["-device", "pvpanic"]


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"accelerator": "auto"}, "accelerator"),
        ({"machine_type": "pc"}, "machine type"),
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 4, "max_vcpus": 2}, "vcpus"),
        ({"memory_mib": 16}, "memory"),
        ({"rootfs_image": Path("/img")}, "not both"),
        ({"shares": (NinePShare("", Path("/a")),)}, "tag"),
        ({"shares": (NinePShare("t" * 37, Path("/a")),)}, "tag"),
        ({"shares": (NinePShare("t", Path("/a")), VirtioFsShare("t", Path("/s")))}, "unique"),
        ({"max_memory_mib": 512}, "max_memory"),
        ({"max_memory_mib": 2048, "machine_type": "microvm", "agent_channel": VsockChannel(guest_cid=7)}, "q35"),
    ],
)
def test_config_rejects_nonsense(overrides: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HypervisorError, match=complaint):
        config(**overrides)


def test_vsock_cid_range() -> None:
    with pytest.raises(HypervisorError, match="CID"):
        VsockChannel(guest_cid=2)
    with pytest.raises(HypervisorError, match="CID"):
        VsockChannel(guest_cid=0xFFFFFFFF)


def test_cpu_hotplug_room_is_maxcpus() -> None:
    args = argv(config(vcpus=1, max_vcpus=4))
    assert values(args, "-smp") == ["1,maxcpus=4"]
    # Hot-plugged vCPUs get host threads of their own only with MTTCG.
    assert values(args, "-accel") == ["tcg,thread=multi"]


def test_memory_hotplug_room_is_dimm_slots_and_maxmem() -> None:
    args = argv(config(memory_mib=1024, max_memory_mib=4096))
    assert values(args, "-m") == ["1024M,slots=6,maxmem=4096M"]
    # No hot-plug room when the maximum is the boot size.
    assert values(argv(config(memory_mib=1024, max_memory_mib=1024)), "-m") == ["1024M"]
    assert values(argv(config(memory_mib=1024)), "-m") == ["1024M"]


def test_memory_hotplug_and_a_rootfs_pmem_share_the_device_memory() -> None:
    args = argv(config(rootfs_image=Path("/img"), initrd=None, max_memory_mib=2048), rootfs_image_bytes=128 * MiB)
    assert values(args, "-m") == ["1024M,slots=7,maxmem=2176M"]


def test_hotplug_room_is_in_the_template_argv() -> None:
    # The template key hashes the argv: a template made for other maxima is not restored.
    templated = config(templated=True, memory_file=Path("/t/memory"), max_vcpus=2, max_memory_mib=4096)
    args = argv(templated)
    assert values(args, "-smp") == ["1,maxcpus=2"]
    assert values(args, "-m") == ["1024M,slots=6,maxmem=4096M"]
    assert "memory-backend-file,id=mem,size=1024M,mem-path=/t/memory,share=on" in values(args, "-object")


@pytest.mark.parametrize(
    ("wanted", "room", "size"),
    [
        (1, 3072, 128),  # whole memory blocks
        (128, 3072, 128),
        (129, 3072, 256),
        (3000, 3000, 2944),  # the last block that fits
    ],
)
def test_dimm_sizes_are_whole_memory_blocks(wanted: int, room: int, size: int) -> None:
    assert dimm_mib(wanted, room) == size


def test_no_dimm_when_not_one_block_fits_or_no_slot_is_free() -> None:
    with pytest.raises(HypervisorError, match="128 MiB blocks"):
        dimm_mib(100, 127)
    with pytest.raises(HypervisorError, match="memory slots are in use"):
        dimm_mib(128, 1024, free_slots=0)


def test_the_last_free_slot_takes_all_the_room_left() -> None:
    assert dimm_mib(100, 2000, free_slots=2) == 128
    assert dimm_mib(100, 2000, free_slots=1) == 1920


def test_ospm_status_says_when_the_guest_took_a_device() -> None:
    infos = [
        {"device": "dimm0", "slot": "0", "slot-type": "DIMM", "source": 1, "status": 0},
        {"device": "dimm1", "slot": "1", "slot-type": "DIMM", "source": 0, "status": 0},  # no _OST yet
        {"slot": "2", "slot-type": "DIMM", "source": 0, "status": 0},  # empty slot
        {"device": "cpu-0-1-0", "slot": "1", "slot-type": "CPU", "source": 1, "status": 0x80},  # in progress
        {"device": "cpu-0-2-0", "slot": "2", "slot-type": "CPU", "source": 1, "status": 0x81},  # failed
    ]
    done, failed = ospm_outcome(infos, {"dimm0", "dimm1", "cpu-0-1-0", "cpu-0-2-0"})
    assert done == {"dimm0"}
    assert failed == ["cpu-0-2-0 (_OST status 0x81)"]
    assert ospm_outcome(infos, {"dimm1"}) == (set(), [])


def test_templated_vms_carry_a_generation_id_drawn_at_each_start() -> None:
    templated = argv(config(templated=True, memory_file=Path("/dev/shm/m")))
    assert "vmgenid,guid=auto" in values(templated, "-device")
    # The same words every time: a template's key and its clones' argv agree.
    assert templated == argv(config(templated=True, memory_file=Path("/dev/shm/m")))
    assert not any(d.startswith("vmgenid") for d in values(argv(config()), "-device"))


def test_free_page_reporting_is_a_balloon_that_only_takes_reports() -> None:
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in values(
        argv(config(free_page_reporting=True)), "-device"
    )
    assert not any("balloon" in d for d in values(argv(config()), "-device"))
    # Part of the template's hardware, so of its key.
    templated = config(templated=True, memory_file=Path("/t/memory"), free_page_reporting=True)
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in values(argv(templated), "-device")
