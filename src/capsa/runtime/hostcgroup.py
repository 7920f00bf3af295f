"""The container's (or pod's) cgroup on the host, holding the VM's host processes.

The OCI spec's ``linux.cgroupsPath`` (config-linux.md "Cgroups Path") names
the cgroup the container runs in.  crun applies it inside the guest, but
engines read statistics from the *host* cgroup they named: Podman's
``podman stats`` loads the cgroup its container's PID is in, containerd's
runc shim (``docker stats``, ``ctr task metrics``) the cgroup of the PID
the runtime wrote to ``--pid-file``, and Kubernetes accounts a pod's
overhead to the pod cgroup.  So capsa puts the processes that *are* the
container on the host there: the shim, the proxy, QEMU and virtiofsd
(with the shim v2, the shim v2 process itself: Kata's ``sandbox_cgroup_only``).

What this module does, as runc's libcontainer/cgroups does it:

- **Layout** from ``/proc/self/mountinfo``: ``unified`` (one cgroup2 mount),
  ``hybrid`` (v1 controller hierarchies plus a cgroup2 one, usually at
  ``/sys/fs/cgroup/unified``, with no controllers) or ``legacy`` (v1 only).
- **Path**: an absolute cgroupsPath is taken from each hierarchy's root, a
  relative one from the caller's own cgroup in that hierarchy
  (``/proc/self/cgroup``, as runc's fs driver does); ``..`` cannot climb
  out (runc's ``CleanPath``).  With ``--systemd-cgroup`` the path is
  ``slice:prefix:name``, and the cgroup is where systemd would put the
  scope runc asks it for: ``<slice expanded>/<prefix>-<name>.scope``
  (``a-b.slice`` expands to ``/a.slice/a-b.slice``; ``-.slice`` is the
  root).  capsa does not talk to systemd over D-Bus: it makes that
  directory itself, which systemd does not know as a unit.  No
  cgroupsPath means runc's defaults: ``<id>`` under the caller's cgroup,
  or ``system.slice:runc:<id>`` with ``--systemd-cgroup``.
- **Create** the directory in every hierarchy runc would join: each mounted
  v1 controller hierarchy (cpu, cpuacct, cpuset, memory, pids, blkio,
  devices, freezer, ... and ``name=systemd``), plus the cgroup2 one.  A new
  v1 cpuset cgroup starts with empty ``cpuset.cpus``/``cpuset.mems`` and
  refuses tasks, so each directory made gets its parent's values copied
  (runc's cpuset ``ensureParent``); on a unified host the cpuset, cpu,
  memory, io and pids controllers are enabled down to the parent (``+ctrl`` in each
  ``cgroup.subtree_control``, one at a time, failures ignored as in runc's
  fs2 ``CreateCgroupPath``: a cgroup that holds processes refuses them).
- **Move** processes by writing their PIDs to ``cgroup.procs`` (all their
  threads go).  ``joined()`` puts the *calling* process in for a while: the
  processes it starts meanwhile (proxy, QEMU, virtiofsd, shims) are born
  there, so everything they ever allocate is counted there (a v1 memory
  cgroup does not take over the charges of a task that moves in).
- **Remove** only the directories we made, deepest first, retrying while
  exiting tasks still hold them (EBUSY); an ancestor we made that another
  container now uses stays.  What is still inside the container's own
  cgroup after that wait is the container's and is SIGKILLed, as runc's
  ``delete --force`` kills every process in the cgroup.

**Limits** (:func:`host_limits`, written by :meth:`HostCgroup.limit`;
``[security] cgroup_limits = false`` leaves them out).  They bound the whole
VM on the host, so each is translated from the spec and the VM's size
rather than copied: the spec's limits are the container's *inside* the guest
(crun applies them there, and the VM is sized to hold them,
``resources.vm_size``).

- memory: the guest RAM the VM has (its base plus what hot-plug added for
  the spec's limit; raised before the VM grows on ``update``) plus the
  measured overhead of its host processes (:func:`vmm_overhead_mib`).  The
  spec's own limit on the host would OOM-kill QEMU, whose footprint is the
  guest's RAM plus its own.
- pids: a fixed bound (:data:`HOST_PIDS_MAX`) on the host tasks (QEMU's
  vCPU and I/O threads, virtiofsd's pools, the Python helpers): the spec's
  pids limit counts the container's processes, which live in the guest.
- CPU quota: ``(vCPUs + 1) x period`` (the period the spec's, else the
  kernel's 100 ms): each vCPU thread can use a host CPU, and one more is for
  QEMU's main loop and I/O, virtiofsd and the helpers.  The spec's quota is
  applied by crun in the guest and sizes the vCPUs
  (``ceil(quota/period)`` more); on the host it would throttle the vCPUs
  together with the guest kernel, the emulation and virtiofsd under a budget
  meant for the container's processes alone (under TCG, emulation is most
  of the work).
- CPU weight and cpuset as the spec gives them: ``cpu.shares`` on v1,
  ``cpu.weight`` on v2 converted as runc converts shares; ``cpuset.cpus`` /
  ``mems`` as given, so the VM runs where runc would have pinned the
  container (written once the VM is up: see :meth:`HostCgroup.limit`).
- A pod's sandbox cgroup (the shim v2) gets memory, pids and quota from its
  VM alone: the sandbox spec's weight and cpuset are the pause process's,
  and the kubelet's pod cgroup above carries the pod's.
- Not translated: the memory reservation and swap, block I/O, hugetlb,
  realtime CPU and network priorities (the container's, applied in the
  guest); kernel memory is dropped as runc drops it on cgroup v2.

Each limit is written in the hierarchy its controller lives in (v1 ``memory``,
``cpu``, ``cpuset``, ``pids``; or the cgroup2 directory's
``cgroup.controllers``).  A VM that outgrows its memory limit meets the
kernel's OOM killer in its own cgroup: the largest task there goes, which is
QEMU unless something else grew bigger; the proxy and shim see the VM die,
the engine sees the container exit, and ``delete`` cleans up.

Nothing here may break a container: a cgroup that cannot be made (a
read-only cgroupfs, no permission) is logged as one warning and the
processes stay where they are; so is a limit that cannot be written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import posixpath
import re
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from capsa.config import Config
from capsa.errors import CapsaError, InvalidArgument
from capsa.hypervisor.accel import resolve_accelerator
from capsa.runtime.resources import DEFAULT_CPU_PERIOD_US, merge_resources

log = logging.getLogger("capsa.hostcgroup")

MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")

#: The v1 controllers a hierarchy may carry (kernel/cgroup/cgroup.c's subsystems).
V1_CONTROLLERS = frozenset(
    {
        "cpuset",
        "cpu",
        "cpuacct",
        "blkio",
        "io",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "net_prio",
        "perf_event",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
    }
)
#: The one named v1 hierarchy runc joins.
SYSTEMD_HIERARCHY = "name=systemd"
#: cgroup v2 controllers enabled down to a new cgroup: what engines' stats read and the limits use.
V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")
#: The slice runc's systemd driver uses when the spec names none.
DEFAULT_SLICE = "system.slice"
DEFAULT_SCOPE_PREFIX = "runc"
REMOVE_TIMEOUT = 5.0

# Kata's test for the systemd form of a cgroupsPath: "slice:prefix:name".
_SYSTEMD_FORM = re.compile(r"^[\w.\-@]*\.slice:[\w.\-@]*:[\w.\-@]+$")


class Layout(StrEnum):
    UNIFIED = "unified"
    HYBRID = "hybrid"
    LEGACY = "legacy"
    NONE = "none"


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy (a line of mountinfo)."""

    version: int  # 1 or 2
    mountpoint: str
    root: str  # the cgroup the mount shows as its root (mountinfo field 4)
    controllers: frozenset[str] = frozenset()  # v1: "memory", "name=systemd"...; v2: empty
    read_only: bool = False

    @property
    def name(self) -> str:
        """The hierarchy as /proc/PID/cgroup names it: "cpu,cpuacct", "name=systemd", "" for v2."""
        return ",".join(sorted(self.controllers))


@dataclass(frozen=True)
class Hierarchies:
    layout: Layout
    mounts: tuple[Hierarchy, ...]

    def joined(self) -> tuple[Hierarchy, ...]:
        """The hierarchies a container's processes go into (runc's fs driver's set, plus cgroup2)."""
        return tuple(
            h
            for h in self.mounts
            if h.version == 2 or h.controllers & V1_CONTROLLERS or SYSTEMD_HIERARCHY in h.controllers
        )


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_mountinfo(text: str) -> Hierarchies:
    """The cgroup hierarchies of a mountinfo text (proc(5) "/proc/pid/mountinfo"), one mount each."""
    found: dict[frozenset[str] | None, Hierarchy] = {}
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        read_only = "ro" in fields[5].split(",")
        if tail[0] == "cgroup2":
            hierarchy = Hierarchy(2, _unescape(fields[4]), _unescape(fields[3]), read_only=read_only)
            key: frozenset[str] | None = None
        else:
            options = tail[2].split(",")
            controllers = frozenset(o for o in options if o in V1_CONTROLLERS or o.startswith("name="))
            if not controllers:
                continue
            hierarchy = Hierarchy(1, _unescape(fields[4]), _unescape(fields[3]), controllers, read_only)
            key = controllers
        # The same hierarchy mounted twice (a bind elsewhere): the first mount serves.
        found.setdefault(key, hierarchy)
    mounts = tuple(found.values())
    has_v1 = any(h.version == 1 and h.controllers & V1_CONTROLLERS for h in mounts)
    has_v2 = None in found
    layouts = {
        (True, True): Layout.HYBRID,
        (True, False): Layout.LEGACY,
        (False, True): Layout.UNIFIED,
        (False, False): Layout.NONE,
    }
    layout = layouts[has_v1, has_v2]
    if layout == Layout.UNIFIED:
        # name=systemd alone beside a unified mount is systemd's compatibility
        # hierarchy; runc's fs2 driver does not join it.
        mounts = tuple(h for h in mounts if h.version == 2)
    return Hierarchies(layout, mounts)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup (cgroups(7)): hierarchy name ("cpu,cpuacct", "name=systemd", "" for v2) → path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        name = ",".join(sorted(parts[1].split(","))) if parts[1] else ""
        paths[name] = parts[2]
    return paths


def clean_path(path: str) -> str:
    """runc's ``utils.CleanPath``: lexically clean, and a relative path cannot climb out with ``..``."""
    if not path:
        return ""
    cleaned = posixpath.normpath(path)
    if not posixpath.isabs(cleaned):
        cleaned = posixpath.relpath(posixpath.normpath("/" + cleaned), "/")
    return "" if cleaned == "." else cleaned.replace("//", "/")


def expand_slice(slice_name: str) -> str:
    """systemd's slice naming: ``a-b-c.slice`` → ``/a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` → ``/``."""
    suffix = ".slice"
    if len(slice_name) <= len(suffix) or not slice_name.endswith(suffix) or "/" in slice_name:
        raise InvalidArgument(f"invalid slice name: {slice_name}")
    stem = slice_name.removesuffix(suffix)
    if stem == "-":
        return "/"
    path, prefix = "", ""
    for component in stem.split("-"):
        if not component:
            raise InvalidArgument(f"invalid slice name: {slice_name}")
        path += f"/{prefix}{component}{suffix}"
        prefix += component + "-"
    return path


def looks_like_systemd(cgroups_path: str) -> bool:
    """Whether a cgroupsPath is in systemd's ``slice:prefix:name`` form (how Kata's shim v2 tells)."""
    return bool(_SYSTEMD_FORM.match(cgroups_path))


def resolve(cgroups_path: str, container_id: str | None, *, systemd: bool) -> str | None:
    """The cgroup a spec names: ``/abs/path``, or ``rel/path`` (under the caller's cgroup).

    ``container_id`` is for runc's default when the spec names none; without
    it no cgroupsPath means no cgroup (None).
    """
    if systemd:
        if not cgroups_path:
            if container_id is None:
                return None
            parent, prefix, name = DEFAULT_SLICE, DEFAULT_SCOPE_PREFIX, container_id
        else:
            parts = cgroups_path.split(":")
            if len(parts) != 3:
                raise InvalidArgument(
                    f'expected cgroupsPath to be of format "slice:prefix:name" for systemd cgroups, '
                    f"got {cgroups_path!r} instead"
                )
            parent, prefix, name = parts[0] or DEFAULT_SLICE, parts[1], parts[2]
            if not name or "/" in name or "/" in prefix:
                raise InvalidArgument(f"cgroupsPath {cgroups_path!r}: invalid unit name {name!r}")
        if name.endswith(".slice"):
            return expand_slice(name)
        slice_path = expand_slice(parent)
        return posixpath.join(slice_path, f"{prefix}-{name}.scope")
    if not cgroups_path:
        return container_id
    return clean_path(cgroups_path) or None


def directory_in(hierarchy: Hierarchy, cgroup: str, own: Mapping[str, str]) -> str:
    """Where ``cgroup`` (from :func:`resolve`) lives in one hierarchy.

    An absolute path is taken from the hierarchy's root, as runc's fs driver
    does; a relative one from our own cgroup there, shown relative to what
    the mount shows as its root (a cgroup namespace or a bind of a subtree).
    """
    if posixpath.isabs(cgroup):
        return posixpath.normpath(hierarchy.mountpoint + cgroup)
    mine = own.get(hierarchy.name, "/")
    if hierarchy.root != "/" and (mine == hierarchy.root or mine.startswith(hierarchy.root + "/")):
        mine = mine[len(hierarchy.root) :] or "/"
    return posixpath.normpath(posixpath.join(hierarchy.mountpoint + mine, cgroup))


@dataclass
class HostCgroup:
    """A cgroup capsa made for a container, one directory per hierarchy; stored in state.json.

    With limits, also what they were derived from (:meth:`limit`), so that
    ``update`` lays its resources over the earlier ones and never shrinks the VM's share.
    """

    cgroup: str = ""  # as resolved: "/libpod_parent/libpod-ID", "pod/ID"
    dirs: dict[str, str] = field(default_factory=dict)  # mountpoint → the container's directory
    created: list[str] = field(default_factory=list)  # what we made, parents before children
    # What of the OCI linux.resources the limits follow (SPEC_CPU_KEYS: the spec's, each update laid over).
    resources: dict[str, Any] = field(default_factory=dict)
    # The VM size the limits were written for; 0: no limits written.
    vcpus: int = 0
    memory_mib: int = 0
    # Host memory of the VM's processes beyond its guest RAM (vmm_overhead_mib).
    overhead_mib: int = 0

    def __bool__(self) -> bool:
        return bool(self.dirs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "dirs": dict(self.dirs),
            "created": list(self.created),
            "resources": dict(self.resources),
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "overhead_mib": self.overhead_mib,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> HostCgroup:
        if not data:
            return cls()
        resources = data.get("resources")
        return cls(
            str(data.get("cgroup", "")),
            dict(data.get("dirs") or {}),
            list(data.get("created") or []),
            dict(resources) if isinstance(resources, dict) else {},
            _count(data.get("vcpus")),
            _count(data.get("memory_mib")),
            _count(data.get("overhead_mib")),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> HostCgroup:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            return cls()

    # -- processes ------------------------------------------------------------

    def add(self, pids: Iterable[int]) -> None:
        """Move processes (with all their threads) in; one warning if some cannot go."""
        problems = []
        for pid in pids:
            if pid <= 0:
                continue
            for directory in self.dirs.values():
                try:
                    write_pid(directory, pid)
                except ProcessLookupError:
                    break  # it exited: nothing to account
                except OSError as exc:
                    problems.append(f"{pid} → {directory}: {exc.strerror}")
        if problems:
            log.warning("host cgroup %s: cannot move %s", self.cgroup, "; ".join(problems))

    @contextlib.contextmanager
    def joined(self, mountinfo: Path = MOUNTINFO, proc_cgroup: Path = PROC_CGROUP) -> Iterator[None]:
        """Hold the calling process in the cgroup for the block; the processes it starts stay there."""
        before = self.enter(mountinfo, proc_cgroup)
        try:
            yield
        finally:
            self.leave(before)

    def enter(self, mountinfo: Path = MOUNTINFO, proc_cgroup: Path = PROC_CGROUP) -> dict[str, str]:
        """Move the calling process in; the directories it came from, for :meth:`leave`."""
        if not self:
            return {}
        before = _own_dirs(self.dirs, mountinfo, proc_cgroup)
        self.add([os.getpid()])
        return before

    def leave(self, before: Mapping[str, str]) -> None:
        """Move the calling process back to the directories :meth:`enter` returned."""
        for directory in before.values():
            try:
                write_pid(directory, os.getpid())
            except OSError as exc:
                log.debug("cannot return to %s: %s", directory, exc.strerror)

    # -- limits ---------------------------------------------------------------

    def limit(
        self,
        resources: Mapping[str, Any],
        vcpus: int,
        memory_mib: int,
        overhead_mib: int,
        hierarchies: Hierarchies | None = None,
        *,
        pin: bool = True,
    ) -> HostLimits:
        """Write the limits for a VM of this size (:func:`host_limits`) and record what they follow.

        ``pin=False`` leaves the cpuset for later: before the VM boots, since
        the proxy gives the VM room for as many vCPUs as there are host CPUs
        it may run on, and a spec's cpuset names guest CPUs the VM must have.
        What cannot be written is one warning; the container goes on.
        """
        cpu = resources.get("cpu")
        followed = {k: v for k, v in cpu.items() if k in SPEC_CPU_KEYS} if isinstance(cpu, Mapping) else {}
        self.resources = {"cpu": followed} if followed else {}
        self.vcpus, self.memory_mib, self.overhead_mib = vcpus, memory_mib, overhead_mib
        limits = host_limits(resources, vcpus, memory_mib, overhead_mib)
        if not pin:
            limits = dataclasses.replace(limits, cpuset_cpus=None, cpuset_mems=None)
        problems = write_limits(self, limits, hierarchies)
        if problems:
            log.warning("host cgroup %s: limits not applied: %s", self.cgroup, "; ".join(problems))
        return limits

    def grow(
        self,
        resources: Mapping[str, Any],
        vcpus: int,
        memory_mib: int,
        overhead_mib: int,
        hierarchies: Hierarchies | None = None,
    ) -> HostLimits:
        """The limits after ``update``: its ``resources`` laid over the earlier ones, the VM never smaller.

        ``overhead_mib`` serves when none was recorded (limits were off at create).
        """
        return self.limit(
            merge_resources(self.resources, resources),
            max(self.vcpus, vcpus),
            max(self.memory_mib, memory_mib),
            self.overhead_mib or overhead_mib,
            hierarchies,
        )

    # -- removal --------------------------------------------------------------

    def remove(self, timeout: float = REMOVE_TIMEOUT) -> bool:
        """Remove what we made, deepest first; True when the container's directories are gone.

        A directory still busy after ``timeout`` holds processes that outlived
        the container's teardown; they are the container's (nothing else is
        put in a cgroup we made for it), so they get SIGKILL, as runc kills
        what is left in a container's cgroup.  Never raises.
        """
        leaves = set(self.dirs.values())
        deadline = time.monotonic() + timeout
        killed = False
        ok = True
        for path in reversed(self.created):
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if path not in leaves and exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        break  # a parent we made that another cgroup now uses
                    if exc.errno != errno.EBUSY:
                        log.warning("host cgroup %s: cannot remove %s: %s", self.cgroup, path, exc.strerror)
                        ok = False
                        break
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if not killed:
                    killed = True
                    deadline = time.monotonic() + 2.0
                    left = [pid for d in leaves for pid in _pids_in(d) if pid != os.getpid()]
                    log.warning("host cgroup %s: killing what is left in it: %s", self.cgroup, left)
                    for pid in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    continue
                log.warning("host cgroup %s: %s stays busy", self.cgroup, path)
                ok = False
                break
        return ok and not any(os.path.isdir(d) for d in leaves)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def write_pid(directory: str, pid: int) -> None:
    with open(os.path.join(directory, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _pids_in(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            return [int(line) for line in f.read().split()]
    except (OSError, ValueError):
        return []


def _own_dirs(dirs: Mapping[str, str], mountinfo: Path, proc_cgroup: Path) -> dict[str, str]:
    """The caller's current directory in each hierarchy of ``dirs`` (by mountpoint)."""
    hierarchies = {h.mountpoint: h for h in host_hierarchies(mountinfo).mounts}
    own = parse_proc_cgroup(_read(proc_cgroup))
    return {
        mountpoint: directory_in(hierarchies[mountpoint], ".", own) for mountpoint in dirs if mountpoint in hierarchies
    }


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def host_hierarchies(mountinfo: Path = MOUNTINFO) -> Hierarchies:
    return parse_mountinfo(_read(mountinfo))


#: A v1 memory limit at or above this is "no limit" (the kernel's PAGE_COUNTER_MAX, rounded down).
_V1_UNLIMITED = 1 << 62


def memory_limit_mib(cgroup: HostCgroup, hierarchies: Hierarchies | None = None) -> int | None:
    """The tightest memory limit the host puts on ``cgroup``, its own or an ancestor's, in MiB; None: none.

    With CRI that is the kubelet's pod cgroup limit (the sum of the
    containers' limits plus the RuntimeClass overhead) when every container
    of the pod has a memory limit.  v1: ``memory.stat``'s
    ``hierarchical_memory_limit``, which already takes the ancestors in;
    v2: the least ``memory.max`` from the cgroup up to the mount's root.
    """
    mounts = {h.mountpoint: h for h in (hierarchies or host_hierarchies()).mounts}
    limits: list[int] = []
    for mountpoint, directory in cgroup.dirs.items():
        hierarchy = mounts.get(mountpoint)
        if hierarchy is None:
            continue
        if hierarchy.version == 1 and "memory" in hierarchy.controllers:
            for line in _read(Path(directory, "memory.stat")).splitlines():
                key, _, value = line.partition(" ")
                if key == "hierarchical_memory_limit" and value.strip().isdigit():
                    limits.append(int(value))
        elif hierarchy.version == 2:
            level = directory
            while level.startswith(mountpoint.rstrip("/") + "/"):
                value = _read(Path(level, "memory.max")).strip()
                if value.isdigit():
                    limits.append(int(value))
                level = posixpath.dirname(level)
    limited = [limit for limit in limits if limit < _V1_UNLIMITED]
    return min(limited) // (1 << 20) if limited else None


# -- limits ---------------------------------------------------------------------
#
# The overhead figures were measured on this project's hosts (QEMU 7.2, TCG,
# 1024 MiB / 1 vCPU guest, template boot; docs/performance.md "Host cgroup
# limits"): `capsa run -d` of a busybox `sleep` with an absolute cgroupsPath,
# then the v1 memory cgroup's memory.usage_in_bytes less its memory.stat
# shmem (the guest RAM file the guest touched) and less the Rss of QEMU's
# rwx mappings (TCG's translated code), sampled every 0.2 s; the threads
# from pids.current and /proc/PID/status.
#
# - Idle: 228 MiB charged; 122 MiB guest RAM, 42 MiB translated code, 64 MiB
#   the rest (anon: QEMU 21, proxy 18, capsa-vmm 18, shim 16, the two
#   virtiofsd 1; 3 MiB kernel), and 23 tasks.
# - Under 8 detached `capsa exec ... sleep` plus 8 concurrent `capsa exec`s
#   of a shell walking the rootfs, three rounds (430 s): the rest peaked at
#   369 MiB with 24 processes in the cgroup (each exec shim 16 MiB anon,
#   each `capsa exec` about 20 MiB while it runs; QEMU's own grew to 140
#   MiB, 113 MiB of it TCG's metadata of the translated code), the
#   translated code reached QEMU's whole 1024 MiB buffer, and the tasks
#   peaked at 47.

#: Host memory of one VM's processes beyond its guest RAM, without TCG's
#: code buffer: QEMU's own heap and I/O buffers, virtiofsd, the Python
#: process serving the VM (the proxy, capsa-vmm and the shim; or the shim
#: v2), the kernel's page tables and slab: 64 MiB idle, doubled.
VMM_OVERHEAD_MIB = 128
#: A runc-CLI container's ``capsa exec`` helpers, born in its cgroup: room for
#: about a dozen at once (16 MiB an exec shim, 20 MiB a running ``capsa exec``).
EXEC_HEADROOM_MIB = 256
#: Under TCG: QEMU 7.2's code buffer (tcg/region.c, 1 GiB on 64-bit hosts when
#: ``-accel tcg`` has no ``tb-size``), which fills as the guest runs new code
#: and is flushed, not freed, when full; plus its metadata (113 MiB measured
#: with the buffer full).
TCG_CODE_MIB = 1024 + 128
#: pids.max of a VM's host cgroup.  Peak seen: 47 tasks (QEMU's 4 threads, the
#: virtiofsd's 2 to 4 each, the proxy's 5, capsa-vmm, the shim, 8 detached exec
#: shims, 8 running ``capsa exec``s and theirs).  The bound leaves room for
#: QEMU's I/O pool (64), virtiofsd's (64 each), a vCPU thread each up to q35's
#: 240, and a hundred execs.
HOST_PIDS_MAX = 1024
#: What of the spec's ``linux.resources.cpu`` the host limits follow; the rest is the VM's size.
SPEC_CPU_KEYS = ("period", "shares", "cpus", "mems")
#: cgroup v1 cpu.shares' range (kernel/sched: MIN_SHARES, MAX_SHARES).
_MIN_SHARES, _MAX_SHARES = 2, 262144


def vmm_overhead_mib(accelerator: str, *, exec_helpers: bool) -> int:
    """Host memory, MiB, a VM's host processes may take beyond its guest RAM; pure.

    ``exec_helpers``: the runc CLI's containers, whose ``capsa exec`` shims
    are born in the cgroup (the shim v2 relays a pod's execs itself).
    """
    overhead = VMM_OVERHEAD_MIB + (EXEC_HEADROOM_MIB if exec_helpers else 0)
    return overhead + (TCG_CODE_MIB if accelerator != "kvm" else 0)


def accelerator_of(config: Config) -> str:
    """The accelerator the sandbox's VM gets (the probe's cached verdict); "tcg", the costlier, when unsure."""
    try:
        accelerator: str = resolve_accelerator(config).accelerator
    except CapsaError as exc:
        log.debug("accelerator unknown for the host limits (%s): counting TCG's overhead", exc)
        return "tcg"
    return accelerator


@dataclass(frozen=True)
class HostLimits:
    """What capsa writes to a VM's host cgroup; None: left as it is."""

    memory_bytes: int
    pids: int
    cpu_period_us: int
    cpu_quota_us: int
    cpu_shares: int | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None

    @property
    def cpu_weight(self) -> int | None:
        return None if self.cpu_shares is None else cpu_weight(self.cpu_shares)


def cpu_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` as v2 ``cpu.weight``, the way runc converts them.

    runc's ``ConvertCPUSharesToCgroupV2Value``: [2, 262144] maps onto
    [1, 10000] linearly, ``1 + ((shares - 2) * 9999) / 262142``; shares
    outside the v1 range are first clamped to it, as the kernel does.
    """
    shares = min(max(shares, _MIN_SHARES), _MAX_SHARES)
    return 1 + ((shares - _MIN_SHARES) * 9999) // (_MAX_SHARES - _MIN_SHARES)


def host_limits(resources: Mapping[str, Any] | None, vcpus: int, memory_mib: int, overhead_mib: int) -> HostLimits:
    """The limits of the host cgroup of a VM with ``vcpus`` and ``memory_mib``; pure.

    ``resources`` is the container's ``linux.resources`` (config-linux.md
    "Control groups"), already checked (``resources.check_resources``); a
    pod's sandbox passes none.  The module docstring says why each limit is
    what it is.
    """
    cpu = (resources or {}).get("cpu") or {}
    period = cpu.get("period")
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        period = DEFAULT_CPU_PERIOD_US
    shares = cpu.get("shares")
    if not isinstance(shares, int) or isinstance(shares, bool) or shares <= 0:
        shares = None  # 0 is "not set" in runc
    cpus, mems = cpu.get("cpus"), cpu.get("mems")
    return HostLimits(
        memory_bytes=(memory_mib + overhead_mib) << 20,
        pids=HOST_PIDS_MAX,
        cpu_period_us=period,
        cpu_quota_us=(vcpus + 1) * period,
        cpu_shares=shares,
        cpuset_cpus=cpus if isinstance(cpus, str) and cpus.strip() else None,
        cpuset_mems=mems if isinstance(mems, str) and mems.strip() else None,
    )


def limit_files(limits: HostLimits, version: int, controllers: frozenset[str]) -> list[tuple[str, str, str]]:
    """The (controller, file, value) writes of ``limits`` in one hierarchy, in order; pure.

    ``controllers``: a v1 hierarchy's, or what a v2 directory's
    ``cgroup.controllers`` lists.  v1: memory.limit_in_bytes, pids.max,
    cpu.shares, cpu.cfs_period_us then cpu.cfs_quota_us, cpuset.cpus/mems
    (cgroup-v1/*.rst); v2: memory.max, pids.max, cpu.weight, cpu.max
    ("$QUOTA $PERIOD"), cpuset.cpus/mems (cgroup-v2.rst).
    """
    v1 = version == 1
    writes: list[tuple[str, str, str]] = []
    if "memory" in controllers:
        writes.append(("memory", "memory.limit_in_bytes" if v1 else "memory.max", str(limits.memory_bytes)))
    if "pids" in controllers:
        writes.append(("pids", "pids.max", str(limits.pids)))
    if "cpu" in controllers:
        if v1:
            if limits.cpu_shares is not None:
                writes.append(("cpu", "cpu.shares", str(limits.cpu_shares)))
            writes.append(("cpu", "cpu.cfs_period_us", str(limits.cpu_period_us)))
            writes.append(("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)))
        else:
            if limits.cpu_weight is not None:
                writes.append(("cpu", "cpu.weight", str(limits.cpu_weight)))
            writes.append(("cpu", "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}"))
    if "cpuset" in controllers:
        if limits.cpuset_cpus is not None:
            writes.append(("cpuset", "cpuset.cpus", limits.cpuset_cpus))
        if limits.cpuset_mems is not None:
            writes.append(("cpuset", "cpuset.mems", limits.cpuset_mems))
    return writes


def write_limits(cgroup: HostCgroup, limits: HostLimits, hierarchies: Hierarchies | None = None) -> list[str]:
    """Write ``limits`` in each of ``cgroup``'s directories whose hierarchy has the controller; the problems.

    A write the kernel refuses is tried once more after the others, as runc
    retries ``cpu.cfs_period_us`` after the quota (a shorter period can be
    refused until the quota fits it).  A v1 quota refused with EINVAL is
    above an ancestor's (a kubelet's pod cgroup with a CPU limit, say):
    that tighter one bounds the VM already, and it is no problem.  A
    controller no directory has is a problem too.  Never raises.
    """
    mounts = {h.mountpoint: h for h in (hierarchies or host_hierarchies()).mounts}
    wanted = {"memory", "pids", "cpu"}
    if limits.cpuset_cpus is not None or limits.cpuset_mems is not None:
        wanted.add("cpuset")
    covered: set[str] = set()
    writes: list[tuple[str, str]] = []  # (path, value)
    for mountpoint, directory in cgroup.dirs.items():
        hierarchy = mounts.get(mountpoint)
        if hierarchy is None:
            continue
        if hierarchy.version == 1:
            controllers = hierarchy.controllers
        else:
            controllers = frozenset(_read(Path(directory, "cgroup.controllers")).split())
        for controller, name, value in limit_files(limits, hierarchy.version, controllers):
            covered.add(controller)
            writes.append((os.path.join(directory, name), value))
    problems = [f"no {controller} controller" for controller in sorted(wanted - covered)]
    failed: list[tuple[str, str]] = []
    for path, value in writes:
        try:
            _write(path, value)
        except OSError:
            failed.append((path, value))
    for path, value in failed:
        try:
            _write(path, value)
        except OSError as exc:
            if exc.errno == errno.EINVAL and path.endswith("/cpu.cfs_quota_us"):
                log.debug("host cgroup %s: %s = %s: an ancestor's quota is tighter", cgroup.cgroup, path, value)
                continue
            problems.append(f"{path} = {value}: {exc.strerror or exc}")
    return problems


def _write(path: str, value: str) -> None:
    # No O_CREAT: a cgroupfs file that is not there is not made up.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def create(
    cgroup: str,
    hierarchies: Hierarchies,
    own: Mapping[str, str],
) -> HostCgroup:
    """Make ``cgroup`` in every hierarchy a container joins; one warning for those that cannot be made."""
    made = HostCgroup(cgroup)
    problems = []
    for hierarchy in hierarchies.joined():
        directory = directory_in(hierarchy, cgroup, own)
        if hierarchy.read_only:
            problems.append(f"{hierarchy.mountpoint} is read-only")
            continue
        try:
            _make(hierarchy, directory, made.created)
            if hierarchies.layout == Layout.UNIFIED:
                _enable_controllers(hierarchy.mountpoint, directory)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror}")
            continue
        made.dirs[hierarchy.mountpoint] = directory
    if problems:
        log.warning(
            "host cgroup %s: cannot make it in every hierarchy (%s): the VM's processes there stay where they are",
            cgroup,
            "; ".join(problems),
        )
    return made


def _make(hierarchy: Hierarchy, directory: str, created: list[str]) -> None:
    """mkdir -p within the hierarchy, noting each directory made; a v1 cpuset gets its parent's CPUs and nodes."""
    missing = []
    path = directory
    while not os.path.isdir(path) and path != hierarchy.mountpoint and path not in ("/", ""):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            continue  # a concurrent create made it: not ours to remove
        created.append(path)
        if "cpuset" in hierarchy.controllers:
            _copy_cpuset(path)


def _copy_cpuset(path: str) -> None:
    """A new v1 cpuset cgroup has no CPUs or memory nodes and refuses tasks until it gets its parent's."""
    parent = os.path.dirname(path)
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = os.path.join(path, name)
        if _read(Path(mine)).strip():
            continue
        with open(os.path.join(parent, name)) as f:
            value = f.read().strip()
        with open(mine, "w") as f:
            f.write(value)


def _enable_controllers(mountpoint: str, directory: str) -> None:
    """Enable the controllers capsa uses in each cgroup from the root down to ``directory``'s parent.

    cgroup-v2.rst "Enabling and Disabling": a controller is available in a
    cgroup only if its parent enabled it in ``cgroup.subtree_control``.  A
    cgroup that holds processes refuses (EBUSY, "no internal processes"): as
    runc does, each is tried alone and a refusal is ignored.
    """
    relative = os.path.relpath(os.path.dirname(directory), mountpoint)
    steps = [] if relative == "." else relative.split("/")
    current = mountpoint
    for step in [None, *steps]:
        if step is not None:
            current = os.path.join(current, step)
        available = _read(Path(current) / "cgroup.controllers").split()
        enabled = _read(Path(current) / "cgroup.subtree_control").split()
        for controller in V2_CONTROLLERS:
            if controller in available and controller not in enabled:
                try:
                    with open(os.path.join(current, "cgroup.subtree_control"), "w") as f:
                        f.write(f"+{controller}")
                except OSError as exc:
                    log.debug("cannot enable %s in %s: %s", controller, current, exc.strerror)


def setup(
    cgroups_path: str,
    container_id: str | None,
    *,
    systemd: bool,
    mountinfo: Path = MOUNTINFO,
    proc_cgroup: Path = PROC_CGROUP,
) -> HostCgroup:
    """Resolve and make the container's host cgroup; an empty one when there is none to make.

    A malformed systemd cgroupsPath is the caller's error (InvalidArgument,
    as runc refuses it); everything the host refuses is a warning.
    """
    cgroup = resolve(cgroups_path, container_id, systemd=systemd)
    if cgroup is None:
        return HostCgroup()
    hierarchies = host_hierarchies(mountinfo)
    if hierarchies.layout == Layout.NONE:
        log.debug("no cgroup hierarchy is mounted: no host cgroup for %s", cgroup)
        return HostCgroup(cgroup)
    return create(cgroup, hierarchies, parse_proc_cgroup(_read(proc_cgroup)))


def describe_host(mountinfo: Path = MOUNTINFO) -> str:
    """One line for ``capsa check``: the layout and the hierarchies a container joins."""
    hierarchies = host_hierarchies(mountinfo)
    if hierarchies.layout == Layout.NONE:
        return "no cgroup hierarchy mounted"
    names = [h.name or "cgroup2" for h in hierarchies.joined()]
    read_only = [h.mountpoint for h in hierarchies.joined() if h.read_only]
    text = f"{hierarchies.layout.value} ({', '.join(names)})"
    if read_only:
        text += f"; read-only: {', '.join(read_only)}"
    return text


def spec_cgroups_path(spec: Mapping[str, Any]) -> str:
    linux = spec.get("linux")
    value = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    return value if isinstance(value, str) else ""
