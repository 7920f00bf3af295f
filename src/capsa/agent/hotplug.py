"""Bringing hot-plugged CPUs and memory online in the guest.

The host grows a VM by ACPI hot-plug (:meth:`capsa.hypervisor.qemu.QemuHypervisor.resize`).
The guest kernel adds a hot-plugged CPU *offline* (on a distribution, a udev
rule onlines it; the guest has no udev), and onlines hot-added memory itself
only with ``CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE`` (capsa's kernel has it;
Debian's cloud kernel fallback may not).  So the agent onlines whatever is
offline before it applies limits that may need it (UpdateContainer):
``/sys/devices/system/cpu/cpuN/online`` (Documentation/core-api/cpu_hotplug.rst)
and ``/sys/devices/system/memory/memoryN/state``
(Documentation/admin-guide/mm/memory-hotplug.rst, "Onlining and Offlining
Memory Blocks").

Nothing is ever taken offline: VMs only grow.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("capsa.agent")

CPU_DIR = "/sys/devices/system/cpu"
MEMORY_DIR = "/sys/devices/system/memory"

_CPU_RE = re.compile(r"^cpu(\d+)$")
_MEMORY_RE = re.compile(r"^memory(\d+)$")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return ""


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w", encoding="ascii") as file:
            file.write(value)
    except OSError as exc:
        log.warning("cannot write %r to %s: %s", value, path, exc.strerror)
        return False
    return True


def offline_cpus(cpu_dir: str = CPU_DIR) -> list[str]:
    """``online`` files of present CPUs that are offline (CPU 0 has none: it cannot go offline)."""
    found = []
    for name in _sorted_entries(cpu_dir, _CPU_RE):
        online = os.path.join(cpu_dir, name, "online")
        if _read(online) == "0":
            found.append(online)
    return found


def offline_memory_blocks(memory_dir: str = MEMORY_DIR) -> list[str]:
    """``state`` files of memory blocks that are offline."""
    found = []
    for name in _sorted_entries(memory_dir, _MEMORY_RE):
        state = os.path.join(memory_dir, name, "state")
        if _read(state) == "offline":
            found.append(state)
    return found


def _sorted_entries(directory: str, pattern: re.Pattern[str]) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    matched = [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]
    return [name for _, name in sorted(matched)]


def online_hotplugged(cpu_dir: str = CPU_DIR, memory_dir: str = MEMORY_DIR) -> tuple[int, int]:
    """Online every offline CPU and memory block; return how many of each came online.

    Memory first: a CPU brought up needs per-CPU memory, and memory that
    failed to online is logged, not fatal (the limits that follow then fail
    in crun's words if they cannot be met).
    """
    memory = sum(_write(state, "online") for state in offline_memory_blocks(memory_dir))
    cpus = sum(_write(online, "1") for online in offline_cpus(cpu_dir))
    if memory or cpus:
        log.debug("onlined %d hot-plugged CPUs and %d memory blocks", cpus, memory)
    return cpus, memory
