"""Admission: a VM starts only if the host can hold it.

A guest's RAM is host memory the moment the guest touches it, and an idle
guest keeps what it touched (page cache included).  Starting VMs past what
the host has ends in swapping or in the OOM killer choosing among the
host's own work.  So before a sandbox starts anything, its guest memory is
weighed against the host's ``MemAvailable`` (proc(5): what can be had
without swapping) less ``[runtime] host_memory_reserve_mib``; a VM that does
not fit is refused with the numbers, and nothing is started.

Concurrent creates each see the memory the others have not touched yet:
the check bounds the common case (one VM too many), not a burst of creates
on a nearly full host.
"""

from __future__ import annotations

from pathlib import Path

from capsa.errors import CapsaError

MEMINFO = Path("/proc/meminfo")


class AdmissionError(CapsaError):
    """The host cannot hold another VM of this size."""


def available_mib(meminfo: str) -> int | None:
    """``MemAvailable`` in MiB from a ``/proc/meminfo`` text, or None if it has none."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


def refusal(guest_mib: int, available: int | None, reserve_mib: int) -> str | None:
    """Why a VM of ``guest_mib`` may not start, or None when it may; pure."""
    if reserve_mib <= 0 or available is None:
        return None
    room = available - reserve_mib
    if guest_mib <= room:
        return None
    return (
        f"not enough host memory for a {guest_mib} MiB VM: {available} MiB available, "
        f"{reserve_mib} MiB of it kept in reserve ([runtime] host_memory_reserve_mib), "
        f"short by {guest_mib - max(room, 0)} MiB"
    )


def admit(guest_mib: int, reserve_mib: int) -> None:
    """Raise :class:`AdmissionError` unless the host can hold ``guest_mib`` more."""
    try:
        available = available_mib(MEMINFO.read_text())
    except OSError:
        available = None
    why = refusal(guest_mib, available, reserve_mib)
    if why is not None:
        raise AdmissionError(why)
