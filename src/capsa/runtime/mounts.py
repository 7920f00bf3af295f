"""The spec's mounts, split into what the host binds and what the guest mounts.

A container in a VM sees host files only through the directories the host
shares with the guest.  As in Kata Containers, each holds one subdirectory
per container; bind mounts made on the host (in the proxy's own mount
namespace, see :mod:`capsa.storage.shared`) bring the container's rootfs
and the source of every host bind mount of the spec into them::

    <shared dir>/<cid>/rootfs        the bundle's rootfs (rbind)
    <volumes dir>/<cid>/mounts/<n>   the source of spec mounts[n]

With virtio-fs there are two shares, because no one virtiofsd setting suits
both (docs/performance.md, "Small files, metadata ..."): the rootfs share
(tag :data:`SHARE_TAG`) lets the guest keep metadata for a second, which
container start and the application's imports live on; the volume share
(tag :data:`VOLUME_SHARE_TAG`) lets it keep none (virtiofsd ``-o
timeout=0``), so a host change to a volume (an append, a deletion, an
engine rewriting ``/etc/hosts``) is seen by the very next access instead of
up to a second later, torn.  Every host bind goes to the volume share,
directories and single files alike; the rootfs stays on the rootfs share.
With 9p (:func:`plan_mounts` without ``volume_share_dir``) one share holds
both, as ``<shared dir>/<cid>/mounts/<n>``: 9p keeps no cache to go stale.

The guest mounts the rootfs share once per sandbox at
:data:`GUEST_SHARE_DIR` (the rootfs Storage's subpath), the volume share at
:data:`GUEST_VOLUME_SHARE_DIR` while a container holds it (a Storage of the
container's), and the spec the agent hands to crun names the guest side of
each source.  crun then makes
the container's mounts in the guest exactly as runc would on the host: the
destination, the ``ro`` flag and the propagation options stay in the spec.

Which mounts are host binds follows runtime-spec config.md "Mounts" and
runc's reading of it: ``type`` ``bind``, or a ``bind``/``rbind`` option
with no filesystem type (``""``, ``none``).  Everything else (proc, sysfs,
tmpfs, devpts, mqueue, cgroup, cgroup2, ...) is a filesystem the guest
kernel makes for itself and goes to crun unchanged, ``size=`` and all.

Two kinds of mount do not go through the share:

- **Block volumes** become a virtio-blk disk of the VM (:class:`BlockVolume`),
  as Kata attaches them: a ``bind`` whose source is a host block device
  (what runc would bind as a device node; Kata's BlockVolume mounts its
  filesystem instead, and so do we), or a mount whose ``type`` is a disk
  filesystem (``ext4``, ``xfs``, ...) and whose source is a block device or a
  raw image file (runc mounts the former directly; the latter is capsa's
  way to hand a container a disk image without a loop device).  The agent
  finds the disk by its virtio-blk serial, mounts it at
  ``/run/capsa/volumes/<cid>/<n>`` in the guest (``ro`` when the mount is),
  and crun binds that directory at the destination.
- **Block devices in linux.devices** (``docker run --device /dev/sdb``,
  runtime-spec config-linux.md "Devices"): the host device of that
  major:minor becomes a virtio-blk disk too (:class:`BlockDevice`), left
  unmounted; the spec carries its serial in an annotation
  (:data:`BLOCK_DEVICE_ANNOTATION`), and the agent gives the device entry
  and its cgroup rule the guest disk's own major:minor before crun makes
  the node.
- **A privileged container's host block devices** are left out, all of
  them, with a warning (:func:`without_host_block_devices`).  A privileged
  spec (every device allowed in ``linux.resources.devices``: containerd's
  CRI without ``privileged_without_host_devices``, Docker's and Podman's
  ``--privileged``) lists every device node of the host in linux.devices,
  the host's own disks among them.  A container in a VM is privileged in
  the guest's kernel and gets the guest's devices, as containerd's
  ``privileged_without_host_devices`` would have it: attaching the host's
  would hand the guest the host's root disk read-write (two kernels
  writing one filesystem, and the host's files open to the VM), and a VM
  has only a few hot-plug ports.  Character devices stay the guest's, as
  for every container.  The price: a block device named explicitly next to
  ``--privileged`` (``--device /dev/sdb --privileged``) is left out too,
  since nothing in the spec tells it from the host's full list.
- **The engine's /dev/shm**: Podman (``userdata/shm``), Docker
  (``mounts/shm``) and CRI (the sandbox's ``shm``) bind a host tmpfs of the
  configured ``--shm-size`` there.  Through virtio-fs that would be slow,
  and POSIX shared memory across the VM boundary means nothing; as Kata
  does, the guest makes a tmpfs of the same size (:class:`GuestTmpfs`)
  instead, one per host source, so the containers of a pod that bind the
  same sandbox shm share one guest tmpfs.

**Propagation** (runtime-spec config.md "Mounts" options, config-linux.md
"Rootfs Mount Propagation"; sharedsubtree.rst) crosses the VM boundary in
one direction only.  Each host bind carries the propagation it needs on the
host (:attr:`HostBind.propagation`, from :func:`host_propagation`):

- ``rslave``/``slave`` (Kubernetes' HostToContainer), and a bind without a
  propagation option, which follows ``linux.rootfsPropagation`` and like
  runc's default root is a slave: mounts the host makes later under the
  source reach the share, virtiofsd (or QEMU's 9p server) and the guest.
- ``rprivate``/``private`` (what Docker, Podman and the kubelet send by
  default) and ``(r)unbindable``: the host bind is cut off from the
  host's propagation, so later host mounts stay out of the container.
- ``rshared``/``shared`` (Kubernetes' Bidirectional) is refused: a mount
  made in the guest lives in the guest's kernel and can never appear on
  the host, and a volume whose user relies on that (a CSI node plugin)
  would break silently.

The propagation words themselves stay in the guest spec for crun.

This module does no I/O: the caller passes ``stat`` (``os.stat``) and
``tmpfs_size`` (:func:`capsa.storage.host.tmpfs_size`), and the plan is
data that :class:`capsa.storage.shared.SharedDir` and the proxy carry out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import stat as stat_mode
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa.errors import BundleError, InvalidArgument
from capsa.protocols import agent_pb2 as pb
from capsa.runtime.ids import validate_id

#: Where the agent mounts the container share in the guest.
log = logging.getLogger("capsa.mounts")

GUEST_SHARE_DIR = "/run/capsa/shared"
#: The virtio-fs tag (9p mount_tag) of the container share; runtime/sandbox.py
#: gives its share this tag (``ROOTFS_TAG``).
SHARE_TAG = "rootfs"
#: The virtio-fs tag of the bind-volume share (``VOLUME_TAG`` in runtime/sandbox.py).
VOLUME_SHARE_TAG = "volumes"
#: Where the agent mounts the bind-volume share in the guest.
GUEST_VOLUME_SHARE_DIR = "/run/capsa/shared-volumes"
#: Where the agent mounts a container's block volumes: ``<dir>/<cid>/<n>``.
GUEST_VOLUME_DIR = "/run/capsa/volumes"
#: Where the agent mounts the tmpfs that stands for a host shm dir.
GUEST_SHM_DIR = "/run/capsa/shm"
#: Annotation prefix naming the serial of a linux.devices block device:
#: ``<prefix><container path>`` = serial (read by the agent, see :mod:`capsa.agent.storage`).
BLOCK_DEVICE_ANNOTATION = "io.capsa.block-device:"
#: The destination engines bind their shm dir at (runtime-spec config-linux.md
#: leaves /dev/shm to the runtime; runc's default spec mounts a tmpfs there).
SHM_DESTINATION = "/dev/shm"

# Filesystems that live on a disk: a mount of one of them whose source is a
# block device or a regular file is a block volume.  The guest kernel only
# has ext4 (which also mounts ext2/3); the others fail there with crun's or
# mount's own error, not silently.
DISK_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs"})

# Option words that say how to bind, not what the filesystem on a disk does.
_BIND_WORDS = frozenset({"bind", "rbind", "ro", "rw", "rro", "rrw"})
_PROPAGATION = frozenset({"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable"})
# What each propagation word means for the host side of a bind: the host
# bind must be cut off from the host's mounts (private) or follow them
# (slave).  Unbindable is private that cannot be bound again; the host
# still binds it into the share, so only its privacy counts there (crun
# makes the container's mount unbindable in the guest).
_HOST_PROPAGATION = {
    "private": "private",
    "rprivate": "rprivate",
    "unbindable": "private",
    "runbindable": "rprivate",
    "slave": "slave",
    "rslave": "rslave",
}
_SHARED_PROPAGATION = frozenset({"shared", "rshared"})

# Filesystem types that, with a bind option, still mean a bind mount
# (runc: an empty type or "none" plus "bind"/"rbind" in the options).
_BIND_TYPES = ("", "bind", "none")

# Host paths whose content is the host kernel's own view (sysfs, procfs,
# device nodes, /dev/shm's host IPC objects).  A bind of one of them keeps
# its path and binds the guest's own, as Kata does (its IsSystemMount and
# IsHostDevice): sharing the host's would be meaningless through virtio-fs
# (a device node opened in the guest is the guest's device of that number)
# or would leak host state into the VM.
_SYSTEM_PREFIXES = ("/proc", "/sys")


@dataclass(frozen=True)
class HostBind:
    """One bind mount the host makes inside the shared directory."""

    source: Path  # host path (file or directory)
    target: str  # relative to the shared dir, e.g. "<cid>/rootfs", "<cid>/mounts/3"
    readonly: bool
    directory: bool  # the mount point is a directory (else an empty file)
    recursive: bool  # rbind
    # How the bind follows the host's later mounts under its source: "rslave"
    # or "slave" (they reach the share), "rprivate" or "private" (they do
    # not); see :func:`host_propagation`.
    propagation: str = "rslave"
    # The share it goes into: SHARE_TAG (the rootfs's) or VOLUME_SHARE_TAG.
    share: str = SHARE_TAG


@dataclass(frozen=True)
class BlockVolume:
    """A host block device or raw image file that the VM gets as a virtio-blk disk.

    ``serial`` is the disk's virtio-blk serial (virtio spec 1.2, 5.2.6
    "VIRTIO_BLK_T_GET_ID": at most 20 bytes); the guest finds the disk by
    it, never by guessing which ``/dev/vdX`` the kernel named it.
    """

    source: Path  # host block device or regular file
    serial: str
    readonly: bool
    host_device: bool  # a block device (else a raw image file)
    fstype: str  # "" when the spec does not say: the agent reads the superblock
    options: tuple[str, ...]  # for the guest mount (filesystem data, nosuid, ...)
    mount_point: str  # guest path the agent mounts it at

    def storage(self) -> pb.Storage:
        """The agent's Storage for this disk: driver ``blk``, ``source`` the serial."""
        options = [*self.options, "ro"] if self.readonly else list(self.options)
        return pb.Storage(
            driver="blk", source=self.serial, fstype=self.fstype, options=options, mount_point=self.mount_point
        )


@dataclass(frozen=True)
class BlockDevice:
    """A host block device from linux.devices, handed to the guest as a raw virtio-blk disk."""

    source: Path  # the host's device node of the entry's major:minor
    serial: str
    readonly: bool  # the container's cgroup rules for it allow no writes
    path: str  # the device node's path in the container
    host_device: bool = True


@dataclass(frozen=True)
class GuestTmpfs:
    """A tmpfs the guest makes in place of a host one (an engine's /dev/shm)."""

    mount_point: str  # one per host source: containers binding the same source share it
    size_bytes: int

    def storage(self) -> pb.Storage:
        """The agent's Storage: a guest-local tmpfs with /dev/shm's usual flags and the host's size."""
        return pb.Storage(
            driver="local",
            source="shm",
            fstype="tmpfs",
            options=["nosuid", "nodev", "noexec", "mode=1777", f"size={self.size_bytes}"],
            mount_point=self.mount_point,
        )


@dataclass(frozen=True)
class MountPlan:
    """What to bind on the host and what spec to send the agent for one container."""

    binds: tuple[HostBind, ...]  # the first one is the rootfs
    spec: dict[str, Any]  # bind sources rewritten to guest paths
    rootfs: str  # "<cid>/rootfs": the subpath of the share holding the rootfs
    guest_share_dir: str = GUEST_SHARE_DIR
    # Where the guest mounts the volume share; None: binds go to the rootfs share.
    guest_volume_share_dir: str | None = None
    volumes: tuple[BlockVolume, ...] = ()
    tmpfs: tuple[GuestTmpfs, ...] = ()
    devices: tuple[BlockDevice, ...] = ()

    def share_binds(self, share: str) -> tuple[HostBind, ...]:
        """The binds that go into one share (:attr:`HostBind.share`)."""
        return tuple(bind for bind in self.binds if bind.share == share)

    @property
    def disks(self) -> tuple[BlockVolume | BlockDevice, ...]:
        """Everything the VM gets as a virtio-blk disk for this container."""
        return (*self.volumes, *self.devices)


def is_host_bind(mount: dict[str, Any]) -> bool:
    """Whether a spec mount is a bind mount (runtime-spec config.md "Mounts", runc's rule)."""
    fstype = mount.get("type") or ""
    if fstype == "bind":
        return True
    return fstype in _BIND_TYPES and bool({"bind", "rbind"} & set(_options(mount)))


def plan_mounts(
    spec: dict[str, Any],
    container_id: str,
    rootfs: Path,
    stat: Callable[[Path], os.stat_result],
    guest_share_dir: str = GUEST_SHARE_DIR,
    *,
    bundle: Path | None = None,
    tmpfs_size: Callable[[Path], int | None] | None = None,
    block_device: Callable[[int, int], Path | None] | None = None,
    volume_share_dir: str | None = None,
) -> MountPlan:
    """Plan the host binds, block volumes and the guest spec of a container; see the module docstring.

    ``stat`` is ``os.stat`` (it follows symlinks, as mount(2) does for a bind
    source).  ``bundle`` resolves relative bind sources: config.md "Mounts"
    says they are relative to the bundle.  ``tmpfs_size`` says whether a
    host path is a tmpfs mount and its size in bytes (None: it is not);
    without it the engine's /dev/shm stays a bind of the host's.
    ``block_device`` finds the host node of a major:minor
    (:func:`capsa.storage.host.block_device`); without it linux.devices
    is left alone (a check before the VM boots); with it, a block device
    the host lacks is InvalidArgument.  ``volume_share_dir`` is where the
    guest mounts the volume share (:data:`GUEST_VOLUME_SHARE_DIR`): every
    host bind goes there; None puts them on the rootfs share.  A missing
    source is a BundleError; a source that cannot cross the VM boundary (a
    socket, a FIFO) is InvalidArgument.  The input spec is not modified.
    """
    validate_id(container_id)
    spec = without_host_block_devices(spec)
    for directory in (guest_share_dir, volume_share_dir or "/"):
        if not posixpath.isabs(directory):
            raise InvalidArgument(f"the guest share directory must be absolute, got {directory!r}")
    rootfs_target = f"{container_id}/rootfs"
    root_propagation = _rootfs_propagation(spec)
    binds = [
        HostBind(
            source=rootfs,
            target=rootfs_target,
            readonly=False,
            directory=True,
            recursive=True,
            propagation=root_propagation,
        )
    ]
    mounts = spec.get("mounts")
    if mounts is None:
        mounts = []
    if not isinstance(mounts, list):
        raise BundleError("mounts: expected an array")
    guest_mounts: list[Any] = []
    volumes: list[BlockVolume] = []
    tmpfs: dict[str, GuestTmpfs] = {}
    for index, mount in enumerate(mounts):
        if not isinstance(mount, dict):
            raise BundleError(f"mounts[{index}]: expected an object")
        fstype = mount.get("type") or ""
        if fstype in DISK_FILESYSTEMS:
            source = _bind_source(mount, index, bundle)
            mode = _source_mode(source, index, stat)
            if not (stat_mode.S_ISBLK(mode) or stat_mode.S_ISREG(mode)):
                raise InvalidArgument(
                    f"mounts[{index}]: {fstype} source {source} must be a block device or a raw image file"
                )
            volume = _block_volume(container_id, index, source, mount, fstype, mode)
            volumes.append(volume)
            guest_mounts.append(_volume_bind(mount, volume))
            continue
        if not is_host_bind(mount):
            guest_mounts.append(mount)
            continue
        source = _bind_source(mount, index, bundle)
        mode = _source_mode(source, index, stat)
        if stat_mode.S_ISBLK(mode):
            volume = _block_volume(container_id, index, source, mount, "", mode)
            volumes.append(volume)
            guest_mounts.append(_volume_bind(mount, volume))
            continue
        if _is_guest_own(source, mode):
            guest_mounts.append(mount)
            continue
        size = tmpfs_size(source) if tmpfs_size is not None and _is_shm(mount, mode) else None
        if size is not None:
            shm = tmpfs.setdefault(str(source), GuestTmpfs(_guest_shm_dir(source), size))
            guest_mounts.append({**mount, "source": shm.mount_point})
            continue
        # Only binds through the share are checked: a block volume, a guest
        # tmpfs or a guest-own path is the guest's, where crun applies the
        # propagation as it is.
        propagation = host_propagation(mount, index, root_propagation)
        target = f"{container_id}/mounts/{index}"
        binds.append(
            HostBind(
                source=source,
                target=target,
                readonly=_readonly(mount),
                directory=stat_mode.S_ISDIR(mode),
                recursive="rbind" in _options(mount),
                propagation=propagation,
                share=SHARE_TAG if volume_share_dir is None else VOLUME_SHARE_TAG,
            )
        )
        guest_mounts.append({**mount, "source": posixpath.join(volume_share_dir or guest_share_dir, target)})
    guest_spec = dict(spec)
    if "mounts" in spec:
        guest_spec["mounts"] = guest_mounts
    devices = _plan_devices(spec, container_id, block_device)
    if devices:
        annotations = spec.get("annotations")
        guest_spec["annotations"] = {
            **(annotations if isinstance(annotations, dict) else {}),
            **{BLOCK_DEVICE_ANNOTATION + device.path: device.serial for device in devices},
        }
    return MountPlan(
        binds=tuple(binds),
        spec=guest_spec,
        rootfs=rootfs_target,
        guest_share_dir=guest_share_dir,
        guest_volume_share_dir=volume_share_dir,
        volumes=tuple(volumes),
        tmpfs=tuple(tmpfs.values()),
        devices=devices,
    )


def host_propagation(mount: dict[str, Any], index: int, default: str = "rslave") -> str:
    """The host-side propagation of a bind mount (see the module docstring); pure.

    The last propagation word of the options wins, as in runc's option
    parsing; a mount without one gets ``default``, the rootfs propagation
    (runc binds in a namespace whose ``/`` it made ``rootfsPropagation``,
    rslave unless the spec says otherwise).  ``shared``/``rshared`` is
    InvalidArgument: nothing mounted inside a VM can propagate to the host.
    """
    words = [word for word in _options(mount) if word in _PROPAGATION]
    if not words:
        return default
    if words[-1] in _SHARED_PROPAGATION:
        destination = mount.get("destination") or f"mounts[{index}]"
        raise InvalidArgument(
            f"mount propagation {words[-1]} of {destination} cannot cross the VM boundary: mounts made in the VM "
            "never reach the host (rslave, HostToContainer, does: host mounts reach the container)"
        )
    return _HOST_PROPAGATION[words[-1]]


def _rootfs_propagation(spec: dict[str, Any]) -> str:
    """The host propagation of the rootfs bind, and of binds that name none (config-linux.md rootfsPropagation).

    Unset, ``slave``/``rslave`` and ``shared``/``rshared`` give rslave: the
    host's mounts under the rootfs reach the container as they do under
    runc's default; shared cannot go further (a mount in the guest never
    reaches the host), and only binds that ask for it themselves are refused.
    """
    linux = spec.get("linux")
    value = linux.get("rootfsPropagation") if isinstance(linux, dict) else None
    if value in ("private", "rprivate", "unbindable", "runbindable"):
        return "rprivate"
    return "rslave"


def container_request(
    container_id: str, plan: MountPlan, shared_fs: str, tag: str = SHARE_TAG
) -> pb.CreateContainerRequest:
    """CreateContainer for a planned container: the share at the plan's guest dir, the rootfs a subpath of it.

    ``shared_fs`` is the configured ``shared_fs.kind`` (``virtio-fs`` or
    ``virtio-9p``).  The agent mounts the share once per sandbox at
    ``mount_point`` and binds ``subpath`` onto the container's rootfs; it
    points root.path at that rootfs itself.  A plan with binds on the
    volume share adds that share as a Storage of the container: the agent
    mounts it while some container holds it (a pod's containers share one
    mount, counted by mount point), before crun binds from it.
    """
    driver, fstype = ("9p", "9p") if shared_fs == "virtio-9p" else ("virtiofs", "virtiofs")
    rootfs = pb.Storage(
        driver=driver,
        source=tag,
        fstype=fstype,
        mount_point=plan.guest_share_dir,
        subpath=plan.rootfs,
    )
    shares: list[pb.Storage] = []
    if plan.guest_volume_share_dir is not None and plan.share_binds(VOLUME_SHARE_TAG):
        shares.append(
            pb.Storage(
                driver="virtiofs",
                source=VOLUME_SHARE_TAG,
                fstype="virtiofs",
                mount_point=plan.guest_volume_share_dir,
            )
        )
    return pb.CreateContainerRequest(
        container_id=container_id,
        oci_spec_json=json.dumps(plan.spec).encode(),
        rootfs=rootfs,
        storages=[*shares, *(shm.storage() for shm in plan.tmpfs), *(volume.storage() for volume in plan.volumes)],
    )


def volume_serial(container_id: str, index: int) -> str:
    """The virtio-blk serial of a container's block volume: 20 bytes at most, unique per VM.

    A hash, since a container ID may be 1024 characters long; the ID and
    the mount's index make it unique among a pod's containers.
    """
    digest = hashlib.sha256(f"{container_id}/{index}".encode()).hexdigest()
    return f"capsa{digest[:15]}"


def allows_every_device(spec: dict[str, Any]) -> bool:
    """Whether the spec's device cgroup lets the container use every device (config-linux.md "Allowed Device list").

    That is an ``allow`` rule with ``rwm`` access and no type (or ``a``),
    major or minor (or ``-1``: runc's wildcard), with no ``deny`` rule after
    it: the rule a privileged container gets (containerd's
    ``WithAllDevicesAllowed``, Docker's and Podman's ``--privileged``).
    """
    linux = spec.get("linux")
    every = False
    for rule in _device_rules(linux) if isinstance(linux, dict) else []:
        if rule.get("allow") is not True:
            every = False
        elif (
            rule.get("type") in (None, "", "a")
            and rule.get("major") in (None, -1)
            and rule.get("minor") in (None, -1)
            and set("rwm") <= set(str(rule.get("access") or "rwm"))
        ):
            every = True
    return every


def without_host_block_devices(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without the host's block devices when it is privileged; see the module docstring.

    A spec that names block devices without allowing every device
    (``docker run --device``, a Kubernetes device plugin) is the user's
    choice: it is returned as it is, and those devices are attached.  The
    input is not modified.
    """
    linux = spec.get("linux")
    entries = linux.get("devices") if isinstance(linux, dict) else None
    if not isinstance(linux, dict) or not isinstance(entries, list) or not allows_every_device(spec):
        return spec
    kept = [entry for entry in entries if not (isinstance(entry, dict) and entry.get("type") == "b")]
    if len(kept) == len(entries):
        return spec
    log.warning(
        "privileged container: the host's %d block devices are left out (a container in a VM is privileged "
        "in the VM and gets its devices)",
        len(entries) - len(kept),
    )
    return {**spec, "linux": {**linux, "devices": kept}}


def disk_name(disk: BlockVolume | BlockDevice) -> str:
    """How a message names what a disk of the VM stands for: ``host device /dev/sdb``, ``disk image /srv/a.img``."""
    return f"{'host device' if disk.host_device else 'disk image'} {disk.source}"


def port_shortage(disks: tuple[BlockVolume | BlockDevice, ...], free: int, in_use: int) -> str | None:
    """The refusal of a container whose disks need more PCIe hot-plug ports than the VM has free; None if they fit.

    Each disk takes a root port of its own (virtio-blk-pci); the VM's ports
    also hold its shares and NICs (``in_use``: taken before this container).
    The disk named is the first that would find none, but none is attached:
    the proxy asks before it plugs the first.
    """
    if len(disks) <= free:
        return None
    return (
        f"cannot attach {disk_name(disks[free])} to the VM: no free PCIe hot-plug port "
        f"({in_use} in use, {free} free for the container's {len(disks)} disks); "
        f"give the container at most {free} block devices and block volumes"
    )


def _plan_devices(
    spec: dict[str, Any], container_id: str, block_device: Callable[[int, int], Path | None] | None
) -> tuple[BlockDevice, ...]:
    """The block devices of linux.devices (config-linux.md "Devices"); character devices stay the guest's."""
    linux = spec.get("linux")
    if block_device is None or not isinstance(linux, dict) or not isinstance(linux.get("devices"), list):
        return ()
    entries: list[Any] = linux["devices"]
    rules = _device_rules(linux)
    devices: list[BlockDevice] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("type") != "b":
            continue
        path, major, minor = entry.get("path"), entry.get("major"), entry.get("minor")
        if not isinstance(path, str) or not isinstance(major, int) or not isinstance(minor, int):
            raise BundleError(f"linux.devices[{index}]: a block device needs a path, a major and a minor")
        source = block_device(major, minor)
        if source is None:
            raise InvalidArgument(f"linux.devices[{index}]: no host block device {major}:{minor} for {path}")
        access = [rule.get("access") or "rwm" for rule in rules if _rule_matches(rule, major, minor)]
        devices.append(
            BlockDevice(
                source=source,
                serial=volume_serial(container_id, 10_000 + index),
                readonly=bool(access) and not any("w" in str(word) for word in access),
                path=path,
            )
        )
    return tuple(devices)


def _device_rules(linux: dict[str, Any]) -> list[dict[str, Any]]:
    resources = linux.get("resources")
    rules = resources.get("devices") if isinstance(resources, dict) else None
    return [rule for rule in rules if isinstance(rule, dict)] if isinstance(rules, list) else []


def _rule_matches(rule: dict[str, Any], major: int, minor: int) -> bool:
    """An allow rule naming exactly this block device (a wildcard rule grants nothing in particular)."""
    return (
        rule.get("allow") is True
        and rule.get("type") == "b"
        and rule.get("major") == major
        and rule.get("minor") == minor
    )


def _block_volume(
    container_id: str, index: int, source: Path, mount: dict[str, Any], fstype: str, mode: int
) -> BlockVolume:
    options = tuple(word for word in _options(mount) if word not in _BIND_WORDS and word not in _PROPAGATION)
    return BlockVolume(
        source=source,
        serial=volume_serial(container_id, index),
        readonly=_readonly(mount),
        host_device=stat_mode.S_ISBLK(mode),
        fstype=fstype,
        options=options,
        mount_point=posixpath.join(GUEST_VOLUME_DIR, container_id, str(index)),
    )


def _volume_bind(mount: dict[str, Any], volume: BlockVolume) -> dict[str, Any]:
    """The container's side of a block volume: crun binds the guest mount at the destination."""
    propagation = [word for word in _options(mount) if word in _PROPAGATION]
    options = ["rbind", "ro" if volume.readonly else "rw", *propagation]
    return {"destination": mount.get("destination"), "type": "bind", "source": volume.mount_point, "options": options}


def _is_shm(mount: dict[str, Any], mode: int) -> bool:
    destination = mount.get("destination")
    return (
        isinstance(destination, str) and posixpath.normpath(destination) == SHM_DESTINATION and stat_mode.S_ISDIR(mode)
    )


def _guest_shm_dir(source: Path) -> str:
    """One guest tmpfs per host shm dir: a pod's containers that bind the same one share it."""
    return posixpath.join(GUEST_SHM_DIR, hashlib.sha256(str(source).encode()).hexdigest()[:16])


def _options(mount: dict[str, Any]) -> list[str]:
    options = mount.get("options") or []
    if not isinstance(options, list):
        return []
    return [word for option in options if isinstance(option, str) for word in option.split(",")]


def _readonly(mount: dict[str, Any]) -> bool:
    """mount(8) reading: the last of ``ro``/``rw`` wins; ``rw`` is the default."""
    readonly = False
    for word in _options(mount):
        if word == "ro":
            readonly = True
        elif word == "rw":
            readonly = False
    return readonly


def _bind_source(mount: dict[str, Any], index: int, bundle: Path | None) -> Path:
    source = mount.get("source")
    if not isinstance(source, str) or not source:
        raise BundleError(f"mounts[{index}]: a bind mount needs a source")
    if posixpath.isabs(source):
        return Path(posixpath.normpath(source))
    if bundle is None:
        raise BundleError(f"mounts[{index}]: bind source {source!r} is relative and no bundle was given")
    return Path(posixpath.normpath(posixpath.join(bundle, source)))


def _source_mode(source: Path, index: int, stat: Callable[[Path], os.stat_result]) -> int:
    try:
        return stat(source).st_mode
    except FileNotFoundError:
        raise BundleError(f"mounts[{index}]: bind source {source}: no such file or directory") from None
    except OSError as exc:
        raise BundleError(f"mounts[{index}]: bind source {source}: {os.strerror(exc.errno or 0)}") from exc


def _is_guest_own(source: Path, mode: int) -> bool:
    """Whether the bind keeps its path and binds the guest's own file (see _SYSTEM_PREFIXES).

    Raises InvalidArgument for what cannot be shared with a VM at all.
    """
    path = str(source)
    under_dev = path == "/dev" or path.startswith("/dev/")
    if stat_mode.S_ISCHR(mode):
        if not under_dev:
            raise InvalidArgument(f"bind mount of character device {path}: only devices under /dev can be bound")
        # The guest's own device of that name (/dev/null, /dev/fuse, ...):
        # a host device node cannot reach across the VM boundary.
        return True
    if stat_mode.S_ISSOCK(mode) or stat_mode.S_ISFIFO(mode):
        kind = "unix socket" if stat_mode.S_ISSOCK(mode) else "FIFO"
        raise InvalidArgument(f"bind mount of {kind} {path}: a {kind} cannot be shared across the VM boundary")
    if under_dev and stat_mode.S_ISDIR(mode):
        return True
    return any(path == prefix or path.startswith(prefix + "/") for prefix in _SYSTEM_PREFIXES)
