"""Container resources (OCI ``linux.resources``) and the VM size they need, as pure functions.

``capsa update`` takes the new limits the way runc does: an OCI
``linux.resources`` object (runtime-spec config-linux.md "Control groups")
from ``--resources FILE`` or ``-`` (stdin), and/or runc's update flags
(``--memory``, ``--cpu-quota``, ...).  :func:`parse_update_flags` turns the
flags into the same object; :func:`merge_resources` lays them over the file.

The limits apply to the container's cgroup in the guest (``crun update``),
but a cgroup inside a VM cannot use more than the VM has: the VM grows to fit
(CPU and memory hot-plug).  :func:`vm_size` computes how big, the way Kata
Containers sizes its sandboxes: the configured base, plus
``ceil(quota / period)`` vCPUs for a CFS quota, plus the memory limit.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from capsa.errors import InvalidArgument

log = logging.getLogger("capsa.resources")

#: The kernel's default CFS period (Documentation/scheduler/sched-bwc.rst):
#: what a quota means when no period is given.
DEFAULT_CPU_PERIOD_US = 100_000

_MiB = 1 << 20

# docker/go-units RAMInBytes, which runc's --memory flags use: a decimal
# number, an optional unit k, m, g, t, p (powers of 1024, any case), an
# optional "i" and "b"; "512m", "1.5G", "100MiB", "64 k".
_RAM_RE = re.compile(r"^(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$")
_RAM_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class VMSize(NamedTuple):
    """A VM's size: online vCPUs and RAM in MiB."""

    vcpus: int
    memory_mib: int


def ram_in_bytes(text: str) -> int:
    """A memory size as runc's update flags read it (docker/go-units ``RAMInBytes``).

    ``-1`` means unlimited and is returned as -1.
    """
    value = text.strip()
    if value == "-1":
        return -1
    match = _RAM_RE.match(value)
    if match is None:
        raise InvalidArgument(f"invalid size {text!r}: expected bytes or a number with a unit (k, m, g, t, p)")
    number, unit = match.groups()
    try:
        amount = float(number)
    except ValueError:
        raise InvalidArgument(f"invalid size {text!r}") from None
    return int(amount * _RAM_UNITS[(unit or "").lower()])


def _unsigned(flag: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise InvalidArgument(f"invalid value for --{flag}: {text!r} is not an integer") from None
    if value < 0:
        raise InvalidArgument(f"invalid value for --{flag}: {text} is negative")
    return value


def _signed(flag: str, text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidArgument(f"invalid value for --{flag}: {text!r} is not an integer") from None


def parse_update_flags(
    *,
    blkio_weight: int | None = None,
    cpu_period: str | None = None,
    cpu_quota: str | None = None,
    cpu_burst: str | None = None,
    cpu_share: str | None = None,
    cpu_rt_period: str | None = None,
    cpu_rt_runtime: str | None = None,
    cpuset_cpus: str | None = None,
    cpuset_mems: str | None = None,
    cpu_idle: str | None = None,
    memory: str | None = None,
    memory_reservation: str | None = None,
    memory_swap: str | None = None,
    pids_limit: int | None = None,
) -> dict[str, Any]:
    """runc's ``update`` flags as an OCI ``linux.resources`` object; ``None`` is "not given".

    Follows runc's update.go: a blkio weight or pids limit of 0 means "leave
    it" (runc's flag default), memory sizes take go-units suffixes and -1
    (unlimited), CPU times are microseconds, ``--cpu-share`` is ``cpu.shares``.
    Only what was given appears in the result.
    """
    resources: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        resources.setdefault(section, {})[key] = value

    if blkio_weight:
        if not 10 <= blkio_weight <= 1000:
            raise InvalidArgument(f"invalid value for --blkio-weight: {blkio_weight} is not from 10 to 1000")
        put("blockIO", "weight", blkio_weight)
    for flag, key, text in (
        ("cpu-period", "period", cpu_period),
        ("cpu-burst", "burst", cpu_burst),
        ("cpu-share", "shares", cpu_share),
        ("cpu-rt-period", "realtimePeriod", cpu_rt_period),
    ):
        if text:
            put("cpu", key, _unsigned(flag, text))
    for flag, key, text in (("cpu-quota", "quota", cpu_quota), ("cpu-rt-runtime", "realtimeRuntime", cpu_rt_runtime)):
        if text:
            put("cpu", key, _signed(flag, text))
    if cpu_idle:
        put("cpu", "idle", _signed("cpu-idle", cpu_idle))
    if cpuset_cpus:
        cpu_indices(cpuset_cpus)  # refuse a malformed list here, not in the guest
        put("cpu", "cpus", cpuset_cpus)
    if cpuset_mems:
        put("cpu", "mems", cpuset_mems)
    for flag, key, text in (
        ("memory", "limit", memory),
        ("memory-reservation", "reservation", memory_reservation),
        ("memory-swap", "swap", memory_swap),
    ):
        if text:
            try:
                put("memory", key, ram_in_bytes(text))
            except InvalidArgument as exc:
                raise InvalidArgument(f"invalid value for --{flag}: {exc}") from None
    if pids_limit:
        put("pids", "limit", pids_limit)
    return resources


def merge_resources(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``, one level deep (``memory.limit`` replaces only that key).

    runc ignores its flags when ``--resources`` is given; capsa applies both,
    the flags winning, which gives the same result whenever only one is used.
    """
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for section, value in override.items():
        current = merged.get(section)
        if isinstance(current, dict) and isinstance(value, Mapping):
            merged[section] = {**current, **value}
        else:
            merged[section] = copy.deepcopy(value)
    return merged


def check_resources(resources: Any) -> dict[str, Any]:
    """A ``linux.resources`` object as read from JSON, with the fields capsa reads checked.

    The guest's crun checks the rest; here only what sizing the VM and the
    host cgroup's limits depend on must have the spec's types
    (config-linux.md "Memory", "CPU").  Kernel memory limits are left out
    with a warning (:func:`without_kernel_memory`).
    """
    if not isinstance(resources, dict):
        raise InvalidArgument("the resources must be a JSON object (an OCI linux.resources)")
    for section in ("memory", "cpu", "pids", "blockIO"):
        if section in resources and resources[section] is not None and not isinstance(resources[section], dict):
            raise InvalidArgument(f"resources: {section} must be an object")
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    for where, table, key in (
        ("memory", memory, "limit"),
        ("cpu", cpu, "quota"),
        ("cpu", cpu, "period"),
        ("cpu", cpu, "shares"),
    ):
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidArgument(f"resources: {where}.{key} must be an integer, got {value!r}")
    cpus = cpu.get("cpus")
    if cpus is not None:
        if not isinstance(cpus, str):
            raise InvalidArgument(f"resources: cpu.cpus must be a string, got {cpus!r}")
        cpu_indices(cpus)
    mems = cpu.get("mems")
    if mems is not None and not isinstance(mems, str):
        raise InvalidArgument(f"resources: cpu.mems must be a string, got {mems!r}")
    return without_kernel_memory(resources, "resources")


#: config-linux.md "Memory": kernel and kernelTCP, deprecated; cgroup v2 has neither.
KERNEL_MEMORY_KEYS = ("kernel", "kernelTCP")


def without_kernel_memory(resources: dict[str, Any], where: str) -> dict[str, Any]:
    """``resources`` without kernel memory limits, with a warning if it had any.

    runc warns and goes on ("kernel memory settings are ignored"); the guest
    is cgroup v2, where crun refuses the whole container instead ("cannot
    set kernel memory with cgroupv2").  ``where`` names the object in the
    warning.  The input is not modified.
    """
    memory = resources.get("memory")
    if not isinstance(memory, dict):
        return resources
    given = [key for key in KERNEL_MEMORY_KEYS if memory.get(key) is not None]
    if not given:
        return resources
    log.warning(
        "%s: memory.%s ignored: kernel memory limits do not exist on cgroup v2 (as runc ignores them)",
        where,
        " and memory.".join(given),
    )
    return {**resources, "memory": {k: v for k, v in memory.items() if k not in KERNEL_MEMORY_KEYS}}


def cpu_indices(cpus: str) -> frozenset[int]:
    """The CPUs of a cpuset list (cpuset(7) "List format": ``0-3,8,10-11``)."""
    found: set[int] = set()
    for part in cpus.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if last else lo
        except ValueError:
            raise InvalidArgument(f"invalid cpuset {cpus!r}: {part!r} is not a CPU number or range") from None
        if lo < 0 or hi < lo:
            raise InvalidArgument(f"invalid cpuset {cpus!r}: bad range {part!r}")
        found.update(range(lo, hi + 1))
    return frozenset(found)


def vm_size(
    resources: Mapping[str, Any] | None,
    base_vcpus: int,
    base_memory_mib: int,
    *,
    max_vcpus: int | None = None,
    max_memory_mib: int | None = None,
) -> VMSize:
    """How big the VM must be for a container with ``resources``; pure.

    As Kata Containers does: the VM keeps its base size for the guest's own
    needs and gets, on top, ``ceil(quota / period)`` vCPUs for a CFS quota
    (period defaulting to the kernel's 100 ms) and the container's memory
    limit.  A cpuset naming CPU N also needs N + 1 vCPUs: the cgroup cannot
    use a CPU the guest does not have.  No quota or an unlimited (-1)
    memory limit adds nothing.  The result is capped by the maxima (None:
    uncapped); the VM never shrinks below its base.
    """
    vcpus, memory_mib = base_vcpus, base_memory_mib
    if resources:
        checked = check_resources(dict(resources))
        cpu = checked.get("cpu") or {}
        quota = cpu.get("quota")
        period = cpu.get("period") or DEFAULT_CPU_PERIOD_US
        if quota is not None and quota > 0 and period > 0:
            vcpus = base_vcpus + math.ceil(quota / period)
        if cpu.get("cpus"):
            indices = cpu_indices(cpu["cpus"])
            if indices:
                vcpus = max(vcpus, max(indices) + 1)
        limit = (checked.get("memory") or {}).get("limit")
        if limit is not None and limit > 0:
            memory_mib = base_memory_mib + -(-limit // _MiB)
    if max_vcpus is not None:
        vcpus = min(vcpus, max(max_vcpus, base_vcpus))
    if max_memory_mib is not None:
        memory_mib = min(memory_mib, max(max_memory_mib, base_memory_mib))
    return VMSize(vcpus, memory_mib)
