"""Sandboxes restored from a VM template: real VMs (TCG here), a private cache.

Two clones of one template must be two machines as far as anything inside
can tell (RNG output, wall clock), run their containers on their own rootfs
over virtio-fs, and a template that no longer restores must cost nothing
but time: the sandbox boots cold instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Capsa

from capsa.config import cache_dir
from capsa.hypervisor import template
from capsa.protocols import agent_pb2 as pb
from capsa.proxy.launch import ProxyClient
from capsa.runtime.state import StateStore

pytestmark = pytest.mark.vm

REPORT = (
    "cat /hello; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; "
    "cat /proc/sys/kernel/random/boot_id; echo written > /written"
)


@pytest.fixture
def template_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache directory of the test's own, so it makes (and corrupts) its own template."""
    cache = Path(os.environ.get("CAPSA_TEST_CACHE") or tmp_path / "cache")
    cache.mkdir(parents=True, exist_ok=True)
    accel = cache_dir() / "accel.json"
    if accel.exists():
        shutil.copy(accel, cache / "accel.json")  # skip re-probing the accelerator
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(cache))
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def current_generation(cache: Path) -> Path:
    """The generation of the one template in ``cache`` that serves sandboxes now."""
    [key] = [p for p in (cache / "templates").iterdir() if p.is_dir() and not p.name.endswith(".new")]
    return key / os.readlink(key / template.CURRENT_LINK)


def run(capsa: Capsa, config: Path, tmp_path: Path, name: str) -> tuple[list[str], dict[str, float]]:
    timings = tmp_path / f"{name}.json"
    os.environ["CAPSA_TIMINGS"] = str(timings)
    try:
        result = capsa("--config", str(config), "run", "--bundle", str(capsa.bundle), name)
    finally:
        del os.environ["CAPSA_TIMINGS"]
    assert result.code == 0, result.stderr
    assert (capsa.bundle / "rootfs" / "written").read_text() == "written\n"
    (capsa.bundle / "rootfs" / "written").unlink()
    return result.stdout.splitlines(), json.loads(timings.read_text())


def test_clones_are_distinct_and_corrupt_templates_boot_cold(
    capsa: Capsa, tmp_path: Path, template_cache: Path
) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor]\nboot = "template"\n')
    (capsa.bundle / "rootfs" / "hello").write_text("hello from the host\n")
    capsa.spec(["sh", "-c", REPORT])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    spec["root"]["readonly"] = False
    (capsa.bundle / "config.json").write_text(json.dumps(spec))
    shm_before = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("capsa-")}

    first, first_timings = run(capsa, config, tmp_path, "one")
    assert "template_restored" in first_timings
    made = current_generation(template_cache)
    assert (made / template.META_FILE).exists()

    # Long enough that a clone still on the template's clock would show it.
    time.sleep(5)
    second, second_timings = run(capsa, config, tmp_path, "two")
    assert "template_restored" in second_timings
    assert second_timings["template_ready"] - second_timings["accelerator_chosen"] < 1  # not made again

    for lines in (first, second):
        assert lines[0] == "hello from the host"  # the rootfs came over the hot-plugged virtio-fs
    assert first[1] != second[1], "two clones produced the same random bytes"
    assert abs(int(second[2]) - time.time()) < 3, "the clone's clock is not the host's"
    assert first[3] != second[3], "two clones share a boot_id"
    assert {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("capsa-")} <= shm_before

    # Same size, garbage inside: QEMU refuses the state, the sandbox boots
    # cold and the template is thrown away (the next sandbox makes it anew).
    state = made / template.STATE_FILE
    with state.open("r+b") as file:
        file.seek(64)
        file.write(os.urandom(4096))
    third, third_timings = run(capsa, config, tmp_path, "three")
    assert third[0] == "hello from the host"
    assert "template_restored" not in third_timings
    assert "template_failed" in third_timings
    assert not made.exists()


def test_each_clone_gets_a_new_generation_id_and_its_kernel_reseeds(
    capsa: Capsa, tmp_path: Path, template_cache: Path
) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor]\nboot = "template"\n')
    for applet in ("dmesg", "grep"):
        link = capsa.bundle / "rootfs" / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    # The kernel log needs CAP_SYSLOG (the guest restricts dmesg).
    capsa.spec(["sh", "-c", "dmesg | grep -c 'crng reseeded due to virtual machine fork'; echo written > /written"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    spec["root"]["readonly"] = False
    caps = spec["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        caps[kind] = [*caps.get(kind, []), "CAP_SYSLOG"]
    (capsa.bundle / "config.json").write_text(json.dumps(spec))
    for name in ("first", "second"):
        lines, timings = run(capsa, config, tmp_path, name)
        assert "template_restored" in timings, timings
        assert int(lines[0]) >= 1, f"{name}: the guest kernel did not see a new VM generation ID"


def test_a_template_that_served_its_bound_is_replaced_by_a_fresh_one(
    capsa: Capsa, tmp_path: Path, template_cache: Path
) -> None:
    """With template_max_clones = 1 every sandbox gets a template of its own,
    booted cold (so with a kernel layout of its own), and the spent one goes."""
    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor]\nboot = "template"\ntemplate_max_clones = 1\n')
    capsa.spec(["sh", "-c", "echo written > /written"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    spec["root"]["readonly"] = False
    (capsa.bundle / "config.json").write_text(json.dumps(spec))

    _, first_timings = run(capsa, config, tmp_path, "one")
    first = current_generation(template_cache)
    assert (first / template.CLONES_FILE).read_bytes() == b"c"  # its maker's sandbox
    _, second_timings = run(capsa, config, tmp_path, "two")
    second = current_generation(template_cache)
    for timings in (first_timings, second_timings):
        assert "template_restored" in timings, timings
    assert second != first
    assert not first.exists()
    assert [p.name for p in second.parent.iterdir() if p.is_dir() and not p.is_symlink()] == [second.name]


KERNEL_CODE = "grep 'Kernel code' /proc/iomem"


def test_a_successor_is_made_in_the_background_with_a_layout_of_its_own(
    capsa: Capsa, tmp_path: Path, template_cache: Path
) -> None:
    """template_max_clones = 2: the first sandbox's checkout is at 90 % of the bound, so a
    refresher makes the next generation in the background (hypervisor/refresh.py); the next
    sandbox is restored from that one without making any, and its kernel sits elsewhere in
    physical memory (KASLR of another boot: /proc/iomem, read with CAP_SYS_ADMIN in the guest)."""
    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor]\nboot = "template"\ntemplate_max_clones = 2\n')
    capsa.spec(["sleep", "600"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    caps = spec["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        caps[kind] = [*caps.get(kind, []), "CAP_SYS_ADMIN"]
    (capsa.bundle / "config.json").write_text(json.dumps(spec))
    link = capsa.bundle / "rootfs" / "bin" / "grep"
    if not link.exists():
        os.symlink("busybox", link)
    made = []
    try:
        assert capsa("--config", str(config), "create", "--bundle", str(capsa.bundle), "g1").code == 0
        made.append("g1")
        first = current_generation(template_cache)
        deadline = time.monotonic() + 120
        while current_generation(template_cache) == first and time.monotonic() < deadline:
            time.sleep(0.5)
        second = current_generation(template_cache)
        assert second != first, "no successor was made in the background"
        assert (second / template.CLONES_FILE).read_bytes() == b""  # it has served nobody yet
        assert capsa("--config", str(config), "create", "--bundle", str(capsa.bundle), "g2").code == 0
        made.append("g2")
        assert (second / template.CLONES_FILE).read_bytes() == b"c"  # g2 came from it
        codes = [capsa("exec", cid, "sh", "-c", KERNEL_CODE).stdout.strip() for cid in ("g1", "g2")]
        assert all("Kernel code" in code for code in codes), codes
        assert codes[0] != codes[1], f"two template generations share a kernel address: {codes}"
    finally:
        for cid in made:
            capsa("delete", "--force", cid)
    # g2's start was at 90 % of its generation's bound too: its refresher makes a third one.
    # Each refresher ends once done, leaving no template VM running.
    deadline = time.monotonic() + 120
    while _refreshers(template_cache) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _refreshers(template_cache) == []


def _refreshers(cache: Path) -> list[Path]:
    """The background refreshers working on ``cache``'s templates (their job files are there)."""
    mark = str(cache).encode()
    return [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"capsa.hypervisor.refresh" in _cmdline(p) and mark in _cmdline(p)
    ]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def guest_details(capsa: Capsa, cid: str) -> pb.GuestDetailsResponse:
    async def ask() -> pb.GuestDetailsResponse:
        client = await ProxyClient.connect(StateStore(capsa.root).socket_dir(cid), 30)
        try:
            return await client.agent.guest_details()
        finally:
            await client.aclose()

    return asyncio.run(ask())


@pytest.mark.parametrize("renew", ["always", "never"])
def test_a_renewed_clone_agent_has_a_hash_seed_of_its_own(
    capsa: Capsa, tmp_path: Path, template_cache: Path, renew: str
) -> None:
    """RenewAgent (template_renew_agent): each clone's agent is a fresh process with its own hash
    seed; without it, every clone's agent is its template's process and shares the seed."""
    config = tmp_path / "configuration.toml"
    config.write_text(f'[hypervisor]\nboot = "template"\ntemplate_renew_agent = "{renew}"\n')
    capsa.spec(["sleep", "600"])
    probes, renewals = [], []
    try:
        # r1 makes the template and is restored from it, as r2 and r3 are.
        for cid in ("r1", "r2", "r3"):
            created = capsa("--config", str(config), "create", "--bundle", str(capsa.bundle), cid)
            assert created.code == 0, created.stderr
            details = guest_details(capsa, cid)
            probes.append(details.agent_hash_probe)
            renewals.append(details.agent_renewals)
            # A renewed agent still serves a working container.
            assert capsa("exec", cid, "echo", "alive").stdout == "alive\n"
    finally:
        for cid in ("r1", "r2", "r3"):
            capsa("delete", "--force", cid)
    if renew == "always":
        assert renewals == [1, 1, 1]
        assert len(set(probes)) == 3, f"clones' agents share a hash seed: {probes}"
    else:
        assert renewals == [0, 0, 0]
        assert len(set(probes)) == 1, "unrenewed clones should share their template's agent"
