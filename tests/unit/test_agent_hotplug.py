"""Onlining hot-plugged CPUs and memory, on a sysfs-shaped tree; and crun update's command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsa.agent import crun, hotplug
from capsa.errors import BundleError


def sysfs(tmp_path: Path) -> tuple[Path, Path]:
    cpus = tmp_path / "cpu"
    memory = tmp_path / "memory"
    (cpus / "cpu0").mkdir(parents=True)  # the boot CPU has no "online" file
    for index, state in ((1, "1"), (2, "0"), (10, "0")):
        (cpus / f"cpu{index}").mkdir()
        (cpus / f"cpu{index}" / "online").write_text(state + "\n")
    (cpus / "cpufreq").mkdir()  # not a CPU
    (cpus / "online").write_text("0-1\n")  # the list file, not a CPU
    for index, state in ((0, "online"), (8, "offline"), (9, "offline")):
        (memory / f"memory{index}").mkdir(parents=True)
        (memory / f"memory{index}" / "state").write_text(state + "\n")
    (memory / "auto_online_blocks").write_text("online\n")
    return cpus, memory


def test_offline_cpus_and_memory_blocks_are_found_in_order(tmp_path: Path) -> None:
    cpus, memory = sysfs(tmp_path)
    assert hotplug.offline_cpus(str(cpus)) == [str(cpus / "cpu2" / "online"), str(cpus / "cpu10" / "online")]
    assert hotplug.offline_memory_blocks(str(memory)) == [
        str(memory / "memory8" / "state"),
        str(memory / "memory9" / "state"),
    ]


def test_everything_offline_is_brought_online(tmp_path: Path) -> None:
    cpus, memory = sysfs(tmp_path)
    assert hotplug.online_hotplugged(str(cpus), str(memory)) == (2, 2)
    assert (cpus / "cpu2" / "online").read_text() == "1"
    assert (memory / "memory9" / "state").read_text() == "online"
    assert hotplug.online_hotplugged(str(cpus), str(memory)) == (0, 0)  # nothing left to do


def test_missing_sysfs_directories_mean_nothing_to_online(tmp_path: Path) -> None:
    assert hotplug.online_hotplugged(str(tmp_path / "no-cpu"), str(tmp_path / "no-memory")) == (0, 0)


def test_update_argv_passes_the_resources_file() -> None:
    c = crun.Crun(binary="/usr/bin/crun", root="/run/crun")
    assert crun.update_argv(c, "/log", "c1", "/b/resources.json") == [
        "/usr/bin/crun",
        "--root",
        "/run/crun",
        "--log=file:/log",
        "--log-format=json",
        "update",
        "--resources=/b/resources.json",
        "--",
        "c1",
    ]


def test_resources_must_be_a_json_object() -> None:
    assert crun.load_resources(json.dumps({"memory": {"limit": 1}}).encode()) == {"memory": {"limit": 1}}
    with pytest.raises(BundleError, match="not valid JSON"):
        crun.load_resources(b"{")
    with pytest.raises(BundleError, match="JSON object"):
        crun.load_resources(b"[]")
