"""The spec's mounts, split into what the host binds and what the guest mounts.

A container in a VM sees host files only through the one directory the host
shares with the guest (virtio-fs or 9p, tag :data:`SHARE_TAG`).  As in Kata
Containers, that directory holds one subdirectory per container; bind mounts
made on the host (in the proxy's private mount namespace, see
:mod:`capsa.storage.shared`) bring the container's rootfs and the source of
every host bind mount of the spec into it::

    <shared dir>/<cid>/rootfs       the bundle's rootfs (rbind)
    <shared dir>/<cid>/mounts/<n>   the source of spec mounts[n]

The guest mounts the share once at :data:`GUEST_SHARE_DIR`, and the spec the
agent hands to crun names the guest side of each source.  crun then makes
the container's mounts in the guest exactly as runc would on the host: the
destination, the ``ro`` flag and the propagation options stay in the spec.

Which mounts are host binds follows runtime-spec config.md "Mounts" and
runc's reading of it: ``type`` ``bind``, or a ``bind``/``rbind`` option
with no filesystem type (``""``, ``none``).  Everything else (proc, sysfs,
tmpfs, devpts, mqueue, cgroup, cgroup2, ...) is a filesystem the guest
kernel makes for itself and goes to crun unchanged.

This module does no I/O: the caller passes ``stat`` (``os.stat``), and the
plan is data that :class:`capsa.storage.shared.SharedDir` carries out.
"""

from __future__ import annotations

import json
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
GUEST_SHARE_DIR = "/run/capsa/shared"
#: The virtio-fs tag (9p mount_tag) of the container share; the same name
#: runtime/sandbox.py gives its share (``ROOTFS_TAG``).
SHARE_TAG = "rootfs"

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


@dataclass(frozen=True)
class MountPlan:
    """What to bind on the host and what spec to send the agent for one container."""

    binds: tuple[HostBind, ...]  # the first one is the rootfs
    spec: dict[str, Any]  # bind sources rewritten to guest paths
    rootfs: str  # "<cid>/rootfs": the subpath of the share holding the rootfs
    guest_share_dir: str = GUEST_SHARE_DIR


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
) -> MountPlan:
    """Plan the host binds and the guest spec of a container; see the module docstring.

    ``stat`` is ``os.stat`` (it follows symlinks, as mount(2) does for a bind
    source).  ``bundle`` resolves relative bind sources: config.md "Mounts"
    says they are relative to the bundle.  A missing source is a
    BundleError; a source that cannot cross the VM boundary (a block device,
    a socket, a FIFO) is InvalidArgument.  The input spec is not modified.
    """
    validate_id(container_id)
    if not posixpath.isabs(guest_share_dir):
        raise InvalidArgument(f"the guest share directory must be absolute, got {guest_share_dir!r}")
    rootfs_target = f"{container_id}/rootfs"
    binds = [HostBind(source=rootfs, target=rootfs_target, readonly=False, directory=True, recursive=True)]
    mounts = spec.get("mounts")
    if mounts is None:
        mounts = []
    if not isinstance(mounts, list):
        raise BundleError("mounts: expected an array")
    guest_mounts: list[Any] = []
    for index, mount in enumerate(mounts):
        if not isinstance(mount, dict):
            raise BundleError(f"mounts[{index}]: expected an object")
        if not is_host_bind(mount):
            guest_mounts.append(mount)
            continue
        source = _bind_source(mount, index, bundle)
        mode = _source_mode(source, index, stat)
        if _is_guest_own(source, mode):
            guest_mounts.append(mount)
            continue
        target = f"{container_id}/mounts/{index}"
        binds.append(
            HostBind(
                source=source,
                target=target,
                readonly=_readonly(mount),
                directory=stat_mode.S_ISDIR(mode),
                recursive="rbind" in _options(mount),
            )
        )
        guest_mounts.append({**mount, "source": posixpath.join(guest_share_dir, target)})
    guest_spec = dict(spec)
    if "mounts" in spec:
        guest_spec["mounts"] = guest_mounts
    return MountPlan(binds=tuple(binds), spec=guest_spec, rootfs=rootfs_target, guest_share_dir=guest_share_dir)


def container_request(
    container_id: str, plan: MountPlan, shared_fs: str, tag: str = SHARE_TAG
) -> pb.CreateContainerRequest:
    """CreateContainer for a planned container: the share at the plan's guest dir, the rootfs a subpath of it.

    ``shared_fs`` is the configured ``shared_fs.kind`` (``virtio-fs`` or
    ``virtio-9p``).  The agent mounts the share once per sandbox at
    ``mount_point`` and binds ``subpath`` onto the container's rootfs; it
    points root.path at that rootfs itself.
    """
    driver, fstype = ("9p", "9p") if shared_fs == "virtio-9p" else ("virtiofs", "virtiofs")
    rootfs = pb.Storage(
        driver=driver,
        source=tag,
        fstype=fstype,
        mount_point=plan.guest_share_dir,
        subpath=plan.rootfs,
    )
    return pb.CreateContainerRequest(
        container_id=container_id,
        oci_spec_json=json.dumps(plan.spec).encode(),
        rootfs=rootfs,
    )


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
    if stat_mode.S_ISBLK(mode):
        # Passing a block device through to the guest is the next issue.
        raise InvalidArgument(f"bind mount of block device {path}: block devices cannot be passed to a VM yet")
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
