"""VM templates as data: the cache key, the template's and clone's hardware,
the memory copy and the store's bookkeeping.  No VM here; see
tests/integration/test_template_vm.py for real ones."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from capsa.agent import clone
from capsa.config import SecurityConfig
from capsa.errors import HypervisorError
from capsa.hypervisor import refresh, template
from capsa.hypervisor.base import NinePShare, SerialChannel, VirtioFsShare, VMConfig, VsockChannel
from capsa.hypervisor.qemu import qemu_argv

FILES = (template.FileIdentity("/usr/bin/qemu-system-x86_64", 100, 1), template.FileIdentity("/k", 5, 2))


def vm(run_dir: str = "/run/capsa/a", name: str = "a", **changes: Any) -> VMConfig:
    base = VMConfig(
        name=name,
        run_dir=Path(run_dir),
        hypervisor_path=Path("/usr/bin/qemu-system-x86_64"),
        kernel=Path("/var/lib/capsa/guest/vmlinux"),
        initrd=Path("/var/lib/capsa/guest/initrd.img"),
        agent_channel=SerialChannel(Path(run_dir) / "agent.sock"),
        accelerator="tcg",
        memory_mib=1024,
        kernel_params=("quiet", "capsa.channel=serial"),
        shares=(VirtioFsShare(tag="rootfs", socket_path=Path(run_dir) / "vfs.sock"),),
    )
    return replace(base, **changes)


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_key_ignores_what_differs_per_sandbox() -> None:
    a = template.template_key(vm(), FILES)
    b = template.template_key(vm("/run/other/b", name="b"), FILES)
    assert a == b
    nine_a = vm(shares=(NinePShare(tag="rootfs", host_path=Path("/bundles/a/rootfs")),))
    nine_b = vm(shares=(NinePShare(tag="rootfs", host_path=Path("/bundles/b/rootfs")),))
    assert template.template_key(nine_a, FILES) == template.template_key(nine_b, FILES)


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_mib": 512},
        {"vcpus": 2, "max_vcpus": 2},
        {"kernel_params": ("quiet", "capsa.channel=serial", "capsa.debug=1")},
        {"accelerator": "kvm"},
        {"initrd": Path("/other/initrd.img")},
        {"debug": True},
        {"shares": (NinePShare(tag="rootfs", host_path=Path("/r")),)},
    ],
)
def test_key_changes_with_the_hardware(changes: dict[str, Any]) -> None:
    assert template.template_key(vm(**changes), FILES) != template.template_key(vm(), FILES)


def test_key_changes_with_the_files() -> None:
    rebuilt = (FILES[0], template.FileIdentity("/k", 5, 3))
    assert template.template_key(vm(), rebuilt) != template.template_key(vm(), FILES)


def test_key_follows_the_installed_link_to_its_build(tmp_path: Path) -> None:
    # guest/image/build.py installs the image as a link into a content-addressed cache.
    builds = [tmp_path / "cache" / key for key in ("aaaa", "bbbb")]
    for build in builds:
        build.mkdir(parents=True)
        (build / "initrd.img").write_bytes(b"x" * 64)
        os.utime(build / "initrd.img", ns=(1, 1))  # same size and mtime: only the target differs
    link = tmp_path / "initrd.img"
    link.symlink_to(builds[0] / "initrd.img")
    first = template.file_identity(link)
    link.unlink()
    link.symlink_to(builds[1] / "initrd.img")
    second = template.file_identity(link)
    assert (first.path, first.size, first.mtime_ns) == (second.path, second.size, second.mtime_ns)
    assert template.template_key(vm(), (FILES[0], first)) != template.template_key(vm(), (FILES[0], second))


def test_a_root_image_is_templated_and_its_file_is_in_the_key(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"")
    os.truncate(image, 128 << 20)
    imaged = vm(initrd=None, rootfs_image=image)
    files = template.vm_files(replace(imaged, hypervisor_path=image, kernel=image))
    assert [f.path for f in files].count(str(image)) == 3  # QEMU and kernel stand-ins, and the image
    key = template.template_key(imaged, files)
    # The key's command line maps the image at its size; a rebuilt image is another template.
    rebuilt = tuple(replace(f, size=256 << 20) if f.path == str(image) else f for f in files)
    assert template.template_key(imaged, rebuilt) != key
    assert template.template_key(imaged, files) == key


def test_missing_file_is_a_template_error(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(template.TemplateError, match="dangling"):
        template.file_identity(tmp_path / "dangling")


def test_template_and_clone_boot_with_the_preload_flag(tmp_path: Path) -> None:
    # The template's agent preloads for its clones; a cold VM's does not.
    t = template.template_vm(vm(), tmp_path, tmp_path / "share", tmp_path / "memory")
    c = template.clone_vm(vm(), tmp_path / "c.mem")
    assert template.TEMPLATE_PARAM in values(qemu_argv(t, qmp_fd=3), "-append")[0].split()
    assert values(qemu_argv(c, qmp_fd=3), "-append") == values(qemu_argv(t, qmp_fd=3), "-append")
    assert template.TEMPLATE_PARAM not in values(qemu_argv(vm(), qmp_fd=3), "-append")[0].split()
    assert template.template_vm(t, tmp_path, tmp_path, tmp_path / "m").kernel_params == t.kernel_params


def test_template_has_no_virtiofs_and_keeps_its_ram_in_a_file(tmp_path: Path) -> None:
    t = template.template_vm(vm(), tmp_path, tmp_path / "share", tmp_path / "memory")
    argv = qemu_argv(t, qmp_fd=3)
    devices = values(argv, "-device")
    assert not any(d.startswith("vhost-user-fs") for d in devices)
    assert "pcie-root-port,id=hotplug0,bus=pcie.0,chassis=1" in devices
    assert any(d.startswith("virtserialport,") and d.endswith(",id=agent-port") for d in devices)
    assert f"memory-backend-file,id=mem,size=1024M,mem-path={tmp_path}/memory,share=on" in values(argv, "-object")
    assert values(argv, "-machine")[0].endswith(",memory-backend=mem")
    assert "-incoming" not in argv


def test_template_keeps_9p_pointing_at_an_empty_dir(tmp_path: Path) -> None:
    nine = vm(shares=(NinePShare(tag="rootfs", host_path=Path("/bundle/rootfs")),))
    t = template.template_vm(nine, tmp_path, tmp_path / "share", tmp_path / "memory")
    assert t.shares == (NinePShare(tag="rootfs", host_path=tmp_path / "share"),)
    clone_vm = template.clone_vm(nine, tmp_path / "c.mem")
    assert clone_vm.shares == nine.shares


def test_clone_waits_for_the_state_and_plugs_virtiofs_later(tmp_path: Path) -> None:
    sandbox = vm()
    c = template.clone_vm(sandbox, tmp_path / "c.mem")
    argv = qemu_argv(c, qmp_fd=3)
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert not any(d.startswith("vhost-user-fs") for d in values(argv, "-device"))
    assert f"mem-path={tmp_path}/c.mem" in values(argv, "-object")[0]
    assert template.plugged_shares(sandbox) == sandbox.shares
    # Same hardware as the template, apart from paths: QEMU checks it at load.
    t = template.template_vm(sandbox, tmp_path, tmp_path / "share", tmp_path / "memory")
    assert values(argv, "-device") == values(qemu_argv(t, qmp_fd=3), "-device")


def test_cold_argv_is_unchanged() -> None:
    argv = qemu_argv(vm(), qmp_fd=3)
    assert "-incoming" not in argv
    # Root ports for devices plugged after boot (block volumes) exist cold too.
    assert "pcie-root-port,id=hotplug0,bus=pcie.0,chassis=1" in values(argv, "-device")
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in values(argv, "-object")


def test_what_cannot_be_templated() -> None:
    assert template.unsupported(vm()) is None
    assert "q35" in (template.unsupported(vm(machine_type="microvm")) or "")
    assert "vsock" in (template.unsupported(vm(agent_channel=VsockChannel(guest_cid=5))) or "")
    # The rootfs image's virtio-pmem is shared, so left out of the state.
    assert template.unsupported(vm(initrd=None, rootfs_image=Path("/img"))) is None
    with pytest.raises(HypervisorError, match="serial agent channel"):
        vm(agent_channel=VsockChannel(guest_cid=5), templated=True)
    with pytest.raises(HypervisorError, match="only a templated VM"):
        vm(incoming=True)


def test_memory_copy_keeps_holes(tmp_path: Path) -> None:
    source_dir = tmp_path / "t"
    source_dir.mkdir()
    size = 64 << 20
    with open(source_dir / template.MEMORY_FILE, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(b"a" * 8192)
        f.seek(size - 4096)
        f.write(b"z" * 4096)
    copy = tmp_path / "copy"
    template.copy_memory(source_dir, copy)
    assert copy.stat().st_size == size
    assert copy.read_bytes() == (source_dir / template.MEMORY_FILE).read_bytes()
    assert copy.stat().st_blocks * 512 < 1 << 20  # still sparse
    with pytest.raises(template.TemplateError):
        template.copy_memory(source_dir, copy)  # never overwrites


def test_store_lock_is_exclusive(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)

    async def scenario() -> None:
        async with store.locked("k", timeout=1):
            # flock locks belong to the open file: a second open conflicts
            # even within one process, as another capsa would.
            with pytest.raises(template.TemplateError, match="locked by another process"):
                async with store.locked("k", timeout=0.1):
                    pass
        async with store.locked("k", timeout=0.1):
            pass

    asyncio.run(scenario())


def test_entropy_request_layout() -> None:
    request = clone.rand_pool_info(b"\x01\x02\x03\x04\x05")
    assert request == (40).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"\x01\x02\x03\x04\x05\0\0\0"


def test_virtiofs_device_wait(tmp_path: Path) -> None:
    assert clone.bound_virtiofs_devices(str(tmp_path / "missing")) == 0
    (tmp_path / "virtio3").mkdir()
    (tmp_path / "bind").touch()
    assert clone.bound_virtiofs_devices(str(tmp_path)) == 1
    asyncio.run(clone.wait_virtiofs_devices(1, str(tmp_path)))
    os.rmdir(tmp_path / "virtio3")
    asyncio.run(clone.wait_virtiofs_devices(0, str(tmp_path)))


def publish(
    store: template.TemplateStore, key: str, created: float | None = None, for_sandbox: bool = True
) -> Path:
    """What :meth:`TemplateStore.create` leaves, without a VM: a saved template published as ``key``'s current."""
    work = store.root / f"{key}.new"
    work.mkdir(parents=True)
    (work / template.STATE_FILE).write_bytes(b"s" * 10)
    (work / template.MEMORY_FILE).write_bytes(b"m" * 20)
    return store.publish(key, work, {}, time.time() if created is None else created, for_sandbox)


class Maker:
    """A ``make`` for :meth:`TemplateStore.checkout` that publishes without a VM, and counts."""

    def __init__(self, store: template.TemplateStore, key: str, age: float = 0.0) -> None:
        self.store, self.key, self.age = store, key, age
        self.made: list[Path] = []

    async def __call__(self) -> Path:
        self.made.append(publish(self.store, self.key, time.time() - self.age))
        return self.made[-1]


def generations(store: template.TemplateStore, key: str) -> list[str]:
    return sorted(p.name for p in (store.root / key).iterdir() if p.is_dir() and not p.is_symlink())


def checkout_once(store: template.TemplateStore, key: str, make: Maker) -> Path:
    async def scenario() -> Path:
        async with store.checkout(key, make, lock_timeout=1) as found:
            assert (found / template.STATE_FILE).exists()
            return found

    return asyncio.run(scenario())


def test_a_template_retires_after_its_clone_bound_counting_its_makers_clone() -> None:
    limits = template.TemplateLimits(max_clones=3)
    assert template.retire_reason(limits, 3, 0.0) is None
    assert template.retire_reason(limits, 4, 0.0) == "it has served 3 sandboxes, the bound is 3"
    assert template.retire_reason(template.TemplateLimits(), 10**9, 10.0**9) is None  # 0: no bound


def test_a_template_retires_at_its_age_bound_or_when_the_clock_went_back() -> None:
    limits = template.TemplateLimits(max_age=3600)
    assert template.retire_reason(limits, 1, 3599.0) is None
    assert template.retire_reason(limits, 1, 3600.0) == "it is 3600 s old, the bound is 3600 s"
    assert template.retire_reason(limits, 1, -10.0) is None  # NTP's small step
    reason = template.retire_reason(limits, 1, -7200.0)
    assert reason is not None and "clock went back" in reason


def test_each_generation_serves_its_bound_then_the_next_sandbox_makes_a_new_one(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path, template.TemplateLimits(max_clones=3))
    make = Maker(store, "k")
    served = [checkout_once(store, "k", make) for _ in range(7)]
    # The maker's sandbox and two more from each generation, then a new one.
    assert len(make.made) == 3
    assert served == [make.made[0]] * 3 + [make.made[1]] * 3 + [make.made[2]]
    assert generations(store, "k") == [make.made[2].name]  # retired ones are gone
    assert (make.made[2] / template.CLONES_FILE).read_bytes() == b"c"
    assert len({p.name for p in make.made}) == 3  # never the same name twice
    meta = json.loads((make.made[2] / template.META_FILE).read_text())
    assert meta["key"] == "k" and abs(meta["created"] - time.time()) < 60


def test_an_old_template_retires_whatever_it_served(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path, template.TemplateLimits(max_age=3600))
    old = publish(store, "k", created=time.time() - 3601)
    make = Maker(store, "k")
    fresh = checkout_once(store, "k", make)
    assert fresh != old and make.made == [fresh]
    assert not old.exists()
    assert checkout_once(store, "k", make) == fresh
    # Unbounded: a template serves for as long as it is kept.
    store = template.TemplateStore(tmp_path / "unbounded")
    ancient = publish(store, "k", created=time.time() - 10 * 365 * 86400)
    assert [checkout_once(store, "k", make) for _ in range(3)] == [ancient] * 3


def test_a_retired_template_stays_while_a_sandbox_restores_from_it(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path, template.TemplateLimits(max_clones=2))
    make = Maker(store, "k")
    first = checkout_once(store, "k", make)

    async def scenario() -> None:
        async with store.checkout("k", make, lock_timeout=1) as restoring:  # its 2nd and last sandbox
            assert restoring == first
            # Meanwhile another sandbox finds it retired and makes the next one.
            async with store.checkout("k", make, lock_timeout=1) as second:
                assert second != first
                assert (first / template.STATE_FILE).read_bytes() == b"s" * 10  # still whole
            assert first.exists()
        assert not first.exists()  # gone with its last lease

    asyncio.run(scenario())
    assert generations(store, "k") == [make.made[1].name]


def test_sandboxes_that_find_no_template_at_once_wait_for_one_maker(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path, template.TemplateLimits(max_clones=3))
    make = Maker(store, "k")

    async def slow_make() -> Path:
        await asyncio.sleep(0.2)  # booting: the others wait on the key's lock meanwhile
        return await make()

    async def sandbox() -> Path:
        async with store.checkout("k", slow_make, lock_timeout=5) as found:
            await asyncio.sleep(0.05)
            return found

    async def scenario() -> list[Path]:
        return list(await asyncio.gather(*(sandbox() for _ in range(5))))

    served = asyncio.run(scenario())
    # Three from the first generation (its bound), two from the one made after.
    assert len(make.made) == 2
    assert served.count(make.made[0]) == 3 and served.count(make.made[1]) == 2
    assert generations(store, "k") == [make.made[1].name]


def test_a_template_that_does_not_restore_is_discarded(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)
    make = Maker(store, "k")

    async def failed_restore() -> Path:
        with pytest.raises(HypervisorError):
            async with store.checkout("k", make, lock_timeout=1) as found:
                store.discard(found)
                raise HypervisorError("restoring the state of VM x failed")
        return found

    broken = asyncio.run(failed_restore())
    assert not broken.exists()
    assert checkout_once(store, "k", make) == make.made[1]


def test_incomplete_or_foreign_templates_are_not_served(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)
    made = publish(store, "k")
    (made / template.STATE_FILE).write_bytes(b"s" * 9)  # truncated
    make = Maker(store, "k")
    assert checkout_once(store, "k", make) == make.made[0]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / template.CURRENT_LINK).symlink_to(make.made[0])  # not a generation name
    assert checkout_once(store, "j", Maker(store, "j")) != make.made[0]


def test_clones_are_counted_in_order_without_a_lock(tmp_path: Path) -> None:
    counter = tmp_path / template.CLONES_FILE
    counter.write_bytes(b"")
    with ThreadPoolExecutor(8) as pool:
        places = list(pool.map(lambda _: template._count_clone(counter), range(200)))
    assert sorted(places) == list(range(1, 201))


def test_prune_keeps_the_templates_used_last(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)
    now = time.time()
    for age, key in enumerate(["t0", "t1", "t2", "t3", "t4", "t5"]):
        publish(store, key)
        os.utime(tmp_path / key, (now - 100 * (age + 1),) * 2)  # t0 the newest
    checkout_once(store, "t4", Maker(store, "t4"))  # a use makes t4 the latest
    old_layout = tmp_path / "t6"  # a template of LAYOUT_VERSION 1
    old_layout.mkdir()
    (old_layout / template.META_FILE).write_text("{}")
    os.utime(old_layout, (now - 1000,) * 2)
    old_work = tmp_path / "t8.new"
    old_work.mkdir()
    os.utime(old_work, (now - 2 * template.STALE_WORK_SECONDS,) * 2)
    (tmp_path / "t7.new").mkdir()  # a maker at work now

    async def prune_while_t3_is_made_and_t2_restored() -> list[str]:
        async with store.locked("t3", timeout=1), store.checkout("t2", Maker(store, "t2"), lock_timeout=1):
            os.utime(tmp_path / "t2", (now - 300,) * 2)
            return store.prune(keep=2)

    removed = asyncio.run(prune_while_t3_is_made_and_t2_restored())
    assert sorted(removed) == ["t1", "t5", "t6"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "t0",
        "t2",
        "t3",
        "t4",
        "t7.new",
    ]
    assert sorted(store.prune(keep=2)) == ["t2", "t3"]
    assert store.prune(keep=2) == []


def test_prune_removes_retired_generations_nobody_restores_from(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)
    current = publish(store, "k")
    leftover = tmp_path / "k" / "00112233445566ff"  # its maker died before it was current
    leftover.mkdir()
    (tmp_path / "k" / f".{template.CURRENT_LINK}-00112233445566ff").symlink_to("00112233445566ff")
    assert store.prune() == []
    assert generations(store, "k") == [current.name]
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == sorted([current.name, template.CURRENT_LINK])


def test_zero_blocks_of_a_template_ram_file_become_holes(tmp_path: Path) -> None:
    from capsa.hypervisor.template import punch_zero_pages

    block = 64 << 10
    path = tmp_path / "memory"
    with path.open("wb") as f:
        f.write(b"\x01" * block)  # guest data
        f.write(bytes(4 * block))  # zeroed free pages
        f.write(b"\x00" * (block - 1) + b"\x02")  # one byte of data keeps a block
        f.truncate(16 * block)  # never touched: already a hole
    before = path.read_bytes()
    assert punch_zero_pages(path) == 4 * block
    assert path.read_bytes() == before  # same contents
    assert path.stat().st_blocks * 512 <= 2 * block  # only the two data blocks take space


def test_the_template_guest_zeroes_what_it_frees_only_where_that_is_cheap() -> None:
    from capsa.hypervisor.template import TEMPLATE_PARAM, ZERO_FREED_PAGES, template_vm

    for accelerator, zeroed in (("kvm", True), ("tcg", False)):
        made = template_vm(vm(accelerator=accelerator), Path("/run/t"), Path("/run/t/s"), Path("/run/t/m"))
        assert TEMPLATE_PARAM in made.kernel_params
        assert (ZERO_FREED_PAGES in made.kernel_params) == zeroed


def test_a_template_near_its_bounds_is_due_for_a_successor() -> None:
    limits = template.TemplateLimits(max_clones=100, max_age=86400)
    assert not template.refresh_due(limits, 89, 0.0)
    assert template.refresh_due(limits, 90, 0.0)  # 90 % of its clones
    assert template.refresh_due(limits, 1, 0.9 * 86400)  # 90 % of its age
    assert template.refresh_due(template.TemplateLimits(max_clones=1), 1, 0.0)
    assert not template.refresh_due(template.TemplateLimits(), 10**9, 10.0**9)  # unbounded: never


def test_a_successor_made_in_the_background_serves_before_the_bound_is_reached(tmp_path: Path) -> None:
    """The sandbox whose checkout passes 90 % of the bound has the next generation made
    (refresh): the sandbox after it finds that one and nobody makes one in the foreground."""
    store = template.TemplateStore(tmp_path, template.TemplateLimits(max_clones=10))
    make = Maker(store, "k")
    first = checkout_once(store, "k", make)  # made, clone 1
    for _ in range(7):
        checkout_once(store, "k", make)
        assert not store.refresh_due
    assert checkout_once(store, "k", make) == first and store.refresh_due  # its 9th: due

    async def in_the_background() -> Path:
        return publish(store, "k", for_sandbox=False)  # what a refresh's create does: no sandbox counted

    made = asyncio.run(store.refresh("k", first.name, in_the_background))
    assert made is not None and made != first and (made / template.CLONES_FILE).read_bytes() == b""
    assert checkout_once(store, "k", make) == made and not first.exists()
    assert len(make.made) == 1  # nobody made one in the foreground
    # A refresh of a generation that is no longer current does nothing.
    assert asyncio.run(store.refresh("k", first.name, make)) is None and len(make.made) == 1


def test_a_refresh_leaves_it_to_whoever_is_making_one_already(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path, template.TemplateLimits(max_clones=1))
    make = Maker(store, "k")
    first = checkout_once(store, "k", make)

    async def scenario() -> None:
        async with store.locked("k", 1):  # another process is making one
            with pytest.raises(template.TemplateError, match="locked by another process"):
                await store.refresh("k", first.name, make)

    asyncio.run(scenario())
    assert len(make.made) == 1


def test_a_refresh_job_survives_the_trip_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    job = refresh.Job(tmp_path, template.TemplateLimits(3, 60.0), "k", "ab" * 8, vm(), SecurityConfig(), 60.0, 60.0)
    path = tmp_path / "k.refresh-1.job"
    path.write_bytes(pickle.dumps(job))
    assert pickle.loads(path.read_bytes()) == job
    path.write_bytes(b"not a job")
    assert refresh.main([str(path)]) == 1
    assert refresh.main([]) == 2
