"""runc's update flags and the VM size a container's resources need, as data."""

from __future__ import annotations

from typing import Any

import pytest

from capsa.errors import InvalidArgument
from capsa.runtime.resources import (
    VMSize,
    check_resources,
    cpu_indices,
    merge_resources,
    parse_update_flags,
    ram_in_bytes,
    vm_size,
)

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1024", 1024),
        ("512m", 512 * MiB),
        ("512M", 512 * MiB),
        ("1g", 1 << 30),
        ("1.5GB", 3 << 29),
        ("64 k", 64 << 10),
        ("100MiB", 100 * MiB),
        ("-1", -1),
    ],
)
def test_memory_sizes_read_like_runc(text: str, value: int) -> None:
    assert ram_in_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12x", "-2", "1.2.3m", "m"])
def test_bad_memory_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        ram_in_bytes(text)


def test_flags_become_an_oci_resources_object() -> None:
    resources = parse_update_flags(
        blkio_weight=500,
        cpu_period="100000",
        cpu_quota="150000",
        cpu_share="512",
        cpuset_cpus="0-1",
        cpuset_mems="0",
        memory="256m",
        memory_swap="-1",
        memory_reservation="128m",
        pids_limit=100,
    )
    assert resources == {
        "blockIO": {"weight": 500},
        "cpu": {"period": 100000, "quota": 150000, "shares": 512, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 256 * MiB, "swap": -1, "reservation": 128 * MiB},
        "pids": {"limit": 100},
    }


def test_flags_not_given_are_left_out() -> None:
    # runc's flag defaults: 0 for blkio weight and pids limit means "leave it".
    assert parse_update_flags() == {}
    assert parse_update_flags(blkio_weight=0, pids_limit=0, memory="") == {}
    assert parse_update_flags(cpu_quota="-1") == {"cpu": {"quota": -1}}  # unlimited


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"cpu_period": "ten"}, "--cpu-period"),
        ({"cpu_share": "-5"}, "--cpu-share"),
        ({"memory": "lots"}, "--memory"),
        ({"blkio_weight": 5}, "--blkio-weight"),
        ({"cpuset_cpus": "1-0"}, "cpuset"),
    ],
)
def test_bad_flags_name_the_flag(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_update_flags(**flags)


def test_flags_are_laid_over_the_resources_file() -> None:
    base = {"memory": {"limit": 1, "swap": 2}, "pids": {"limit": 5}}
    merged = merge_resources(base, {"memory": {"limit": 3}, "cpu": {"shares": 2}})
    assert merged == {"memory": {"limit": 3, "swap": 2}, "pids": {"limit": 5}, "cpu": {"shares": 2}}
    assert base == {"memory": {"limit": 1, "swap": 2}, "pids": {"limit": 5}}  # not modified


def test_cpuset_lists() -> None:
    assert cpu_indices("0-3,8,10-11") == frozenset({0, 1, 2, 3, 8, 10, 11})
    assert cpu_indices("") == frozenset()
    with pytest.raises(InvalidArgument):
        cpu_indices("a-b")


@pytest.mark.parametrize(
    ("resources", "size"),
    [
        (None, VMSize(1, 1024)),
        ({}, VMSize(1, 1024)),
        # Kata's sizing: base + ceil(quota / period) vCPUs, base + limit.
        ({"cpu": {"quota": 150000, "period": 100000}}, VMSize(3, 1024)),
        ({"cpu": {"quota": 50000}}, VMSize(2, 1024)),  # the kernel's default period
        ({"cpu": {"quota": -1, "period": 100000}}, VMSize(1, 1024)),  # unlimited adds nothing
        ({"memory": {"limit": 512 * MiB}}, VMSize(1, 1536)),
        ({"memory": {"limit": 100 * MiB + 1}}, VMSize(1, 1125)),  # whole MiB, rounded up
        ({"memory": {"limit": -1}}, VMSize(1, 1024)),
        # A cpuset needs the CPUs it names.
        ({"cpu": {"cpus": "3"}}, VMSize(4, 1024)),
        ({"cpu": {"cpus": "0", "quota": 200000, "period": 100000}}, VMSize(3, 1024)),
    ],
)
def test_vm_size(resources: dict[str, Any] | None, size: VMSize) -> None:
    assert vm_size(resources, 1, 1024) == size


def test_vm_size_is_capped_by_the_maxima_but_never_below_the_base() -> None:
    huge = {"cpu": {"quota": 10_000_000, "period": 100000}, "memory": {"limit": 1 << 40}}
    assert vm_size(huge, 1, 1024, max_vcpus=4, max_memory_mib=4096) == VMSize(4, 4096)
    assert vm_size(huge, 2, 2048, max_vcpus=1, max_memory_mib=1024) == VMSize(2, 2048)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ([], "JSON object"),
        ({"memory": 5}, "memory must be an object"),
        ({"memory": {"limit": "1g"}}, "memory.limit must be an integer"),
        ({"cpu": {"quota": True}}, "cpu.quota"),
        ({"cpu": {"cpus": 3}}, "cpu.cpus must be a string"),
    ],
)
def test_resources_with_wrong_types_are_refused(resources: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_resources(resources)
