"""The QEMU driver and virtiofsd against real VMs (TCG here).

The guest is the capsa kernel with a throw-away busybox initrd written by
the test, whose /init prints markers on the console and powers off.  Nothing
here needs the capsa guest image or agent.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsa.config import load_config
from capsa.errors import HypervisorError
from capsa.hypervisor.accel import KVM_DEVICE, kvm_unusable_reason, probe_accelerator
from capsa.hypervisor.base import NinePShare, SerialChannel, Share, VirtioFsShare, VMConfig
from capsa.hypervisor.guest_kernel import HEAD_BYTES, kernel_format
from capsa.hypervisor.qemu import QemuHypervisor
from capsa.runtime.sandbox import kernel_cmdline
from capsa.storage.virtiofsd import DEFAULT_VIRTIOFSD, Virtiofsd

pytestmark: list[pytest.MarkDecorator] = [pytest.mark.vm]

BUSYBOX = Path("/bin/busybox")
QEMU = Path("/usr/bin/qemu-system-x86_64")
BOOT_TIMEOUT = 60.0  # TCG on a loaded 2-core machine; a boot takes ~1.5 s


def guest_kernel() -> Path:
    return load_config().hypervisor.kernel


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for path in (guest_kernel(), QEMU, BUSYBOX):
        if not path.exists():
            return f"{path} is missing"
    return None


_reason = _skip_reason()
if _reason is not None:
    pytestmark.append(pytest.mark.skip(reason=_reason))


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio "newc" archive (the initramfs format, Documentation/driver-api/early-userspace/buffer-format.rst).

    Entries are (name, mode, data); character devices get rdev 5:1 (/dev/console).
    """
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        rdev = (5, 1) if stat.S_ISCHR(mode) else (0, 0)
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        out += b"070701" + b"".join(b"%08x" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def make_initrd(directory: Path, script: str) -> Path:
    init = "#!/bin/busybox sh\n" + textwrap.dedent(script)
    entries = [
        ("bin", stat.S_IFDIR | 0o755, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()),
        ("dev", stat.S_IFDIR | 0o755, b""),
        ("dev/console", stat.S_IFCHR | 0o600, b""),
        ("mnt", stat.S_IFDIR | 0o755, b""),
        ("proc", stat.S_IFDIR | 0o755, b""),
        ("init", stat.S_IFREG | 0o755, init.encode()),
    ]
    path = directory / "initrd.cpio"
    path.write_bytes(newc_archive(entries))
    return path


def vm_config(run_dir: Path, initrd: Path | None, shares: tuple[Share, ...] = (), **overrides: object) -> VMConfig:
    fields: dict[str, object] = {
        "name": "hvtest",
        "run_dir": run_dir,
        "hypervisor_path": QEMU,
        "kernel": guest_kernel(),
        "initrd": initrd,
        "accelerator": "tcg",
        "memory_mib": 256,
        "agent_channel": SerialChannel(run_dir / "agent.sock"),
        "kernel_params": ("panic=-1", "random.trust_cpu=on", "rdinit=/init", "quiet"),
        "shares": shares,
    }
    fields.update(overrides)
    return VMConfig(**fields)  # type: ignore[arg-type]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (our run dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes); nothing may outlive the test."""
    path = Path(tempfile.mkdtemp(prefix="capsa-hv-", dir="/tmp"))
    try:
        yield path
        deadline = time.monotonic() + 5
        while processes_mentioning(str(path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(path)) == []
    finally:
        for line in processes_mentioning(str(path)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


async def console_shows(vm: QemuHypervisor, marker: str, timeout: float = BOOT_TIMEOUT) -> str:
    """Wait until ``marker`` is on the guest console; fail early if the VM dies."""
    assert vm.console_log is not None
    deadline = time.monotonic() + timeout
    while True:
        text = vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""
        if marker in text:
            return text
        if vm.pid is None or time.monotonic() > deadline:
            pytest.fail(f"{marker!r} not on the console; console:\n{text[-2000:]}")
        await asyncio.sleep(0.05)


def test_boots_to_init_and_stops_without_leftovers(run_dir: Path) -> None:
    initrd = make_initrd(run_dir, "echo CAPSA-BOOTED\nexec /bin/busybox sleep 1000\n")

    async def scenario() -> None:
        vm = QemuHypervisor(vm_config(run_dir, initrd))
        try:
            started = time.monotonic()
            await vm.start()
            pid = vm.pid
            assert pid is not None
            await console_shows(vm, "CAPSA-BOOTED")
            print(f"boot to init: {time.monotonic() - started:.2f} s")
            await vm.pause()
            await vm.resume()
        finally:
            await vm.stop()
        assert vm.pid is None
        assert not Path(f"/proc/{pid}").exists()
        assert not (run_dir / "agent.sock").exists()
        await vm.stop()  # idempotent

    asyncio.run(scenario())


#: KASLR moves the kernel by multiples of CONFIG_PHYSICAL_ALIGN (2 MiB).
KASLR_ALIGN = 2 << 20


async def idle_instruction_pointer(vm: QemuHypervisor, timeout: float = BOOT_TIMEOUT) -> int:
    """Where the vCPU sits while the guest idles: HMP ``info registers`` shows
    ``RIP=<16 hex digits> ... HLT=1`` for a vCPU halted in the kernel's idle
    loop, a kernel text address (the hardened guest hides /proc/kallsyms)."""
    deadline = time.monotonic() + timeout
    while True:
        registers = await vm.human_monitor("info registers")
        match = re.search(r"RIP=([0-9a-f]{16}) .* HLT=1", registers)
        if match:
            return int(match[1], 16)
        if time.monotonic() > deadline:
            pytest.fail(f"the vCPU never halted; last registers:\n{registers}")
        await asyncio.sleep(0.05)


def test_cold_boots_run_the_kernel_at_random_addresses(run_dir: Path) -> None:
    """KASLR: the configured kernel (the bzImage) with capsa's own command line
    lands at another 2 MiB slot each cold boot; the same build's PVH vmlinux,
    which skips the decompressor, runs at its link address every time."""
    kernel = guest_kernel()
    assert kernel_format(kernel.read_bytes()[:HEAD_BYTES]) == "bzImage", f"{kernel}: configure the bzImage"
    initrd = make_initrd(run_dir, "echo CAPSA-IDLE\nexec /bin/busybox sleep 1000\n")
    params = kernel_cmdline(load_config(), "serial", debug=False)
    assert "nokaslr" not in params

    async def idle_rip(kernel: Path) -> int:
        vm = QemuHypervisor(vm_config(run_dir, initrd, kernel=kernel, kernel_params=params))
        try:
            await vm.start()
            await console_shows(vm, "CAPSA-IDLE")
            return await idle_instruction_pointer(vm)
        finally:
            await vm.stop()

    first, second = asyncio.run(idle_rip(kernel)), asyncio.run(idle_rip(kernel))
    if first == second:  # KASLR has about 500 slots: one chance in 500 of the same one
        second = asyncio.run(idle_rip(kernel))
    print(f"idle RIP of two cold boots: {first:#x}, {second:#x}")
    assert first % KASLR_ALIGN == second % KASLR_ALIGN  # the same idle instruction...
    assert first != second  # ...at two addresses
    vmlinux = kernel.resolve().parent / "vmlinux"
    if vmlinux.exists():
        linked = asyncio.run(idle_rip(vmlinux))
        print(f"idle RIP of the PVH vmlinux: {linked:#x}")
        assert (first - linked) % KASLR_ALIGN == 0 and (second - linked) % KASLR_ALIGN == 0
        symbols = vmlinux.parent / "System.map"
        if symbols.exists():
            text = {name: int(address, 16) for address, _, name in map(str.split, symbols.read_text().splitlines())}
            assert text["_text"] <= linked < text["_etext"]  # no offset: where the kernel was linked


def test_guest_poweroff_ends_the_vm(run_dir: Path) -> None:
    initrd = make_initrd(run_dir, "echo CAPSA-BYE\n/bin/busybox poweroff -f\n")

    async def scenario() -> int:
        vm = QemuHypervisor(vm_config(run_dir, initrd))
        try:
            await vm.start()
            return await asyncio.wait_for(vm.wait(), BOOT_TIMEOUT)
        finally:
            await vm.stop()

    assert asyncio.run(scenario()) == 0


def test_guest_panic_ends_the_vm(run_dir: Path) -> None:
    # init exits: the kernel panics ("Attempted to kill init"); panic=-1 and
    # -no-reboot turn that into QEMU exiting.
    initrd = make_initrd(run_dir, "exit 3\n")

    async def scenario() -> None:
        vm = QemuHypervisor(vm_config(run_dir, initrd))
        try:
            await vm.start()
            await asyncio.wait_for(vm.wait(), BOOT_TIMEOUT)
        finally:
            await vm.stop()

    asyncio.run(scenario())


@pytest.mark.skipif(not DEFAULT_VIRTIOFSD.exists(), reason=f"{DEFAULT_VIRTIOFSD} is missing")
def test_guest_reads_a_virtiofs_share(run_dir: Path) -> None:
    shared = run_dir / "shared"
    shared.mkdir()
    (shared / "hello").write_text("hello over virtio-fs\n")
    initrd = make_initrd(
        run_dir,
        """\
        /bin/busybox mount -t virtiofs hostshare /mnt && /bin/busybox cat /mnt/hello
        echo CAPSA-DONE
        /bin/busybox poweroff -f
        """,
    )
    socket_path = run_dir / "vfs.sock"

    async def scenario() -> str:
        virtiofsd = Virtiofsd(shared_dir=shared, socket_path=socket_path)
        vm = QemuHypervisor(vm_config(run_dir, initrd, (VirtioFsShare("hostshare", socket_path),)))
        try:
            await virtiofsd.start()
            await vm.start()
            text = await console_shows(vm, "CAPSA-DONE")
            assert await asyncio.wait_for(vm.wait(), BOOT_TIMEOUT) == 0
            # virtiofsd exits by itself once QEMU hangs up.
            await asyncio.wait_for(virtiofsd.wait(), 10)
            return text
        finally:
            await vm.stop()
            await virtiofsd.stop()

    assert "hello over virtio-fs" in asyncio.run(scenario())
    assert not socket_path.exists()


def test_guest_reads_and_writes_a_9p_share(run_dir: Path) -> None:
    shared = run_dir / "shared"
    shared.mkdir()
    (shared / "hello").write_text("hello over 9p\n")
    initrd = make_initrd(
        run_dir,
        """\
        /bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L hostshare /mnt && /bin/busybox cat /mnt/hello
        /bin/busybox mkdir /mnt/dir && echo written by the guest > /mnt/dir/note
        /bin/busybox sync
        echo CAPSA-DONE
        /bin/busybox poweroff -f
        """,
    )

    async def scenario() -> str:
        vm = QemuHypervisor(vm_config(run_dir, initrd, (NinePShare("hostshare", shared),)))
        try:
            await vm.start()
            text = await console_shows(vm, "CAPSA-DONE")
            await asyncio.wait_for(vm.wait(), BOOT_TIMEOUT)
            return text
        finally:
            await vm.stop()

    assert "hello over 9p" in asyncio.run(scenario())
    # Under QEMU's seccomp sandbox, 9p can still create and write files.
    assert (shared / "dir" / "note").read_text() == "written by the guest\n"


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) is missing")
def test_boots_from_a_rootfs_image_on_virtio_pmem_with_dax(run_dir: Path) -> None:
    tree = run_dir / "tree"
    for sub in ("bin", "dev", "proc", "mnt"):
        (tree / sub).mkdir(parents=True)
    shutil.copy(BUSYBOX, tree / "bin" / "busybox")
    (tree / "init").write_text(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
        "/bin/busybox grep -q ' / ext4 ro,.*dax' /proc/mounts && echo CAPSA-IMAGE-ROOT-DAX\n"
        "/bin/busybox poweroff -f\n"
    )
    (tree / "init").chmod(0o755)
    image = run_dir / "rootfs.img"
    # 4 KiB blocks: ext4 DAX needs the block size to equal the page size.
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-d", str(tree), str(image), "8M"], check=True)
    os.truncate(image, 128 << 20)  # whole memory blocks (virtio-pmem); the rest is a hole
    params = ("panic=-1", "random.trust_cpu=on", "root=/dev/pmem0", "rootflags=dax", "ro", "init=/init")

    async def scenario() -> str:
        vm = QemuHypervisor(vm_config(run_dir, None, rootfs_image=image, kernel_params=params))
        try:
            await vm.start()
            await asyncio.wait_for(vm.wait(), BOOT_TIMEOUT)
        finally:
            await vm.stop()
        return vm.config.console_log.read_text(errors="replace")

    # Mounted read-only with DAX: the guest reads the files from the mapping.
    assert "CAPSA-IMAGE-ROOT-DAX" in asyncio.run(scenario())


def test_bad_kernel_shows_qemus_own_message(run_dir: Path) -> None:
    initrd = make_initrd(run_dir, "exit 0\n")

    async def scenario() -> None:
        vm = QemuHypervisor(vm_config(run_dir, initrd, kernel=run_dir / "no-such-kernel"))
        try:
            await vm.start()
        finally:
            await vm.stop()

    with pytest.raises(HypervisorError) as caught:
        asyncio.run(scenario())
    message = str(caught.value)
    assert "\n" not in message
    assert "could not open kernel file" in message
    assert "no-such-kernel" in message


def test_vm_dies_with_a_killed_parent(run_dir: Path) -> None:
    """A foreground ``capsa run`` killed by SIGKILL must not leave QEMU behind."""
    initrd = make_initrd(run_dir, "exec /bin/busybox sleep 1000\n")
    program = textwrap.dedent(
        f"""\
        import asyncio, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_hypervisor_vm import QemuHypervisor, vm_config

        async def main():
            vm = QemuHypervisor(vm_config(Path({str(run_dir)!r}), Path({str(initrd)!r})), die_with_parent=True)
            await vm.start()
            print(vm.pid, flush=True)
            await asyncio.sleep(1000)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        qemu_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{qemu_pid}").exists()
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{qemu_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{qemu_pid}").exists()


def test_accelerator_probe_reaches_a_verdict_and_caches_it(tmp_path: Path) -> None:
    started = time.monotonic()
    first = probe_accelerator(QEMU, guest_kernel(), tmp_path)
    elapsed = time.monotonic() - started
    print(f"probe: {first.accelerator} in {elapsed:.2f} s: {first.reason}")
    assert first.accelerator in ("kvm", "tcg")
    assert elapsed < 10
    if kvm_unusable_reason(KVM_DEVICE) is None:
        assert (tmp_path / "accel.json").exists()
        second = probe_accelerator(QEMU, guest_kernel(), tmp_path)
        assert second.cached
        assert (second.accelerator, second.reason) == (first.accelerator, first.reason)
