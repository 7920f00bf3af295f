"""Admission: a VM the host cannot hold is refused, with the numbers."""

from __future__ import annotations

from capsa.runtime.admission import available_mib, refusal

MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4194304 kB\n"


def test_available_memory_is_read_from_meminfo() -> None:
    assert available_mib(MEMINFO) == 4096
    assert available_mib("MemTotal: 1 kB\n") is None


def test_a_vm_that_fits_beside_the_reserve_is_admitted() -> None:
    assert refusal(1024, 4096, 1024) is None
    assert refusal(3072, 4096, 1024) is None


def test_one_that_does_not_is_refused_naming_the_shortfall() -> None:
    why = refusal(1024, 1500, 1024)
    assert why is not None
    assert "1024 MiB VM" in why and "1500 MiB available" in why and "short by 548 MiB" in why
    assert "host_memory_reserve_mib" in why


def test_no_reserve_or_no_figure_checks_nothing() -> None:
    assert refusal(1 << 20, 10, 0) is None
    assert refusal(1 << 20, None, 1024) is None
