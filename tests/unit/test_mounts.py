"""plan_mounts and container_request: which spec mounts the host binds into the shared dir, as data."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from capsa.errors import BundleError, InvalidArgument
from capsa.protocols import agent_pb2 as pb
from capsa.runtime.mounts import (
    BLOCK_DEVICE_ANNOTATION,
    GUEST_SHARE_DIR,
    GUEST_SHM_DIR,
    GUEST_VOLUME_DIR,
    GUEST_VOLUME_SHARE_DIR,
    SHARE_TAG,
    VOLUME_SHARE_TAG,
    BlockDevice,
    BlockVolume,
    HostBind,
    allows_every_device,
    container_request,
    host_propagation,
    is_host_bind,
    plan_mounts,
    port_shortage,
    volume_serial,
    without_host_block_devices,
)

PODMAN_USERDATA = "/var/lib/containers/storage/overlay-containers/4f1c/userdata"
DOCKER_DIR = "/var/lib/docker/containers/9a2e"
ROOTFS = Path("/var/lib/containers/storage/overlay/abc/merged")


def fake_stat(files: dict[str, int]) -> Any:
    """os.stat over a made-up tree: path -> st_mode; anything else does not exist."""

    def stat_(path: Path) -> os.stat_result:
        mode = files.get(str(path))
        if mode is None:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return os.stat_result((mode, 1, 1, 1, 0, 0, 0, 0, 0, 0))

    return stat_


DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o644
CHR = stat.S_IFCHR | 0o666
BLK = stat.S_IFBLK | 0o660


def linux_mounts() -> list[dict[str, Any]]:
    """The kernel filesystems both engines put in every spec."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup2",
            "source": "cgroup2",
            "options": ["rprivate", "nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def podman_spec() -> dict[str, Any]:
    """What `podman run -v /srv/data:/data -v /srv/conf.ini:/etc/app.ini:ro` writes (podman 4)."""

    def userdata(name: str, destination: str, *extra: str) -> dict[str, Any]:
        return {
            "destination": destination,
            "type": "bind",
            "source": f"{PODMAN_USERDATA}/{name}",
            "options": ["bind", "rprivate", *extra],
        }

    return {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["sh"], "cwd": "/"},
        "root": {"path": str(ROOTFS)},
        "hostname": "4f1c",
        "mounts": [
            *linux_mounts(),
            userdata("shm", "/dev/shm", "nosuid", "noexec", "nodev"),
            userdata("hostname", "/etc/hostname"),
            userdata("resolv.conf", "/etc/resolv.conf"),
            userdata("hosts", "/etc/hosts"),
            userdata(".containerenv", "/run/.containerenv"),
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rprivate"]},
            {
                "destination": "/etc/app.ini",
                "type": "bind",
                "source": "/srv/conf.ini",
                "options": ["ro", "rprivate", "rbind"],
            },
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]},
    }


PODMAN_FILES = {
    f"{PODMAN_USERDATA}/shm": DIR,
    f"{PODMAN_USERDATA}/hostname": FILE,
    f"{PODMAN_USERDATA}/resolv.conf": FILE,
    f"{PODMAN_USERDATA}/hosts": FILE,
    f"{PODMAN_USERDATA}/.containerenv": FILE,
    "/srv/data": DIR,
    "/srv/conf.ini": FILE,
}


def docker_spec() -> dict[str, Any]:
    """What `docker run -v /srv/data:/data:ro` writes (moby 24): rbind everywhere, mounts/shm for /dev/shm."""

    def container_file(source: str, destination: str) -> dict[str, Any]:
        return {
            "destination": destination,
            "type": "bind",
            "source": f"{DOCKER_DIR}/{source}",
            "options": ["rbind", "rprivate"],
        }

    return {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["sh"], "cwd": "/"},
        "root": {"path": "/var/lib/docker/overlay2/77/merged"},
        "mounts": [
            *linux_mounts(),
            container_file("mounts/shm", "/dev/shm"),
            container_file("resolv.conf", "/etc/resolv.conf"),
            container_file("hostname", "/etc/hostname"),
            container_file("hosts", "/etc/hosts"),
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro", "rprivate"]},
        ],
    }


DOCKER_FILES = {
    f"{DOCKER_DIR}/mounts/shm": DIR,
    f"{DOCKER_DIR}/resolv.conf": FILE,
    f"{DOCKER_DIR}/hostname": FILE,
    f"{DOCKER_DIR}/hosts": FILE,
    "/srv/data": DIR,
}


def test_podman_spec() -> None:
    spec = podman_spec()
    before = copy.deepcopy(spec)
    plan = plan_mounts(spec, "c1", ROOTFS, fake_stat(PODMAN_FILES))
    assert spec == before  # input untouched

    assert plan.rootfs == "c1/rootfs"
    assert plan.binds[0] == HostBind(ROOTFS, "c1/rootfs", readonly=False, directory=True, recursive=True)
    # Podman sends rprivate with every bind: the host binds are cut off from later host mounts.
    private = {"propagation": "rprivate"}
    assert plan.binds[1:] == (
        HostBind(Path(f"{PODMAN_USERDATA}/shm"), "c1/mounts/6", False, True, False, **private),
        HostBind(Path(f"{PODMAN_USERDATA}/hostname"), "c1/mounts/7", False, False, False, **private),
        HostBind(Path(f"{PODMAN_USERDATA}/resolv.conf"), "c1/mounts/8", False, False, False, **private),
        HostBind(Path(f"{PODMAN_USERDATA}/hosts"), "c1/mounts/9", False, False, False, **private),
        HostBind(Path(f"{PODMAN_USERDATA}/.containerenv"), "c1/mounts/10", False, False, False, **private),
        HostBind(Path("/srv/data"), "c1/mounts/11", readonly=False, directory=True, recursive=True, **private),
        HostBind(Path("/srv/conf.ini"), "c1/mounts/12", readonly=True, directory=False, recursive=True, **private),
    )

    mounts = plan.spec["mounts"]
    # Kernel filesystems go to crun in the guest as they are.
    assert mounts[:6] == linux_mounts()
    # Bind sources become guest paths inside the share; destination and
    # options (ro, propagation) stay for crun to apply in the guest.
    assert mounts[9] == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": f"{GUEST_SHARE_DIR}/c1/mounts/9",
        "options": ["bind", "rprivate"],
    }
    assert mounts[12] == {
        "destination": "/etc/app.ini",
        "type": "bind",
        "source": f"{GUEST_SHARE_DIR}/c1/mounts/12",
        "options": ["ro", "rprivate", "rbind"],
    }
    # The rest of the spec is the engine's.
    assert {k: v for k, v in plan.spec.items() if k != "mounts"} == {k: v for k, v in spec.items() if k != "mounts"}


def test_docker_spec() -> None:
    plan = plan_mounts(docker_spec(), "d", Path("/var/lib/docker/overlay2/77/merged"), fake_stat(DOCKER_FILES))
    by_target = {bind.target: bind for bind in plan.binds}
    assert sorted(by_target) == ["d/mounts/10", "d/mounts/6", "d/mounts/7", "d/mounts/8", "d/mounts/9", "d/rootfs"]
    assert by_target["d/mounts/6"].directory and by_target["d/mounts/6"].recursive
    assert not by_target["d/mounts/7"].directory
    assert by_target["d/mounts/10"].readonly
    assert not by_target["d/mounts/9"].readonly
    assert [m["source"] for m in plan.spec["mounts"][6:]] == [f"{GUEST_SHARE_DIR}/d/mounts/{n}" for n in range(6, 11)]


def test_guest_share_dir_is_the_callers() -> None:
    plan = plan_mounts(podman_spec(), "c1", ROOTFS, fake_stat(PODMAN_FILES), "/mnt/share")
    assert plan.spec["mounts"][9]["source"] == "/mnt/share/c1/mounts/9"
    assert plan.guest_share_dir == "/mnt/share"


@pytest.mark.parametrize(
    ("mount", "expected"),
    [
        ({"type": "bind", "source": "/a", "destination": "/b"}, True),
        ({"type": "none", "source": "/a", "destination": "/b", "options": ["rbind"]}, True),
        ({"source": "/a", "destination": "/b", "options": ["ro", "bind"]}, True),
        ({"type": "", "source": "/a", "destination": "/b", "options": ["nosuid,bind"]}, True),
        ({"type": "tmpfs", "source": "tmpfs", "destination": "/b", "options": ["bind"]}, False),
        ({"type": "proc", "source": "proc", "destination": "/proc"}, False),
        ({"type": "cgroup", "source": "cgroup", "destination": "/sys/fs/cgroup", "options": ["ro"]}, False),
        ({"source": "/a", "destination": "/b"}, False),
    ],
)
def test_what_is_a_bind_mount(mount: dict[str, Any], expected: bool) -> None:
    assert is_host_bind(mount) is expected


def spec_with(*mounts: dict[str, Any]) -> dict[str, Any]:
    return {"process": {"args": ["sh"]}, "root": {"path": "rootfs"}, "mounts": list(mounts)}


def test_ro_rw_last_word_wins() -> None:
    files = {"/a": DIR}
    spec = spec_with(
        {"destination": "/x", "type": "bind", "source": "/a", "options": ["ro", "rw"]},
        {"destination": "/y", "type": "bind", "source": "/a", "options": ["rw,ro"]},
    )
    plan = plan_mounts(spec, "c", ROOTFS, fake_stat(files))
    assert [bind.readonly for bind in plan.binds[1:]] == [False, True]


def test_character_devices_under_dev_are_the_guests_own() -> None:
    mount = {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind"]}
    plan = plan_mounts(spec_with(mount), "c", ROOTFS, fake_stat({"/dev/fuse": CHR}))
    assert plan.binds[1:] == ()
    assert plan.spec["mounts"] == [mount]


def test_system_paths_are_the_guests_own() -> None:
    mounts = [
        {"destination": "/host/sys", "type": "bind", "source": "/sys", "options": ["rbind"]},
        {"destination": "/host/proc/sys", "type": "bind", "source": "/proc/sys", "options": ["rbind", "ro"]},
        {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind"]},
        {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]},
    ]
    files = {"/sys": DIR, "/proc/sys": DIR, "/dev": DIR, "/dev/shm": DIR}
    plan = plan_mounts(spec_with(*mounts), "c", ROOTFS, fake_stat(files))
    assert plan.binds[1:] == ()
    assert plan.spec["mounts"] == mounts


def test_a_bind_of_a_block_device_is_a_block_volume() -> None:
    """Kata's BlockVolume: the disk goes to the VM, the guest mounts it, crun binds the mount."""
    mount = {"destination": "/data", "type": "bind", "source": "/dev/sdb", "options": ["rbind", "ro", "rprivate"]}
    plan = plan_mounts(spec_with(mount), "c", ROOTFS, fake_stat({"/dev/sdb": BLK}))
    assert plan.binds[1:] == ()
    assert plan.volumes == (
        BlockVolume(
            source=Path("/dev/sdb"),
            serial=volume_serial("c", 0),
            readonly=True,
            host_device=True,
            fstype="",
            options=(),
            mount_point=f"{GUEST_VOLUME_DIR}/c/0",
        ),
    )
    assert plan.spec["mounts"] == [
        {
            "destination": "/data",
            "type": "bind",
            "source": f"{GUEST_VOLUME_DIR}/c/0",
            "options": ["rbind", "ro", "rprivate"],
        }
    ]


def test_a_disk_filesystem_on_an_image_file_is_a_block_volume() -> None:
    mount = {"destination": "/db", "type": "ext4", "source": "disk.img", "options": ["noatime", "data=ordered"]}
    plan = plan_mounts(spec_with(mount), "c", ROOTFS, fake_stat({"/b/disk.img": FILE}), bundle=Path("/b"))
    (volume,) = plan.volumes
    assert volume.source == Path("/b/disk.img") and not volume.host_device and not volume.readonly
    assert volume.fstype == "ext4"
    assert volume.options == ("noatime", "data=ordered")
    assert plan.spec["mounts"] == [
        {"destination": "/db", "type": "bind", "source": f"{GUEST_VOLUME_DIR}/c/0", "options": ["rbind", "rw"]}
    ]


def test_a_disk_filesystem_needs_a_disk() -> None:
    mount = {"destination": "/db", "type": "ext4", "source": "/srv/dir"}
    with pytest.raises(InvalidArgument, match="must be a block device or a raw image file"):
        plan_mounts(spec_with(mount), "c", ROOTFS, fake_stat({"/srv/dir": DIR}))


def test_volume_serials_fit_virtio_blk_and_differ() -> None:
    serials = {volume_serial(cid, index) for cid in ("a", "b", "x" * 1024) for index in range(3)}
    assert len(serials) == 9
    assert all(len(serial.encode()) <= 20 for serial in serials)


def test_block_volume_storages_name_the_serial() -> None:
    mounts = [
        {"destination": "/a", "type": "ext4", "source": "/a.img", "options": ["ro", "noatime"]},
        {"destination": "/b", "type": "bind", "source": "/dev/vdz"},
    ]
    plan = plan_mounts(spec_with(*mounts), "c", ROOTFS, fake_stat({"/a.img": FILE, "/dev/vdz": BLK}))
    request = container_request("c", plan, "virtio-fs")
    assert list(request.storages) == [
        pb.Storage(
            driver="blk",
            source=volume_serial("c", 0),
            fstype="ext4",
            options=["noatime", "ro"],
            mount_point=f"{GUEST_VOLUME_DIR}/c/0",
        ),
        pb.Storage(driver="blk", source=volume_serial("c", 1), mount_point=f"{GUEST_VOLUME_DIR}/c/1"),
    ]


def docker_device_spec(access: str = "rwm") -> dict[str, Any]:
    """What `docker run --device /dev/sdb:/dev/xvdc` writes: the node and a cgroup rule for 8:16."""
    spec = spec_with()
    spec["linux"] = {
        "devices": [
            {"path": "/dev/xvdc", "type": "b", "major": 8, "minor": 16, "fileMode": 432, "uid": 0, "gid": 6},
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        ],
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "b", "major": 8, "minor": 16, "access": access},
            ]
        },
    }
    spec["annotations"] = {"org.example": "kept"}
    return spec


def host_block_devices(nodes: dict[tuple[int, int], str]) -> Any:
    return lambda major, minor: Path(nodes[(major, minor)]) if (major, minor) in nodes else None


def test_a_block_device_in_linux_devices_is_attached_raw() -> None:
    spec = docker_device_spec()
    plan = plan_mounts(spec, "c", ROOTFS, fake_stat({}), block_device=host_block_devices({(8, 16): "/dev/sdb"}))
    assert plan.devices == (
        BlockDevice(source=Path("/dev/sdb"), serial=volume_serial("c", 10_000), readonly=False, path="/dev/xvdc"),
    )
    assert plan.disks == plan.devices
    # The entry stays for the agent to renumber; the serial rides in an annotation.
    assert plan.spec["linux"] == spec["linux"]
    assert plan.spec["annotations"] == {
        "org.example": "kept",
        BLOCK_DEVICE_ANNOTATION + "/dev/xvdc": volume_serial("c", 10_000),
    }
    request = container_request("c", plan, "virtio-fs")
    assert json.loads(request.oci_spec_json)["annotations"] == plan.spec["annotations"]
    assert not request.storages  # a raw disk: nothing for the agent to mount


def test_a_device_the_container_may_only_read_is_attached_read_only() -> None:
    plan = plan_mounts(
        docker_device_spec("r"), "c", ROOTFS, fake_stat({}), block_device=host_block_devices({(8, 16): "/dev/sdb"})
    )
    assert plan.devices[0].readonly


def test_a_block_device_the_host_lacks_is_named() -> None:
    with pytest.raises(InvalidArgument, match="no host block device 8:16 for /dev/xvdc"):
        plan_mounts(docker_device_spec(), "c", ROOTFS, fake_stat({}), block_device=host_block_devices({}))


def test_without_a_device_lookup_linux_devices_is_left_alone() -> None:
    """The check `capsa create` makes before the VM boots does not look at the host's devices."""
    plan = plan_mounts(docker_device_spec(), "c", ROOTFS, fake_stat({}))
    assert plan.devices == () and plan.spec["annotations"] == {"org.example": "kept"}


# --- privileged containers: the host's devices stay on the host ----------------------------

def privileged_spec(*devices: dict[str, Any]) -> dict[str, Any]:
    """What containerd's CRI writes for a privileged container without privileged_without_host_devices:
    every device node of the host, and a device cgroup that allows every device (WithAllDevicesAllowed)."""
    spec = spec_with()
    spec["linux"] = {"devices": list(devices), "resources": {"devices": [{"allow": True, "access": "rwm"}]}}
    return spec


HOST_DEVICES = (
    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
    {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0, "fileMode": 24960},
    {"path": "/dev/vda", "type": "b", "major": 254, "minor": 0, "fileMode": 24960},
)


def test_a_privileged_spec_leaves_the_hosts_block_devices_out(caplog: pytest.LogCaptureFixture) -> None:
    """Docker's and Podman's --privileged, CRI without privileged_without_host_devices: every host
    device is listed; the block devices are neither attached nor made in the guest, with a warning."""
    spec = privileged_spec(*HOST_DEVICES)
    plan = plan_mounts(spec, "c", ROOTFS, fake_stat({}), block_device=host_block_devices({(7, 0): "/dev/loop0"}))
    assert plan.devices == ()
    assert plan.spec["linux"]["devices"] == [HOST_DEVICES[0]]  # the character device stays (the guest's)
    assert "the host's 2 block devices are left out" in caplog.text
    assert spec["linux"]["devices"] == list(HOST_DEVICES)  # the input is not modified


def test_a_privileged_spec_without_host_block_devices_runs() -> None:
    """privileged_without_host_devices = true (containerd 1.7 may still allow every device), or a
    host with character devices only: nothing to attach, the container's devices are the guest's."""
    for spec in (privileged_spec(), privileged_spec(HOST_DEVICES[0])):
        assert without_host_block_devices(spec) is spec
        assert plan_mounts(spec, "c", ROOTFS, fake_stat({}), block_device=host_block_devices({})).devices == ()


def test_block_devices_the_user_named_are_attached_even_with_every_capability() -> None:
    """`docker run --device`, a device plugin: the cgroup allows those devices only, so they were asked for."""
    spec = docker_device_spec()
    spec["process"]["capabilities"] = {"bounding": ["CAP_SYS_ADMIN", "CAP_MKNOD"]}
    assert without_host_block_devices(spec) is spec
    plan = plan_mounts(spec, "c", ROOTFS, fake_stat({}), block_device=host_block_devices({(8, 16): "/dev/sdb"}))
    assert [device.source for device in plan.devices] == [Path("/dev/sdb")]


@pytest.mark.parametrize(
    ("rules", "every"),
    [
        ([{"allow": True, "access": "rwm"}], True),
        ([{"allow": False, "access": "rwm"}, {"allow": True, "type": "a", "major": -1, "minor": -1}], True),
        ([{"allow": True}], True),
        ([{"allow": True, "access": "rw"}], False),
        ([{"allow": True, "access": "rwm"}, {"allow": False, "type": "c", "major": 10, "minor": 200}], False),
        ([{"allow": True, "type": "b", "access": "rwm"}], False),
        ([{"allow": True, "type": "b", "major": 8, "minor": 16, "access": "rwm"}], False),
        ([{"allow": False, "access": "rwm"}], False),
        ([], False),
    ],
)
def test_every_device_allowed(rules: list[dict[str, Any]], every: bool) -> None:
    assert allows_every_device({"linux": {"resources": {"devices": rules}}}) is every


def test_a_spec_without_linux_allows_no_device_and_is_left_alone() -> None:
    assert not allows_every_device({})
    nonsense = {"linux": "nonsense"}
    assert without_host_block_devices(nonsense) is nonsense


# --- more disks than the VM has hot-plug ports ---------------------------------------------


def disks(count: int) -> tuple[BlockVolume | BlockDevice, ...]:
    image = BlockVolume(Path("/srv/a.img"), "s0", False, False, "ext4", (), "/run/capsa/volumes/c/0")
    devices = [BlockDevice(Path(f"/dev/loop{n}"), f"s{n}", False, f"/dev/xvd{n}") for n in range(1, count)]
    return (image, *devices)[:count]


def test_disks_that_fit_in_the_free_ports_are_not_refused() -> None:
    assert port_shortage(disks(3), free=3, in_use=2) is None
    assert port_shortage((), free=0, in_use=5) is None


def test_the_first_disk_without_a_port_is_named() -> None:
    assert port_shortage(disks(6), free=2, in_use=3) == (
        "cannot attach host device /dev/loop2 to the VM: no free PCIe hot-plug port "
        "(3 in use, 2 free for the container's 6 disks); give the container at most 2 block devices and block volumes"
    )
    refusal = port_shortage(disks(2), free=0, in_use=5)
    assert refusal is not None and refusal.startswith("cannot attach disk image /srv/a.img to the VM: ")


def shm_sizes(sizes: dict[str, int]) -> Any:
    return lambda path: sizes.get(str(path))


def test_the_engines_shm_dir_becomes_a_guest_tmpfs() -> None:
    plan = plan_mounts(
        podman_spec(),
        "c1",
        ROOTFS,
        fake_stat(PODMAN_FILES),
        tmpfs_size=shm_sizes({f"{PODMAN_USERDATA}/shm": 64 << 20}),
    )
    assert Path(f"{PODMAN_USERDATA}/shm") not in [bind.source for bind in plan.binds]
    (shm,) = plan.tmpfs
    assert shm.size_bytes == 64 << 20 and shm.mount_point.startswith(GUEST_SHM_DIR + "/")
    assert plan.spec["mounts"][6] == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": shm.mount_point,
        "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"],
    }
    request = container_request("c1", plan, "virtio-fs")
    assert list(request.storages) == [
        pb.Storage(
            driver="local",
            source="shm",
            fstype="tmpfs",
            options=["nosuid", "nodev", "noexec", "mode=1777", f"size={64 << 20}"],
            mount_point=shm.mount_point,
        )
    ]


def test_a_pods_containers_share_the_sandbox_shm() -> None:
    """CRI binds the sandbox's shm dir into every container of the pod: one guest tmpfs for all of them."""
    shm = "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/s1/shm"
    mount = {"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "ro"]}
    sizes = shm_sizes({shm: 64 << 20})
    first = plan_mounts(spec_with(mount), "pause", ROOTFS, fake_stat({shm: DIR}), tmpfs_size=sizes)
    second = plan_mounts(spec_with(mount), "app", ROOTFS, fake_stat({shm: DIR}), tmpfs_size=sizes)
    assert first.tmpfs == second.tmpfs
    assert first.spec["mounts"][0]["source"] == second.spec["mounts"][0]["source"]
    other = plan_mounts(
        spec_with({**mount, "source": "/other/shm"}),
        "app",
        ROOTFS,
        fake_stat({"/other/shm": DIR}),
        tmpfs_size=shm_sizes({"/other/shm": 1 << 20}),
    )
    assert other.tmpfs[0].mount_point != first.tmpfs[0].mount_point


def test_a_shm_dir_that_is_no_tmpfs_stays_a_bind() -> None:
    plan = plan_mounts(podman_spec(), "c1", ROOTFS, fake_stat(PODMAN_FILES), tmpfs_size=shm_sizes({}))
    assert plan.tmpfs == ()
    assert Path(f"{PODMAN_USERDATA}/shm") in [bind.source for bind in plan.binds]


def test_a_tmpfs_elsewhere_is_an_ordinary_bind() -> None:
    mount = {"destination": "/cache", "type": "bind", "source": "/run/cache", "options": ["rbind"]}
    plan = plan_mounts(
        spec_with(mount), "c", ROOTFS, fake_stat({"/run/cache": DIR}), tmpfs_size=shm_sizes({"/run/cache": 1 << 20})
    )
    assert plan.tmpfs == () and plan.binds[1].source == Path("/run/cache")


@pytest.mark.parametrize(
    ("mode", "source", "message"),
    [
        (stat.S_IFSOCK | 0o660, "/run/docker.sock", "unix socket /run/docker.sock"),
        (stat.S_IFIFO | 0o600, "/tmp/fifo", "FIFO /tmp/fifo"),
        (CHR, "/tmp/null", "character device /tmp/null"),
    ],
)
def test_what_cannot_cross_the_vm_boundary(mode: int, source: str, message: str) -> None:
    mount = {"destination": "/x", "type": "bind", "source": source}
    with pytest.raises(InvalidArgument, match=message):
        plan_mounts(spec_with(mount), "c", ROOTFS, fake_stat({source: mode}))


def test_a_missing_source_is_named() -> None:
    spec = podman_spec()
    files = dict(PODMAN_FILES)
    del files["/srv/conf.ini"]
    with pytest.raises(BundleError) as error:
        plan_mounts(spec, "c1", ROOTFS, fake_stat(files))
    assert str(error.value) == "mounts[12]: bind source /srv/conf.ini: no such file or directory"


def test_an_unreadable_source_says_why() -> None:
    def denied(path: Path) -> os.stat_result:
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(BundleError, match="mounts\\[0\\]: bind source /a: Permission denied"):
        plan_mounts(spec_with({"destination": "/x", "type": "bind", "source": "/a"}), "c", ROOTFS, denied)


def test_relative_sources_are_relative_to_the_bundle() -> None:
    spec = spec_with({"destination": "/x", "type": "bind", "source": "data/../files"})
    plan = plan_mounts(spec, "c", ROOTFS, fake_stat({"/b/files": DIR}), bundle=Path("/b"))
    assert plan.binds[1].source == Path("/b/files")
    with pytest.raises(BundleError, match="relative"):
        plan_mounts(spec, "c", ROOTFS, fake_stat({"/b/files": DIR}))


@pytest.mark.parametrize(
    "mounts",
    [
        "nope",
        ["nope"],
        [{"destination": "/x", "type": "bind"}],
        [{"destination": "/x", "type": "bind", "source": ""}],
    ],
)
def test_malformed_mounts(mounts: Any) -> None:
    with pytest.raises(BundleError):
        plan_mounts({"mounts": mounts}, "c", ROOTFS, fake_stat({}))


def test_no_mounts_only_the_rootfs() -> None:
    plan = plan_mounts({"process": {"args": ["sh"]}}, "c", ROOTFS, fake_stat({}))
    assert [bind.target for bind in plan.binds] == ["c/rootfs"]
    assert "mounts" not in plan.spec


def test_the_container_id_is_a_path_component() -> None:
    with pytest.raises(InvalidArgument):
        plan_mounts({}, "../x", ROOTFS, fake_stat({}))


@pytest.mark.parametrize(("shared_fs", "driver"), [("virtio-fs", "virtiofs"), ("virtio-9p", "9p")])
def test_container_request(shared_fs: str, driver: str) -> None:
    plan = plan_mounts(podman_spec(), "c1", ROOTFS, fake_stat(PODMAN_FILES))
    request = container_request("c1", plan, shared_fs)
    assert request.container_id == "c1"
    assert json.loads(request.oci_spec_json) == plan.spec
    assert request.rootfs == pb.Storage(
        driver=driver, source="rootfs", fstype=driver, mount_point=GUEST_SHARE_DIR, subpath="c1/rootfs"
    )
    assert not request.storages


def test_binds_go_to_the_volume_share_and_the_rootfs_stays() -> None:
    """virtio-fs: every host bind, directory or single file, on the share that keeps no metadata cache."""
    plan = plan_mounts(
        docker_spec(), "d", ROOTFS, fake_stat(DOCKER_FILES), volume_share_dir=GUEST_VOLUME_SHARE_DIR
    )
    assert plan.share_binds(SHARE_TAG) == (plan.binds[0],)
    assert plan.binds[0].target == "d/rootfs"
    volume_binds = plan.share_binds(VOLUME_SHARE_TAG)
    assert [bind.target for bind in volume_binds] == [f"d/mounts/{n}" for n in range(6, 11)]
    assert {bind.directory for bind in volume_binds} == {True, False}  # /srv/data and /etc/hosts alike
    assert [m["source"] for m in plan.spec["mounts"][6:]] == [
        f"{GUEST_VOLUME_SHARE_DIR}/d/mounts/{n}" for n in range(6, 11)
    ]

    request = container_request("d", plan, "virtio-fs")
    assert request.rootfs.source == "rootfs"
    assert request.rootfs.mount_point == GUEST_SHARE_DIR
    # The agent mounts the volume share as the container's Storage, before crun binds from it.
    assert list(request.storages) == [
        pb.Storage(driver="virtiofs", source="volumes", fstype="virtiofs", mount_point=GUEST_VOLUME_SHARE_DIR)
    ]


def test_no_volume_share_storage_without_binds() -> None:
    plan = plan_mounts({"mounts": linux_mounts()}, "c", ROOTFS, fake_stat({}), volume_share_dir=GUEST_VOLUME_SHARE_DIR)
    assert plan.share_binds(VOLUME_SHARE_TAG) == ()
    assert not container_request("c", plan, "virtio-fs").storages


def test_volume_share_dir_must_be_absolute() -> None:
    with pytest.raises(InvalidArgument, match="absolute"):
        plan_mounts(docker_spec(), "d", ROOTFS, fake_stat(DOCKER_FILES), volume_share_dir="run/v")


# --- propagation: what the host side of each bind follows -------------------------------------------------------


def volume(*options: str) -> dict[str, Any]:
    return {"destination": "/vol", "type": "bind", "source": "/srv/data", "options": list(options)}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["rbind", "rslave"], "rslave"),  # Kubernetes HostToContainer, docker -v SRC:DST:rslave
        (["bind", "slave"], "slave"),
        (["rbind", "rprivate"], "rprivate"),  # what Docker, Podman and the kubelet send by default
        (["bind", "private"], "private"),
        (["rbind", "runbindable"], "rprivate"),
        (["rbind", "unbindable"], "private"),
        (["rbind"], "rslave"),  # none given: the rootfs propagation, runc's default rslave
        (["rbind", "rprivate", "rslave"], "rslave"),  # the last word wins
        (["rbind", "rslave,ro"], "rslave"),
    ],
)
def test_host_propagation_of_a_bind(options: list[str], expected: str) -> None:
    plan = plan_mounts({"mounts": [volume(*options)]}, "c1", ROOTFS, fake_stat({"/srv/data": DIR}))
    assert plan.binds[1].propagation == expected
    assert host_propagation(volume(*options), 0) == expected
    # The words stay for crun, which applies them inside the guest.
    assert plan.spec["mounts"][0]["options"] == options


@pytest.mark.parametrize(
    ("root", "bind", "rootfs"),
    [
        (None, "rslave", "rslave"),
        ("rslave", "rslave", "rslave"),
        ("slave", "rslave", "rslave"),
        ("rprivate", "rprivate", "rprivate"),
        ("private", "rprivate", "rprivate"),
        ("runbindable", "rprivate", "rprivate"),
        # Docker and containerd's CRI set it when a bind is rshared (which is refused);
        # alone, shared cannot go further than a slave.
        ("rshared", "rslave", "rslave"),
    ],
)
def test_binds_without_a_word_follow_the_rootfs_propagation(root: str | None, bind: str, rootfs: str) -> None:
    spec: dict[str, Any] = {"mounts": [volume("rbind")]}
    if root is not None:
        spec["linux"] = {"rootfsPropagation": root}
    plan = plan_mounts(spec, "c1", ROOTFS, fake_stat({"/srv/data": DIR}))
    assert plan.binds[0].propagation == rootfs
    assert plan.binds[1].propagation == bind


@pytest.mark.parametrize("word", ["rshared", "shared"])
def test_shared_propagation_is_refused_with_one_line(word: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan_mounts({"mounts": [volume("rbind", word)]}, "c1", ROOTFS, fake_stat({"/srv/data": DIR}))
    message = str(caught.value)
    assert message.startswith(f"mount propagation {word} of /vol cannot cross the VM boundary: ")
    assert "\n" not in message


def test_shared_propagation_of_what_stays_in_the_guest_is_crun_s() -> None:
    """A guest-own path or a block volume never crosses the share: crun applies rshared in the guest."""
    mounts = [
        {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind", "rshared"]},
        {"destination": "/disk", "type": "bind", "source": "/dev/sdb", "options": ["rbind", "rshared"]},
    ]
    plan = plan_mounts({"mounts": mounts}, "c1", ROOTFS, fake_stat({"/dev/fuse": CHR, "/dev/sdb": BLK}))
    assert len(plan.binds) == 1
    assert plan.spec["mounts"][1]["options"] == ["rbind", "rw", "rshared"]
