"""VM templates as data: the cache key, the template's and clone's hardware,
the memory copy and the store's bookkeeping.  No VM here; see
tests/integration/test_template_vm.py for real ones."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from capsa.agent import clone
from capsa.errors import HypervisorError
from capsa.hypervisor import template
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
    image = vm(initrd=None, rootfs_image=Path("/img"))
    assert "image" in (template.unsupported(image) or "")
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


def test_store_finds_only_complete_templates(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)
    assert store.find("k") is None
    directory = tmp_path / "k"
    directory.mkdir()
    (directory / template.STATE_FILE).write_bytes(b"s" * 10)
    (directory / template.MEMORY_FILE).write_bytes(b"m" * 20)
    assert store.find("k") is None  # no template.json: creation did not finish
    meta = {"key": "k", "state_bytes": 10, "memory_bytes": 20}
    (directory / template.META_FILE).write_text(json.dumps(meta))
    assert store.find("k") == directory
    (directory / template.STATE_FILE).write_bytes(b"s" * 9)
    assert store.find("k") is None  # truncated
    store.discard("k")
    assert not directory.exists()


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


def make_template(store: template.TemplateStore, key: str, used: float) -> None:
    directory = store.root / key
    directory.mkdir(parents=True)
    (directory / template.STATE_FILE).write_bytes(b"s")
    (directory / template.MEMORY_FILE).write_bytes(b"m")
    meta = {"key": key, "state_bytes": 1, "memory_bytes": 1}
    (directory / template.META_FILE).write_text(json.dumps(meta))
    os.utime(directory / template.META_FILE, (used, used))


def test_prune_keeps_the_templates_used_last(tmp_path: Path) -> None:
    store = template.TemplateStore(tmp_path)
    now = time.time()
    for age, key in enumerate(["t0", "t1", "t2", "t3", "t4"]):
        make_template(store, key, now - 100 * (age + 1))  # t0 the newest
    assert store.find("t4") is not None  # a use makes t4 the latest
    (tmp_path / "t9").mkdir()  # incomplete: someone is making it
    old_work = tmp_path / "t8.new"
    old_work.mkdir()
    os.utime(old_work, (now - 2 * template.STALE_WORK_SECONDS,) * 2)
    (tmp_path / "t7.new").mkdir()  # a maker at work now

    async def prune_while_t3_is_being_made() -> list[str]:
        async with store.locked("t3", timeout=1):
            return store.prune(keep=2)

    assert sorted(asyncio.run(prune_while_t3_is_being_made())) == ["t1", "t2"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "t0",
        "t3",
        "t4",
        "t7.new",
        "t9",
    ]
    assert sorted(store.prune(keep=2)) == ["t3"]
    assert store.prune(keep=2) == []


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
