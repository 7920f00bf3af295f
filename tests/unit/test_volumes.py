"""Block volumes and guest tmpfs as data: the agent finding a disk by serial, QMP arguments, the host's tmpfs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from capsa.agent import storage
from capsa.agent.options import AgentOptions
from capsa.agent.sandbox import Sandbox
from capsa.config import parse_config
from capsa.errors import HypervisorError, InvalidArgument, StorageError
from capsa.hypervisor.qemu import (
    BlockDisk,
    blockdev_arguments,
    free_root_port,
    hotplug_root_ports,
    virtio_blk_arguments,
)
from capsa.protocols import agent_pb2 as pb
from capsa.proxy.proxy import Proxy
from capsa.runtime.mounts import BLOCK_DEVICE_ANNOTATION, BlockDevice, MountPlan
from capsa.storage.host import block_device, check_not_mounted, mount_types, mounted_devices, tmpfs_size


def sys_block(tmp_path: Path, disks: dict[str, str]) -> tuple[str, str]:
    """A fake /sys/block (disk -> serial) and /dev holding the disks' nodes."""
    sys_dir, dev_dir = tmp_path / "sys", tmp_path / "dev"
    dev_dir.mkdir()
    for disk, serial in disks.items():
        (sys_dir / disk).mkdir(parents=True)
        (sys_dir / disk / "serial").write_text(serial + "\n")
        (dev_dir / disk).touch()
    (sys_dir / "loop0").mkdir(parents=True)  # no serial file: not a virtio disk
    return str(sys_dir), str(dev_dir)


def test_a_disk_is_found_by_its_serial_not_its_name(tmp_path: Path) -> None:
    sys_dir, dev_dir = sys_block(tmp_path, {"vda": "capsa-one", "vdb": "capsa-two"})
    assert storage.find_block_device("capsa-two", sys_dir, dev_dir) == f"{dev_dir}/vdb"
    assert storage.find_block_device("capsa-three", sys_dir, dev_dir) is None
    assert storage.find_block_device("x", str(tmp_path / "none"), dev_dir) is None


def test_waiting_for_a_disk_that_arrives(tmp_path: Path) -> None:
    sys_dir, dev_dir = sys_block(tmp_path, {"vda": "capsa-one"})

    async def scenario() -> str:
        async def plug() -> None:
            await asyncio.sleep(0.05)
            (Path(sys_dir) / "vdb").mkdir()
            (Path(sys_dir) / "vdb" / "serial").write_text("capsa-late")
            (Path(dev_dir) / "vdb").touch()

        plugging = asyncio.ensure_future(plug())
        found = await storage.wait_block_device("capsa-late", 5, sys_dir, dev_dir)
        await plugging
        return found

    assert asyncio.run(scenario()) == f"{dev_dir}/vdb"


def test_a_disk_that_never_comes_is_a_storage_error(tmp_path: Path) -> None:
    sys_dir, dev_dir = sys_block(tmp_path, {})
    with pytest.raises(StorageError, match="no disk with serial capsa-gone appeared"):
        asyncio.run(storage.wait_block_device("capsa-gone", 0.05, sys_dir, dev_dir))


def superblock(tmp_path: Path, offset: int, magic: bytes) -> str:
    path = tmp_path / "disk"
    data = bytearray(70000)
    data[offset : offset + len(magic)] = magic
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize(
    ("offset", "magic", "fstype"), [(1080, b"\x53\xef", "ext4"), (0, b"XFSB", "xfs"), (65600, b"_BHRfS_M", "btrfs")]
)
def test_the_filesystem_comes_from_the_superblock(tmp_path: Path, offset: int, magic: bytes, fstype: str) -> None:
    assert storage.probe_fstype(superblock(tmp_path, offset, magic)) == fstype


def test_a_disk_without_a_known_filesystem_is_named(tmp_path: Path) -> None:
    path = superblock(tmp_path, 0, b"")
    with pytest.raises(StorageError, match="holds no filesystem the guest can mount"):
        storage.probe_fstype(path)


def test_resolve_fills_in_device_and_filesystem(tmp_path: Path) -> None:
    sys_dir, dev_dir = sys_block(tmp_path, {"vdc": "capsa-x"})
    with open(os.path.join(dev_dir, "vdc"), "wb") as disk:
        disk.write(bytes(1080) + b"\x53\xef" + bytes(100))
    item = pb.Storage(driver="blk", source="capsa-x", options=["ro"], mount_point="/run/capsa/volumes/c/0")
    resolved = asyncio.run(storage.resolve(item, 1, sys_dir, dev_dir))
    assert resolved == pb.Storage(
        driver="blk", source=f"{dev_dir}/vdc", fstype="ext4", options=["ro"], mount_point="/run/capsa/volumes/c/0"
    )
    assert item.source == "capsa-x"  # the request itself is left alone
    request = storage.mount_request(resolved)
    assert (request.source, request.fstype, request.data) == (f"{dev_dir}/vdc", "ext4", "")
    assert request.flags & storage.libc.MS_RDONLY


def test_an_unresolved_serial_is_not_mounted() -> None:
    with pytest.raises(InvalidArgument, match="is a serial"):
        storage.mount_request(pb.Storage(driver="blk", source="capsa-x", fstype="ext4", mount_point="/v"))


def test_other_storages_need_no_resolving() -> None:
    item = pb.Storage(driver="local", fstype="tmpfs", mount_point="/run/capsa/shm/a", options=["size=1m"])
    assert asyncio.run(storage.resolve(item)) is item


# --- linux.devices block devices: renumbered to the guest's disk ---------------------


def device_spec() -> dict[str, Any]:
    return {
        "annotations": {BLOCK_DEVICE_ANNOTATION + "/dev/xvdc": "capsa-dev", "org.example": "kept"},
        "linux": {
            "devices": [
                {"path": "/dev/xvdc", "type": "b", "major": 8, "minor": 16, "fileMode": 432},
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
            ],
            "resources": {
                "devices": [
                    {"allow": False, "access": "rwm"},
                    {"allow": True, "type": "b", "major": 8, "minor": 16, "access": "rwm"},
                    {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
                ]
            },
        },
    }


def test_block_devices_get_the_guest_disks_numbers() -> None:
    spec = device_spec()
    assert storage.block_device_serials(spec) == {"/dev/xvdc": "capsa-dev"}
    rewritten = storage.rewrite_block_devices(spec, {"/dev/xvdc": (252, 16)})
    assert rewritten["linux"]["devices"] == [
        {"path": "/dev/xvdc", "type": "b", "major": 252, "minor": 16, "fileMode": 432},
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
    ]
    assert rewritten["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": 252, "minor": 16, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
    ]
    assert rewritten["annotations"] == {"org.example": "kept"}
    assert spec == device_spec()  # the input is left alone


def test_a_spec_without_attached_devices_is_unchanged() -> None:
    spec = {"linux": {"devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]}}
    assert storage.block_device_serials(spec) == {}
    assert asyncio.run(storage.with_guest_devices(spec)) is spec


# --- a pod's containers hold one guest tmpfs ---------------------------------------


def test_storages_at_one_mount_point_are_mounted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second holder shares the mount, the last one to let go unmounts it; a different request there fails."""
    mounted: list[str] = []
    unmounted: list[str] = []
    monkeypatch.setattr(storage, "mount", lambda request: mounted.append(request.target))
    monkeypatch.setattr(storage, "unmount", lambda target: unmounted.append(target))
    sandbox = Sandbox(AgentOptions(state_dir=str(tmp_path), guest=False), reaper=None)  # type: ignore[arg-type]
    shm = pb.Storage(driver="local", source="shm", fstype="tmpfs", options=["size=1m"], mount_point="/s/a")

    first: list[str] = []
    second: list[str] = []
    asyncio.run(sandbox._hold_storage(shm, first))
    asyncio.run(sandbox._hold_storage(shm, second))
    assert mounted == ["/s/a"] and first == second == ["/s/a"]
    other = pb.Storage(driver="local", source="shm", fstype="tmpfs", options=["size=2m"], mount_point="/s/a")
    with pytest.raises(InvalidArgument, match="already mounted with other options"):
        asyncio.run(sandbox._hold_storage(other, []))

    sandbox._release_mounts(first)
    assert unmounted == []
    sandbox._release_mounts(second)
    assert unmounted == ["/s/a"]


# --- QMP arguments --------------------------------------------------------------------


def test_a_raw_image_file_as_a_read_only_disk() -> None:
    disk = BlockDisk(Path("/srv/disk.img"), "capsa0123456789abcde", readonly=True, host_device=False)
    assert blockdev_arguments(disk) == {
        "driver": "raw",
        "node-name": "blk-capsa0123456789abcde",
        "read-only": True,
        "file": {"driver": "file", "filename": "/srv/disk.img", "read-only": True},
    }
    assert virtio_blk_arguments(disk, "hotplug2") == {
        "driver": "virtio-blk-pci",
        "id": "blk-capsa0123456789abcde-dev",
        "bus": "hotplug2",
        "drive": "blk-capsa0123456789abcde",
        "serial": "capsa0123456789abcde",
    }


def test_a_host_block_device_uses_host_device() -> None:
    disk = BlockDisk(Path("/dev/sdb"), "s", readonly=False, host_device=True)
    arguments: Any = blockdev_arguments(disk)
    assert arguments["file"]["driver"] == "host_device" and arguments["read-only"] is False


def test_a_serial_longer_than_virtio_allows_is_refused() -> None:
    with pytest.raises(HypervisorError, match="longer than 20 bytes"):
        blockdev_arguments(BlockDisk(Path("/d"), "x" * 21, readonly=False, host_device=False))


def root_port(qdev_id: str, *plugged: str) -> dict[str, Any]:
    devices = [{"qdev_id": name, "class_info": {"desc": "SCSI controller"}} for name in plugged]
    return {"qdev_id": qdev_id, "pci_bridge": {"bus": {"number": 1}, "devices": devices}}


def test_the_first_empty_hotplug_root_port_is_free() -> None:
    buses = [
        {
            "bus": 0,
            "devices": [
                {"qdev_id": "", "class_info": {"desc": "Host bridge"}},
                root_port("other-port"),
                root_port("hotplug0", "fs-plugged0"),
                root_port("hotplug1"),
                root_port("hotplug2"),
            ],
        }
    ]
    assert free_root_port(buses) == "hotplug1"
    assert free_root_port([{"bus": 0, "devices": [root_port("hotplug0", "nic0")]}]) is None
    assert hotplug_root_ports(buses) == {"hotplug0": True, "hotplug1": False, "hotplug2": False}


class PortsOnly:
    """A VM's hot-plug ports as QMP "query-pci" tells them, and the disks plugged into them."""

    def __init__(self, ports: dict[str, bool]) -> None:
        self.ports = ports
        self.plugged: list[Path] = []
        self.unplugged: list[Path] = []

    async def hotplug_root_ports(self) -> dict[str, bool]:
        return dict(self.ports)

    async def plug_block(self, disk: BlockDisk) -> None:
        port = next((name for name, used in self.ports.items() if not used), None)
        if port is None:
            raise HypervisorError("VM c has no free PCIe root port to plug a device into")
        self.ports[port] = True
        self.plugged.append(disk.path)

    async def unplug_block(self, disk: BlockDisk) -> None:
        self.unplugged.append(disk.path)


def plan_of(count: int) -> MountPlan:
    devices = tuple(BlockDevice(Path(f"/dev/loop{n}"), f"s{n}", True, f"/dev/xvd{n}") for n in range(count))
    return MountPlan(binds=(), spec={}, rootfs="c/rootfs", devices=devices)


def test_a_container_with_more_disks_than_free_ports_is_refused_with_none_attached(tmp_path: Path) -> None:
    proxy = Proxy(parse_config({}), "c", tmp_path)
    vm = PortsOnly({"hotplug0": True, "hotplug1": True, "hotplug2": False, "hotplug3": False, "hotplug4": True})
    proxy.sandbox.hypervisor = vm  # type: ignore[assignment]
    plugged: list[BlockDisk] = []
    with pytest.raises(HypervisorError) as refused:
        asyncio.run(proxy._plug_volumes(plan_of(3), plugged))
    assert str(refused.value).startswith(
        "cannot attach host device /dev/loop2 to the VM: no free PCIe hot-plug port (3 in use, 2 free for the"
        " container's 3 disks)"
    )
    assert vm.plugged == [] and plugged == []
    asyncio.run(proxy._plug_volumes(plan_of(2), plugged))
    assert vm.plugged == [Path("/dev/loop0"), Path("/dev/loop1")] == [disk.path for disk in plugged]


def test_a_port_taken_meanwhile_fails_the_attach_naming_the_disk(tmp_path: Path) -> None:
    """Counted free, then taken by a NIC before the disk's turn: what was attached is the caller's to undo."""
    proxy = Proxy(parse_config({}), "c", tmp_path)
    vm = PortsOnly({"hotplug0": False, "hotplug1": False})
    counted = vm.hotplug_root_ports

    async def then_a_nic_comes() -> dict[str, bool]:
        ports = await counted()
        vm.ports["hotplug1"] = True
        return ports

    vm.hotplug_root_ports = then_a_nic_comes  # type: ignore[method-assign]
    proxy.sandbox.hypervisor = vm  # type: ignore[assignment]
    plugged: list[BlockDisk] = []
    with pytest.raises(HypervisorError, match=r"^cannot attach host device /dev/loop1 to the VM: VM c has no free"):
        asyncio.run(proxy._plug_volumes(plan_of(2), plugged))
    assert [disk.path for disk in plugged] == [Path("/dev/loop0")]


# --- the host's tmpfs ---------------------------------------------------------------------

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
41 22 0:36 / /var/lib/containers/storage/overlay-containers/4f/userdata/shm rw,nosuid - tmpfs shm rw,size=65536k
42 22 0:37 / /srv/with\\040space rw - tmpfs tmpfs rw,size=1024k
43 22 0:38 / /srv/plain rw - ext4 /dev/vdb rw
"""


def test_mount_types_from_mountinfo() -> None:
    types = mount_types(MOUNTINFO)
    assert types["/var/lib/containers/storage/overlay-containers/4f/userdata/shm"] == "tmpfs"
    assert types["/srv/with space"] == "tmpfs"
    assert types["/srv/plain"] == "ext4"


def test_tmpfs_size_only_for_a_tmpfs_mount_point(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"50 22 0:40 / {tmp_path} rw - tmpfs tmpfs rw,size=1024k\n")
    size = tmpfs_size(tmp_path, mountinfo)
    stats = os.statvfs(tmp_path)
    assert size == stats.f_blocks * stats.f_frsize  # what the kernel reports for that path
    assert tmpfs_size(tmp_path / "sub", mountinfo) is None
    mountinfo.write_text("")
    assert tmpfs_size(tmp_path, mountinfo) is None


def test_a_block_devices_node_from_sysfs(tmp_path: Path) -> None:
    sys_dev_block, dev = tmp_path / "sys", tmp_path / "dev"
    (sys_dev_block / "8:16").mkdir(parents=True)
    (sys_dev_block / "8:16" / "uevent").write_text("MAJOR=8\nMINOR=16\nDEVNAME=sdb\nDEVTYPE=disk\n")
    dev.mkdir()
    assert block_device(8, 16, sys_dev_block, dev) is None  # no node
    (dev / "sdb").touch()
    assert block_device(8, 16, sys_dev_block, dev) == dev / "sdb"
    assert block_device(8, 17, sys_dev_block, dev) is None


def test_a_block_device_the_host_has_mounted_is_refused(tmp_path: Path) -> None:
    assert mounted_devices(MOUNTINFO) == {(254, 0), (0, 36), (0, 37), (0, 38)}
    mountinfo = tmp_path / "mountinfo"
    rdev = os.stat("/dev/null").st_rdev  # any device node: what counts is its major:minor
    mountinfo.write_text(f"22 1 {os.major(rdev)}:{os.minor(rdev)} / /mnt rw - ext4 /dev/sdz rw\n")
    with pytest.raises(StorageError, match="block device /dev/null is mounted on the host"):
        check_not_mounted(Path("/dev/null"), mountinfo)
    mountinfo.write_text(MOUNTINFO)
    check_not_mounted(Path("/dev/null"), mountinfo)
