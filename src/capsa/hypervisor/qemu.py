"""The QEMU driver: a pure argv builder and a thin process shell around it.

:func:`qemu_argv` turns a :class:`~capsa.hypervisor.base.VMConfig` into
QEMU's command line and does no I/O, so the whole virtual machine is tested
as data.  :class:`QemuHypervisor` runs that command line and drives QEMU over
QMP with the ``qemu.qmp`` library, handing QEMU one end of a socketpair for
its monitor (``-chardev socket,fd=N``): there is no socket path to create,
race for or clean up, and the greeting arrives as soon as QEMU listens.

Virtual hardware, and why:

* ``-nodefaults -no-user-config``: no NIC, VGA, floppy, CD-ROM or monitor
  we did not ask for; no host ``qemu.conf`` changing the machine under us.
* ``-display none`` instead of ``-nographic``: the latter multiplexes a
  serial console and monitor on stdio when defaults are on; we want nothing
  on stdio at all.
* ``-no-reboot``: a guest reboot, and a guest panic with ``panic=-1``,
  ends QEMU, so :meth:`QemuHypervisor.wait` sees the VM die.
* ``-sandbox``: QEMU's seccomp filter (:data:`SECCOMP_POLICY`).
* q35 drops the SATA controller, SMBus and VMware port (nothing uses them);
  microvm uses virtio-mmio devices and no option ROMs.
* a virtio-rng device so the guest's entropy pool is full at boot.
* one virtio-serial controller carries both the guest console (``hvc0``,
  written to ``console.log``) and, on hosts without vhost-vsock, the agent
  port ``capsa.agent``.  With ``debug`` the console is the serial port
  (``ttyS0``) instead: slower, but it shows the boot before virtio is up.
* virtio-fs needs the guest RAM in a shared memory backend, because
  virtiofsd maps it (vhost-user protocol, "Memory regions").
* a *templated* VM (:mod:`capsa.hypervisor.template`) keeps its RAM in a
  shared file, has a free ``pcie-root-port`` for the virtio-fs device
  plugged after a restore, and names its agent port so QMP
  ``VSERPORT_CHANGE`` events say when the agent opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, QMPClient, QMPError, Runstate

from capsa.errors import HypervisorError
from capsa.hypervisor import jail
from capsa.hypervisor.base import (
    AGENT_PORT_ID,
    AGENT_PORT_NAME,
    HOTPLUG_SLOTS,
    MEMORY_BLOCK_MIB,
    MEMORY_SLOTS,
    Hypervisor,
    SerialChannel,
    VirtioFsShare,
    VMConfig,
    VMSize,
)
from capsa.hypervisor.bounded_log import BoundedLog
from capsa.hypervisor.bounded_log import pump as console_pump
from capsa.hypervisor.jail import Confinement
from capsa.hypervisor.journal import ConsoleJournal
from capsa.hypervisor.process import Helper, last_line, settled, spawn, terminate

log = logging.getLogger("capsa.hypervisor.qemu")

# qemu.qmp logs every failed session at ERROR ("Negotiation failed:
# EOFError") before raising; this driver turns the same failure into one
# HypervisorError line, so the library's records would only be a second,
# noisier report on the user's stderr.  Left alone if someone set a level.
if logging.getLogger("qemu.qmp").level == logging.NOTSET:
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

#: How long a guest may take to handle hot-plugged CPUs and memory (under
#: TCG, onlining a few hundred MiB takes a fraction of a second).
DEFAULT_RESIZE_TIMEOUT = 30.0

#: How long a guest may take to let go of an unplugged disk (ACPI eject).
DEFAULT_UNPLUG_TIMEOUT = 10.0

#: virtio spec 1.2, 5.2.6: the ID string (serial) of a virtio-blk device is
#: VIRTIO_BLK_ID_BYTES = 20 bytes.
VIRTIO_BLK_SERIAL_BYTES = 20

#: How long QEMU may take from exec to answering QMP before it is killed.
#: Machine setup is fast; this only catches a VMM that hangs.
DEFAULT_START_TIMEOUT = 30.0

# The rootfs image's virtio-pmem region is memory-device space, like the
# DIMMs hot-plugged later and below them: QEMU places each device right
# after the last, and a guest onlines a DIMM only at a memory-block-aligned
# address ("Block size ... unaligned hotplug range", add_memory fails).  So
# the image is a whole number of memory blocks (the builder pads it, sparse).
_PMEM_ALIGN = MEMORY_BLOCK_MIB << 20


#: QEMU's own seccomp filter (``-sandbox``), installed once the machine is
#: set up: a guest that escapes into QEMU still cannot exec, fork, setuid,
#: change scheduling or use obsolete syscalls.  Defence in depth for the
#: process that parses everything a hostile guest sends.
SECCOMP_POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def escape_option(value: str | Path) -> str:
    """Quote a value for QEMU's ``key=value,...`` option syntax: commas double."""
    return str(value).replace(",", ",,")


def _device_suffix(machine_type: str) -> str:
    """virtio over PCI on q35, over MMIO on microvm (no PCI bus there)."""
    return "pci" if machine_type == "q35" else "device"


#: Where vhost-net lives: the kernel's virtio-net data path, used only with KVM
#: (under TCG the guest's rings are QEMU's memory, not the kernel's to read).
VHOST_NET = Path("/dev/vhost-net")


def nic_arguments(
    fd_name: str, mac: str, mtu: int, slot: int, port: str, vhost: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """QMP "netdev_add" and "device_add" arguments of NIC ``slot``; pure.

    The netdev is a tap backend on the file descriptor QEMU received as
    ``fd_name`` (QMP "getfd"); QEMU finds ``IFF_VNET_HDR`` on it itself
    (TUNGETIFF) and then passes offloads through.  The device is a
    virtio-net-pci on root port ``port`` with the engine veth's MAC, and
    ``host_mtu`` tells the guest driver the MTU (VIRTIO_NET_F_MTU, virtio
    1.2, 5.1.3).  No option ROM: the guest is booted already, nothing
    would run it.
    """
    netdev = {"type": "tap", "id": f"netdev{slot}", "fd": fd_name, "vhost": vhost}
    device = {
        "driver": "virtio-net-pci",
        "id": f"nic{slot}",
        "netdev": f"netdev{slot}",
        "mac": mac,
        "host_mtu": mtu,
        "bus": port,
        "romfile": "",
    }
    return netdev, device


def _machine(config: VMConfig, memory_backend: bool) -> list[str]:
    if config.machine_type == "q35":
        props = ["q35", "sata=off", "smbus=off", "vmport=off"]
    else:
        # microvm: the serial port only when it is the debug console; no
        # option ROMs to run (the kernel is loaded directly).
        props = ["microvm", "x-option-roms=off", f"isa-serial={'on' if config.debug else 'off'}"]
    if memory_backend:
        props.append("memory-backend=mem")
    return ["-machine", ",".join(props)]


def _accelerator(config: VMConfig) -> list[str]:
    if config.accelerator == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # TCG: "max" enables every feature TCG emulates.  Multi-threaded TCG
    # only helps with more than one vCPU; with one it is pure overhead.
    accel = "tcg,thread=multi" if config.max_vcpus > 1 else "tcg,thread=single"
    return ["-accel", accel, "-cpu", "max"]


def memory_hotplug(config: VMConfig) -> bool:
    """Whether the VM can grow its RAM by hot-plugged DIMMs."""
    return config.max_memory_mib is not None and config.max_memory_mib > config.memory_mib


def shared_memory(config: VMConfig) -> bool:
    """Whether guest RAM must be shareable (an fd another process can map).

    virtiofsd maps all of it (vhost-user protocol, "Memory regions"), and a
    templated VM keeps it in a file; hot-plugged DIMMs must follow suit.
    """
    return config.templated or any(isinstance(share, VirtioFsShare) for share in config.shares)


def _memory(config: VMConfig, pmem_bytes: int | None) -> list[str]:
    """``-m``: the boot RAM, and the slots and room above it for memory devices.

    Hot-plugged DIMMs (:meth:`QemuHypervisor.resize`) and the rootfs image's
    virtio-pmem are both memory devices: each takes a slot and its size of ``maxmem``.
    """
    size = f"{config.memory_mib}M"
    slots = 0
    maxmem = config.memory_mib
    if memory_hotplug(config):
        assert config.max_memory_mib is not None
        slots += MEMORY_SLOTS
        maxmem = config.max_memory_mib
    if pmem_bytes is not None:
        slots += 1
        maxmem += pmem_bytes >> 20
    if not slots:
        return ["-m", size]
    return ["-m", f"{size},slots={slots},maxmem={maxmem}M"]


def _boot(config: VMConfig, console_params: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    if config.firmware is not None:
        args += ["-bios", str(config.firmware)]
    args += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        args += ["-initrd", str(config.initrd)]
    params = [*console_params, *config.kernel_params]
    if params:
        args += ["-append", " ".join(params)]
    return args


def _console_and_agent(config: VMConfig, console_fd: int | None) -> tuple[list[str], tuple[str, ...]]:
    """The virtio-serial controller, guest console and agent port.

    The console goes to ``console_fd`` (a socket whose other end writes a
    bounded log: hypervisor/bounded_log.py), else to the console log file.
    Returns the arguments and the kernel parameters the console needs.
    """
    suffix = _device_suffix(config.machine_type)
    if console_fd is not None:
        console = f"socket,id=console,fd={console_fd}"
    else:
        console = f"file,id=console,path={escape_option(config.console_log)}"
    args = [
        "-device",
        f"virtio-serial-{suffix},id=vserial0,max_ports=2",
        "-chardev",
        console,
    ]
    if config.debug:
        args += ["-serial", "chardev:console"]
        params: tuple[str, ...] = ("console=ttyS0",)
    else:
        # The first console port of a virtio-serial device is hvc0.
        args += ["-device", "virtconsole,bus=vserial0.0,chardev=console"]
        params = ("console=hvc0",)
    channel = config.agent_channel
    if isinstance(channel, SerialChannel):
        port = f"virtserialport,bus=vserial0.0,chardev=agent,name={AGENT_PORT_NAME}"
        if config.templated:
            port += f",id={AGENT_PORT_ID}"
        args += [
            "-chardev",
            f"socket,id=agent,path={escape_option(channel.socket_path)},server=on,wait=off",
            "-device",
            port,
        ]
    else:
        args += ["-device", f"vhost-vsock-{suffix},id=vsock0,guest-cid={channel.guest_cid}"]
    return args, params


def _shares(config: VMConfig) -> list[str]:
    suffix = _device_suffix(config.machine_type)
    args: list[str] = []
    for index, share in enumerate(config.shares):
        tag = escape_option(share.tag)
        if isinstance(share, VirtioFsShare):
            chardev = f"vfs{index}"
            args += [
                "-chardev",
                f"socket,id={chardev},path={escape_option(share.socket_path)}",
                "-device",
                # 1024 descriptors: the queue size virtiofsd is tuned for.
                f"vhost-user-fs-{suffix},chardev={chardev},tag={tag},queue-size=1024",
            ]
        else:
            fsdev = f"fs{index}"
            # security_model=none: files keep their host owners and modes as
            # they are (QEMU runs as root); multidevs=remap keeps inode
            # numbers unique when the shared tree spans several host devices.
            opts = f"local,id={fsdev},path={escape_option(share.host_path)},security_model=none,multidevs=remap"
            if share.readonly:
                opts += ",readonly=on"
            args += ["-fsdev", opts, "-device", f"virtio-9p-{suffix},fsdev={fsdev},mount_tag={tag}"]
    return args


def _generation_id(config: VMConfig) -> list[str]:
    """A VM generation ID for templated VMs (QEMU docs/specs/vmgenid.txt).

    ``guid=auto`` draws a new one each time QEMU starts; a clone restored
    from the template's state writes its own into guest memory and notifies
    the guest (the device's post-load), whose kernel reseeds its CRNG
    (drivers/virt/vmgenid.c): no two clones go on from the template's
    random state, even before the agent's own reseed.  The argument is the
    same for every start, so the template's key does not change.
    """
    return ["-device", "vmgenid,guid=auto"] if config.templated else []


def _free_page_reporting(config: VMConfig) -> list[str]:
    """A balloon that never inflates, only takes the pages the guest reports free (VIRTIO 1.2, 5.5.6.7).

    The guest's page reporting (mm/page_reporting.c) hands over free blocks
    of at least 2 MiB two seconds after they were freed; QEMU discards each
    (``ram_block_discard_range``: fallocate(PUNCH_HOLE) on a shared RAM file
    or memfd, MADV_DONTNEED on private RAM), and a later guest access gets
    a zeroed page.  A template saved after its initrd was freed and reported
    so leaves that much out of every clone's copy; a running guest gives
    back what its containers freed.
    """
    if not config.free_page_reporting:
        return []
    return ["-device", f"virtio-balloon-{_device_suffix(config.machine_type)},id=balloon0,free-page-reporting=on"]


def _hotplug_slots(config: VMConfig) -> list[str]:
    """Free PCIe root ports for devices plugged after start (q35 hot-plug).

    A q35 root complex cannot take a hot-plugged device itself; a root port
    (one slot each) can.  Chassis numbers only need to be unique.  Every
    q35 VM has them, cold or templated: block volumes (and a clone's
    virtio-fs share) are plugged after boot either way.
    """
    if config.machine_type != "q35":
        return []
    args: list[str] = []
    for slot in range(HOTPLUG_SLOTS):
        args += ["-device", f"pcie-root-port,id=hotplug{slot},bus=pcie.0,chassis={slot + 1}"]
    return args


def _rootfs_image(config: VMConfig, image_bytes: int | None) -> list[str]:
    if config.rootfs_image is None:
        return []
    if image_bytes is None:
        raise HypervisorError("the size of the rootfs image is needed to map it as virtio-pmem")
    return pmem_root_args(config.rootfs_image, image_bytes, config.machine_type)


def pmem_root_args(image: Path, image_bytes: int, machine_type: str) -> list[str]:
    """QEMU arguments that map ``image`` as the guest's ``/dev/pmem0``.

    A virtio-pmem device (no ACPI NFIT needed, as an NVDIMM would) over the
    image file, mapped shared and read-only:

    - the guest mounts it with DAX, so its files are read straight from the
      mapping and never copied into guest RAM (no guest page cache);
    - every VM on the host maps the same file, so they share one copy of its
      pages, the host's page cache;
    - a shared block is left out of a template's state (x-ignore-shared), and
      a read-only one out of what virtiofsd maps (vhost-user maps RAM, not
      ROM); no guest can change the file.
    """
    return [
        "-object",
        f"memory-backend-file,id=rootimg,mem-path={escape_option(image)},size={image_bytes},share=on,readonly=on",
        "-device",
        f"virtio-pmem-{_device_suffix(machine_type)},id=rootpmem,memdev=rootimg",
    ]


def dimm_mib(wanted_mib: int, room_mib: int, free_slots: int = MEMORY_SLOTS) -> int:
    """The DIMM to plug for ``wanted_mib`` more RAM with ``room_mib`` left under maxmem; pure.

    Rounded up to whole memory blocks (:data:`MEMORY_BLOCK_MIB`), or down
    when that does not fit.  The last free slot takes all the room left, so
    the maximum stays reachable however the growth came in steps.  A
    HypervisorError when not one block fits or no slot is free.
    """
    if free_slots < 1:
        raise HypervisorError(f"cannot add {wanted_mib} MiB: all {MEMORY_SLOTS} memory slots are in use")
    blocks = -(-wanted_mib // MEMORY_BLOCK_MIB)
    if free_slots == 1:
        blocks = max(blocks, room_mib // MEMORY_BLOCK_MIB)
    blocks = min(blocks, room_mib // MEMORY_BLOCK_MIB)
    if blocks < 1:
        raise HypervisorError(
            f"cannot add {wanted_mib} MiB: memory grows in {MEMORY_BLOCK_MIB} MiB blocks and {room_mib} MiB are left"
        )
    return blocks * MEMORY_BLOCK_MIB


# _OST arguments (ACPI 6.4, 6.3.5): the event handled, and how it went.
_OST_DEVICE_CHECK = 1  # QEMU announces an inserted CPU or DIMM as Device Check
_OST_SUCCESS = 0
_OST_INSERT_IN_PROGRESS = 0x80


def ospm_outcome(infos: list[dict[str, Any]], devices: set[str]) -> tuple[set[str], list[str]]:
    """Which of ``devices`` the guest reported inserted, and which it reported failing; pure.

    ``infos`` is QMP ``query-acpi-ospm-status``: per CPU and DIMM slot, the
    last ``_OST`` the guest evaluated (``source`` 0 and ``status`` 0 until it
    evaluated one).  The guest reports a hot-add as source Device Check and
    status 0 once done (0x80: still in progress).
    """
    done: set[str] = set()
    failed: list[str] = []
    for info in infos:
        device = info.get("device")
        if device not in devices or info.get("source") != _OST_DEVICE_CHECK:
            continue
        status = info.get("status")
        if status == _OST_SUCCESS:
            done.add(device)
        elif status != _OST_INSERT_IN_PROGRESS:
            failed.append(f"{device} (_OST status {status:#x})" if isinstance(status, int) else str(device))
    return done, sorted(failed)


def pmem_size(image_bytes: int) -> int:
    """The image size rounded up to the NVDIMM alignment."""
    return -(-image_bytes // _PMEM_ALIGN) * _PMEM_ALIGN


@dataclass(frozen=True)
class BlockDisk:
    """A host block device or raw image file to attach as a virtio-blk disk."""

    path: Path
    serial: str  # virtio-blk serial: how the guest finds it (20 bytes at most)
    readonly: bool
    host_device: bool  # a host block device (QEMU's host_device driver), else a regular file

    @property
    def node_name(self) -> str:
        """The QMP block node name (unique per VM, as the serial is)."""
        return f"blk-{self.serial}"


def blockdev_arguments(disk: BlockDisk, fdset: int | None = None) -> dict[str, object]:
    """QMP "blockdev-add" for a raw disk: the raw format over a file or host_device protocol node.

    ``read-only`` on both nodes: QEMU then opens the file O_RDONLY and the
    virtio-blk device tells the guest the disk is read-only (VIRTIO_BLK_F_RO),
    so not even the guest kernel can write to it.  With ``fdset``, QEMU
    opens ``/dev/fdset/N`` (QMP "add-fd"): a descriptor we opened and passed,
    since a confined QEMU can neither see nor open the host's path.
    """
    if len(disk.serial.encode()) > VIRTIO_BLK_SERIAL_BYTES:
        raise HypervisorError(f"virtio-blk serial {disk.serial!r} is longer than {VIRTIO_BLK_SERIAL_BYTES} bytes")
    protocol = "host_device" if disk.host_device else "file"
    return {
        "driver": "raw",
        "node-name": disk.node_name,
        "read-only": disk.readonly,
        "file": {
            "driver": protocol,
            "filename": str(disk.path) if fdset is None else f"/dev/fdset/{fdset}",
            "read-only": disk.readonly,
        },
    }


def virtio_blk_device_id(disk: BlockDisk) -> str:
    return f"{disk.node_name}-dev"


def virtio_blk_arguments(disk: BlockDisk, port: str) -> dict[str, object]:
    """QMP "device_add" of a virtio-blk-pci disk on root port ``port``."""
    return {
        "driver": "virtio-blk-pci",
        "id": virtio_blk_device_id(disk),
        "bus": port,
        "drive": disk.node_name,
        "serial": disk.serial,
    }


def hotplug_root_ports(buses: list[dict[str, Any]]) -> dict[str, bool]:
    """Every ``hotplug<N>`` root port in a QMP "query-pci" answer, and whether a device is plugged in it."""
    ports: dict[str, bool] = {}
    for bus in buses:
        for device in bus.get("devices", []):
            port = device.get("qdev_id", "")
            bridge = device.get("pci_bridge")
            if port.startswith("hotplug") and isinstance(bridge, dict):
                ports[str(port)] = bool(bridge.get("devices"))
    return ports


def free_root_port(buses: list[dict[str, Any]]) -> str | None:
    """The first ``hotplug<N>`` root port in a QMP "query-pci" answer with no device behind it."""
    return next((port for port, used in hotplug_root_ports(buses).items() if not used), None)


def qemu_argv(
    config: VMConfig, *, qmp_fd: int, rootfs_image_bytes: int | None = None, console_fd: int | None = None
) -> list[str]:
    """QEMU's command line for ``config``.

    ``qmp_fd`` is the child's end of the QMP socketpair (inherited by QEMU);
    ``rootfs_image_bytes`` the size of ``config.rootfs_image``, which must
    be a whole number of 128 MiB memory blocks (see :func:`pmem_size`).  Pure: no I/O.
    """
    if config.rootfs_image is not None and config.machine_type != "q35":
        raise HypervisorError("a rootfs image is mapped as virtio-pmem, which microvm lacks: use q35 or an initrd")
    if rootfs_image_bytes is not None and rootfs_image_bytes % _PMEM_ALIGN:
        raise HypervisorError(f"rootfs image size {rootfs_image_bytes} is not a multiple of {MEMORY_BLOCK_MIB} MiB")
    suffix = _device_suffix(config.machine_type)
    # A templated VM always has it: the clone's virtio-fs share is plugged
    # after restore, and the saved RAM must live in the same kind of block.
    memory_backend = shared_memory(config)
    pmem_bytes = rootfs_image_bytes if config.rootfs_image is not None else None
    console_args, console_params = _console_and_agent(config, console_fd)

    argv = [
        str(config.hypervisor_path),
        "-name",
        f"{escape_option('capsa-' + config.name)},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-sandbox",
        SECCOMP_POLICY,
        *_machine(config, memory_backend),
        *_accelerator(config),
        "-smp",
        f"{config.vcpus},maxcpus={config.max_vcpus}",
        *_memory(config, pmem_bytes),
    ]
    if config.memory_file is not None:
        mem_path = escape_option(config.memory_file)
        argv += ["-object", f"memory-backend-file,id=mem,size={config.memory_mib}M,mem-path={mem_path},share=on"]
    elif memory_backend:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on"]
    argv += _boot(config, console_params)
    argv += [
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        f"virtio-rng-{suffix},rng=rng0",
    ]
    argv += console_args
    argv += _shares(config)
    argv += _generation_id(config)
    argv += _free_page_reporting(config)
    argv += _hotplug_slots(config)
    argv += _rootfs_image(config, pmem_bytes)
    argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if config.incoming:
        # Wait, paused, for QMP migrate-incoming (QMP reference,
        # "migrate-incoming"): the state file arrives as a passed fd.
        argv += ["-incoming", "defer"]
    argv += config.extra_args
    return argv


class QemuHypervisor(Hypervisor):
    """One QEMU process running one VM, controlled over QMP.

    ``die_with_parent`` ties QEMU's life to this process (PR_SET_PDEATHSIG),
    for a foreground ``capsa run``; a VM that must outlive its starter (the
    proxy owns it) leaves it off.
    """

    def __init__(
        self,
        config: VMConfig,
        *,
        die_with_parent: bool = False,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        confinement: Confinement | None = None,
    ) -> None:
        self.config = config
        #: Who QEMU runs as and whether jailed (hypervisor/jail.py); None: as we run.
        self.confinement = confinement
        self._die_with_parent = die_with_parent
        self._start_timeout = start_timeout
        self._helper: Helper | None = None
        self._qmp: QMPClient | None = None
        # One hot-plug at a time: choosing a free root port and plugging
        # into it must not interleave with another plug (see free_root_port).
        self._plug_lock = asyncio.Lock()
        #: The fdset (QMP "add-fd") behind each plugged disk, by node name.
        self._fdsets: dict[str, int] = {}
        #: Copies the guest console into its bounded log while QEMU runs.
        self._console: asyncio.Future[None] | None = None

    @property
    def _proc(self) -> asyncio.subprocess.Process | None:
        return self._helper.proc if self._helper is not None else None

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def vmm_pid(self) -> int | None:
        """QEMU's own PID: in a jail, :attr:`pid` is its ``capsa-vmm`` parent (hypervisor/jail.py)."""
        pid = self.pid
        if pid is None or self.confinement is None or not self.confinement.jailed:
            return pid
        return jail.vmm_pid(pid)

    @property
    def console_log(self) -> Path | None:
        return self.config.console_log

    async def start(self) -> None:
        if self._proc is not None:
            raise HypervisorError(f"VM {self.config.name} was already started")
        config = self.config
        confinement = self.confinement
        try:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            if confinement is not None:
                jail.prepare(config, confinement.uid, confinement.gid)
        except OSError as exc:
            raise HypervisorError(f"cannot prepare the VM directory {config.run_dir}: {exc.strerror}") from exc
        confine = None
        plan = None
        if confinement is not None:
            plan = confinement.plan(config)
            confine = functools.partial(jail.confine_hook, plan)
        image_bytes = self.rootfs_image_bytes()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        console_ours, console_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            console_log = BoundedLog(config.console_log)
        except OSError as exc:
            for sock in (ours, theirs, console_ours, console_theirs):
                sock.close()
            raise HypervisorError(f"cannot open the console log {config.console_log}: {exc.strerror}") from exc
        try:
            argv = qemu_argv(
                config,
                qmp_fd=theirs.fileno(),
                rootfs_image_bytes=image_bytes,
                console_fd=console_theirs.fileno(),
            )
            if plan is not None:
                argv = plan.wrap(argv)
            log.debug("starting %s", " ".join(argv))
            self._helper = await spawn(
                argv,
                log_path=config.vmm_log,
                error=HypervisorError,
                pass_fds=(theirs.fileno(), console_theirs.fileno()),
                die_with_parent=self._die_with_parent,
                confine=confine,
            )
        except BaseException:
            ours.close()
            console_ours.close()
            console_log.close()
            raise
        finally:
            theirs.close()
            console_theirs.close()
        journal = ConsoleJournal.open(config.name)  # None unless journald runs
        self._console = asyncio.ensure_future(console_pump(console_ours, console_log, journal))
        self._qmp = QMPClient(f"capsa-{config.name}")
        try:
            await asyncio.wait_for(self._qmp.connect(ours), self._start_timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            ours.close()
            message = await self._failed_start(exc)
            raise HypervisorError(message) from exc
        except BaseException:
            # Cancelled (e.g. Ctrl-C during start): leave nothing running.
            ours.close()
            await self.stop(timeout=0)
            raise

    def rootfs_image_bytes(self) -> int | None:
        """The rootfs image's size in bytes (None without one); a HypervisorError if it cannot map as virtio-pmem."""
        image = self.config.rootfs_image
        if image is None:
            return None
        try:
            size = image.stat().st_size
        except OSError as exc:
            raise HypervisorError(f"rootfs image {image}: {exc.strerror}") from exc
        if size == 0 or size % _PMEM_ALIGN:
            raise HypervisorError(
                f"rootfs image {image} is {size} bytes; virtio-pmem needs a non-zero multiple of "
                f"{MEMORY_BLOCK_MIB} MiB (pad it to {pmem_size(max(size, 1))}: truncate -s)"
            )
        return size

    async def _failed_start(self, exc: BaseException) -> str:
        """Why QEMU did not come up, in QEMU's own words when it said any."""
        proc = self._proc
        assert proc is not None
        # A QEMU that rejects its command line exits at once; give it a
        # moment so its stderr is complete, then make sure it is gone.
        try:
            status = await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            status = None
        await self.stop(timeout=0)
        said = last_line(self.config.vmm_log)  # stop() waited for QEMU's output to reach it
        if status is not None and said:
            return f"QEMU exited with status {status} while starting: {said}"
        if status is not None:
            return f"QEMU exited with status {status} while starting (see {self.config.vmm_log})"
        reason = "did not answer QMP in time" if isinstance(exc, TimeoutError) else f"failed on QMP: {exc}"
        return f"QEMU {reason}; it was killed" + (f" (last said: {said})" if said else "")

    async def console_drained(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout`` s) until the console log holds all QEMU wrote: the pump ends at its EOF."""
        if self._console is not None:
            await settled(self._console, timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            asked = await self._ask_quit(timeout)
            # After QMP "quit" only wait; without a QMP session, SIGTERM
            # (QEMU treats it as a clean quit too).
            await terminate(proc, timeout, (lambda: None) if asked else None)
        await self._close_qmp()
        if self._helper is not None and (proc is None or proc.returncode is not None):
            await self._helper.output_closed()
        console, self._console = self._console, None
        if console is not None:
            # QEMU is gone: the pump reads what is left, sees EOF and closes the log.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(console, 2)
        if isinstance(self.config.agent_channel, SerialChannel):
            # QEMU removes its listening socket on a clean exit, not on SIGKILL.
            with contextlib.suppress(OSError):
                self.config.agent_channel.socket_path.unlink(missing_ok=True)
        if self.confinement is not None and (proc is None or proc.returncode is not None):
            jail.release(self.config)

    async def _ask_quit(self, timeout: float) -> bool:
        """Send QMP ``quit`` (QMP reference, "quit"): QEMU exits at once; the guest is not asked."""
        qmp = self._qmp
        if qmp is None or qmp.runstate != Runstate.RUNNING or timeout <= 0:
            return False
        try:
            await asyncio.wait_for(qmp.execute("quit"), timeout)
        except ExecInterruptedError:
            # QEMU closed the session before answering: it is quitting.
            return True
        except (QMPError, OSError, EOFError, TimeoutError):
            return False
        return True

    async def _close_qmp(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            # disconnect() re-raises what ended the session (EOF when QEMU
            # exited): expected here.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    async def wait(self) -> int:
        if self._proc is None:
            raise HypervisorError(f"VM {self.config.name} was not started")
        return await self._proc.wait()

    async def pause(self) -> None:
        # QMP "stop": pauses every vCPU; "cont" resumes them.
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    # --- resize: CPU and memory hot-plug --------------------------------------

    async def resize(self, vcpus: int, memory_mib: int, timeout: float = DEFAULT_RESIZE_TIMEOUT) -> VMSize:
        """Grow to at least ``vcpus`` and ``memory_mib`` (see :meth:`Hypervisor.resize`).

        CPUs: QMP ``query-hotpluggable-cpus`` lists the free CPU slots of
        ``-smp maxcpus`` with the properties (socket, core, thread) that
        ``device_add`` of their CPU model needs.  Memory: one ``pc-dimm``
        per growth, backed by a new memory backend (``object-add``), in
        multiples of :data:`MEMORY_BLOCK_MIB`; the last step is rounded down
        to fit ``maxmem``, so the result can fall short of ``memory_mib`` by
        less than a block.  Both announce themselves to the guest through
        ACPI (q35's CPU and memory hot-plug controllers); this returns once
        the guest reported each device handled through ``_OST`` (ACPI 6.4,
        6.3.5; QMP ``query-acpi-ospm-status``) or ``timeout`` passed.
        """
        config = self.config
        if vcpus < 1 or memory_mib < 1:
            raise HypervisorError(f"cannot resize VM {config.name} to {vcpus} vCPUs and {memory_mib} MiB")
        current = await self.size()
        grow_cpus = max(0, vcpus - current.vcpus)
        grow_mib = max(0, memory_mib - current.memory_mib)
        if not grow_cpus and not grow_mib:
            return current
        if config.machine_type != "q35":
            raise HypervisorError(f"VM {config.name} is a {config.machine_type}, which has no CPU or memory hot-plug")
        if vcpus > config.max_vcpus:
            raise HypervisorError(
                f"VM {config.name} cannot grow to {vcpus} vCPUs: its maximum is {config.max_vcpus} "
                "(hypervisor.max_vcpus)"
            )
        max_memory = config.max_memory_mib if memory_hotplug(config) else config.memory_mib
        assert max_memory is not None
        if memory_mib > max_memory:
            raise HypervisorError(
                f"VM {config.name} cannot grow to {memory_mib} MiB: its maximum is {max_memory} MiB "
                "(hypervisor.max_memory_mib)"
            )
        plugged: list[tuple[str, str]] = []  # (slot type, device id) to wait for
        if grow_cpus:
            plugged += await self._plug_cpus(grow_cpus)
        if grow_mib:
            plugged += await self._plug_memory(grow_mib, max_memory - current.memory_mib)
        await self._wait_ospm(plugged, timeout)
        return await self.size()

    async def size(self) -> VMSize:
        """The VM's vCPUs (QMP ``query-cpus-fast``) and RAM: boot RAM plus
        plugged DIMMs (``query-memory-devices``; the rootfs virtio-pmem is not RAM)."""
        cpus = await self._execute("query-cpus-fast")
        devices = await self._execute("query-memory-devices")
        dimm_bytes = sum(d["data"]["size"] for d in devices if d.get("type") == "dimm")
        return VMSize(len(cpus), self.config.memory_mib + (dimm_bytes >> 20))

    async def _plug_cpus(self, count: int) -> list[tuple[str, str]]:
        slots = await self._execute("query-hotpluggable-cpus")
        free = sorted(
            (slot for slot in slots if "qom-path" not in slot),
            key=lambda slot: tuple(sorted(slot["props"].items())),
        )
        if len(free) < count:
            raise HypervisorError(f"VM {self.config.name} has {len(free)} free CPU slots, not {count}")
        plugged = []
        for slot in free[:count]:
            props = slot["props"]
            # Unique per slot, so a later resize never meets an id in use.
            device_id = "cpu-" + "-".join(f"{props[k]}" for k in ("socket-id", "core-id", "thread-id") if k in props)
            await self._execute("device_add", {"driver": slot["type"], "id": device_id, **props})
            plugged.append(("CPU", device_id))
        return plugged

    async def _plug_memory(self, wanted_mib: int, room_mib: int) -> list[tuple[str, str]]:
        devices = await self._execute("query-memory-devices")
        used = {d["data"].get("id") for d in devices if d.get("type") == "dimm"}
        size_mib = dimm_mib(wanted_mib, room_mib, MEMORY_SLOTS - len(used))
        index = next(i for i in range(len(used) + 1) if f"dimm{i}" not in used)
        backend = f"dimm{index}-mem"
        memory: dict[str, object] = {"qom-type": "memory-backend-ram", "id": backend, "size": size_mib << 20}
        if shared_memory(self.config):
            # Like the boot RAM: virtiofsd must be able to map it too.
            memory.update({"qom-type": "memory-backend-memfd", "share": True})
        await self._execute("object-add", memory)
        try:
            await self._execute("device_add", {"driver": "pc-dimm", "id": f"dimm{index}", "memdev": backend})
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self._execute("object-del", {"id": backend})
            raise
        return [("DIMM", f"dimm{index}")]

    async def _wait_ospm(self, plugged: list[tuple[str, str]], timeout: float) -> None:
        """Wait until the guest's ACPI driver handled every plugged device (``_OST`` reported).

        QEMU records the last ``_OST`` of each CPU and DIMM slot; Linux
        evaluates it when it has added the device (drivers/acpi/scan.c,
        ``acpi_device_hotplug``), after onlining hot-added memory when
        auto-online is on.  Status 0 is success (ACPI 6.4, table 6.179).
        """
        if not plugged:
            return
        wanted = {device for _, device in plugged}
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            infos = await self._execute("query-acpi-ospm-status")
            done, failed = ospm_outcome(infos, wanted)
            if failed:
                raise HypervisorError(f"the guest of VM {self.config.name} refused {', '.join(failed)}")
            if done == wanted:
                return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(wanted - set(done)))
                raise HypervisorError(
                    f"the guest of VM {self.config.name} did not take the hot-plugged {missing} within {timeout:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        qmp = self._qmp
        if qmp is None or self.pid is None:
            raise HypervisorError(f"VM {self.config.name} is not running")
        try:
            return await qmp.execute(command, arguments)
        except (QMPError, OSError, EOFError) as exc:
            raise HypervisorError(f"QMP {command} failed for VM {self.config.name}: {exc}") from exc

    async def human_monitor(self, command_line: str) -> str:
        """What a human monitor (HMP) command prints (QMP "human-monitor-command");
        for diagnostics, e.g. ``info registers``, which QMP has no command for."""
        output = await self._execute("human-monitor-command", {"command-line": command_line})
        return str(output)

    # --- templates: save, restore, hot-plug ---------------------------------

    async def _pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file (QMP "getfd": the fd rides on the command as SCM_RIGHTS).

        QEMU runs under ``-sandbox spawn=deny``, so the ``exec:`` migration
        transport (which forks a shell) is not available; ``fd:`` is.
        """
        qmp = self._qmp
        if qmp is None:
            raise HypervisorError(f"VM {self.config.name} is not running")
        try:
            qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"cannot pass a file to VM {self.config.name}: {exc}") from exc
        await self._execute("getfd", {"fdname": name})

    async def _ignore_shared_memory(self) -> None:
        """Leave RAM in a shared file out of the migration stream (QMP
        "migrate-set-capabilities", ``x-ignore-shared``): both sides map the
        same contents from a file, so only device state travels."""
        if self.config.memory_file is not None:
            capability = {"capability": "x-ignore-shared", "state": True}
            await self._execute("migrate-set-capabilities", {"capabilities": [capability]})

    async def save_state(self, path: Path, timeout: float = 60.0) -> None:
        """Pause the VM and write its state to ``path`` (QMP "stop", "migrate").

        With a ``memory_file`` the RAM stays in that file and the state is
        only the devices'; otherwise the RAM is in the stream (all-zero pages
        take a few bytes each, but loading them still touches every page).
        """
        await self.pause()
        await self._ignore_shared_memory()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self._pass_fd(fd, "capsa-save")
        finally:
            os.close(fd)
        await self._execute("migrate", {"uri": "fd:capsa-save"})
        await self._wait_migration(timeout, "saving")

    async def restore_state(self, path: Path, timeout: float = 60.0) -> None:
        """Load a state saved by :meth:`save_state` and run the vCPUs (QMP "migrate-incoming", "cont").

        The VM must have been started with ``incoming`` and the same
        hardware as the saved one; QEMU checks each device's state as it loads.
        """
        if not self.config.incoming:
            raise HypervisorError(f"VM {self.config.name} was not started to receive a saved state")
        await self._ignore_shared_memory()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._pass_fd(fd, "capsa-restore")
        finally:
            os.close(fd)
        await self._execute("migrate-incoming", {"uri": "fd:capsa-restore"})
        await self._wait_migration(timeout, "restoring")
        await self.resume()

    async def _wait_migration(self, timeout: float, what: str) -> None:
        """Poll QMP "query-migrate" until the stream is done (QEMU 7.2 has no
        file-migration completion event worth waiting on besides MIGRATION,
        which needs the "events" capability; polling is as quick here)."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            info = await self._execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                detail = info.get("error-desc", status)
                raise HypervisorError(f"{what} the state of VM {self.config.name} failed: {detail}")
            if self.pid is None:
                raise HypervisorError(f"VM {self.config.name} exited while {what} its state")
            if time.monotonic() > deadline:
                raise HypervisorError(f"{what} the state of VM {self.config.name} took over {timeout:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def plug_virtiofs(self, share: VirtioFsShare, slot: int) -> None:
        """Hot-plug a virtio-fs device on free root port ``hotplug<slot>``
        (QMP "chardev-add", "device_add"); the guest's PCIe/ACPI hot-plug
        driver finds it."""
        if not self.config.templated or not 0 <= slot < HOTPLUG_SLOTS:
            raise HypervisorError(f"VM {self.config.name} has no free hot-plug slot {slot}")
        chardev = f"vfs-plugged{slot}"
        await self._execute(
            "chardev-add",
            {
                "id": chardev,
                "backend": {
                    "type": "socket",
                    "data": {"addr": {"type": "unix", "data": {"path": str(share.socket_path)}}, "server": False},
                },
            },
        )
        await self._execute(
            "device_add",
            {
                "driver": "vhost-user-fs-pci",
                "id": f"fs-plugged{slot}",
                "bus": f"hotplug{slot}",
                "chardev": chardev,
                "tag": share.tag,
                "queue-size": 1024,
            },
        )

    # --- block devices: virtio-blk disks plugged and unplugged at run time --------

    async def free_root_port(self) -> str:
        """The id of a ``hotplug<N>`` root port with nothing plugged in it (QMP "query-pci").

        QEMU's own view, so a port some other device (a NIC, a share) took
        is never offered twice.  Call it under ``_plug_lock``.
        """
        buses = await self._execute("query-pci")
        port = free_root_port(buses if isinstance(buses, list) else [])
        if port is None:
            raise HypervisorError(f"VM {self.config.name} has no free PCIe root port to plug a device into")
        return port

    async def hotplug_root_ports(self) -> dict[str, bool]:
        """Each ``hotplug<N>`` root port and whether a device is plugged in it, as QEMU sees them (QMP "query-pci")."""
        buses = await self._execute("query-pci")
        return hotplug_root_ports(buses if isinstance(buses, list) else [])

    async def plug_block(self, disk: BlockDisk) -> None:
        """Attach a host block device or raw image file as a virtio-blk disk (QMP "blockdev-add", "device_add").

        The guest finds it by ``disk.serial``.  On failure nothing of it is left in QEMU.
        """
        async with self._plug_lock:
            port = await self.free_root_port()
            fdset = await self._add_fd(disk.path, os.O_RDONLY if disk.readonly else os.O_RDWR)
            try:
                await self._execute("blockdev-add", blockdev_arguments(disk, fdset))
            except HypervisorError:
                await self._remove_fd(fdset)
                raise
            self._fdsets[disk.node_name] = fdset
            try:
                await self._execute("device_add", virtio_blk_arguments(disk, port))
            except HypervisorError:
                with contextlib.suppress(HypervisorError):
                    await self._execute("blockdev-del", {"node-name": disk.node_name})
                await self._remove_fd(self._fdsets.pop(disk.node_name))
                raise

    async def _add_fd(self, path: Path, flags: int) -> int:
        """Open ``path`` here and add it to a new fdset of QEMU's (QMP "add-fd"); return the set's id."""
        qmp = self._qmp
        if qmp is None:
            raise HypervisorError(f"VM {self.config.name} is not running")
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise HypervisorError(f"cannot open {path} for VM {self.config.name}: {exc.strerror}") from exc
        try:
            qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"cannot pass {path} to VM {self.config.name}: {exc}") from exc
        finally:
            os.close(fd)
        added = await self._execute("add-fd", {"opaque": str(path)})
        if not isinstance(added, dict) or not isinstance(added.get("fdset-id"), int):
            raise HypervisorError(f"QEMU's add-fd answered {added!r}")
        return int(added["fdset-id"])

    async def _remove_fd(self, fdset: int) -> None:
        with contextlib.suppress(HypervisorError):
            await self._execute("remove-fd", {"fdset-id": fdset})

    async def unplug_block(self, disk: BlockDisk, timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> None:
        """Detach a disk :meth:`plug_block` attached (QMP "device_del", then "blockdev-del").

        device_del only asks the guest to let go; QEMU says it did with a
        ``DEVICE_DELETED`` event, and only then may the backing node go (QMP
        reference, "device_del").  The guest has unmounted it by then.
        """
        await self._device_del(virtio_blk_device_id(disk), f"disk {disk.serial}", timeout)
        await self._execute("blockdev-del", {"node-name": disk.node_name})
        fdset = self._fdsets.pop(disk.node_name, None)
        if fdset is not None:
            await self._remove_fd(fdset)

    @contextlib.asynccontextmanager
    async def agent_port_events(self) -> AsyncIterator[EventListener]:
        """QMP ``VSERPORT_CHANGE`` events of the agent port: the guest opened
        or closed its end (``data.open``).  Only a templated VM names the port."""
        qmp = self._qmp
        if qmp is None or not self.config.templated:
            raise HypervisorError(f"VM {self.config.name} has no agent port events")
        listener = EventListener(("VSERPORT_CHANGE",))
        with qmp.listen(listener):
            yield listener

    @staticmethod
    async def agent_port_change(events: EventListener) -> bool:
        """The agent port's next change among :meth:`agent_port_events`: True when the guest opened it."""
        while True:
            event = await events.get()
            data: object = event["data"] if "data" in event else None  # noqa: SIM401 (Message has no .get)
            if isinstance(data, dict) and data.get("id") == AGENT_PORT_ID:
                return bool(data.get("open"))

    # --- NICs: the engine's network, plugged after boot ----------------------------

    async def plug_nic(self, tap_fd: int, mac: str, mtu: int, slot: int) -> None:
        """Hot-plug a virtio-net NIC on an open tap (QMP "getfd", "netdev_add", "device_add").

        The same path for cold and restored VMs: a template never has a NIC
        (its tap would belong to another sandbox), and one code path is one
        to test.  vhost-net only where ``/dev/vhost-net`` exists and the VM
        runs under KVM.  On failure nothing of the NIC is left in QEMU.
        """
        if self.config.machine_type != "q35":
            raise HypervisorError(f"VM {self.config.name} is a {self.config.machine_type}: no PCI hot-plug for a NIC")
        vhost = self.config.accelerator == "kvm" and VHOST_NET.exists()
        fd_name = f"nic{slot}-tap"
        async with self._plug_lock:
            port = await self.free_root_port()
            netdev, device = nic_arguments(fd_name, mac, mtu, slot, port, vhost)
            await self._pass_fd(tap_fd, fd_name)
            try:
                await self._execute("netdev_add", netdev)
            except HypervisorError:
                with contextlib.suppress(HypervisorError):
                    await self._execute("closefd", {"fdname": fd_name})
                raise
            try:
                await self._execute("device_add", device)
            except HypervisorError:
                # netdev_add consumed the named fd; deleting the netdev closes it.
                with contextlib.suppress(HypervisorError):
                    await self._execute("netdev_del", {"id": netdev["id"]})
                raise

    async def _device_del(self, device_id: str, what: str, timeout: float) -> None:
        """QMP "device_del", then wait for QEMU's ``DEVICE_DELETED``: the guest let go (ACPI eject)."""
        qmp = self._qmp
        if qmp is None or self.pid is None:
            raise HypervisorError(f"VM {self.config.name} is not running")
        listener = EventListener(("DEVICE_DELETED",))
        with qmp.listen(listener):
            await self._execute("device_del", {"id": device_id})
            try:
                async with asyncio.timeout(timeout):
                    async for event in listener:
                        data = event.get("data")
                        if isinstance(data, dict) and data.get("device") == device_id:
                            return
            except TimeoutError:
                raise HypervisorError(
                    f"the guest of VM {self.config.name} did not release {what} within {timeout:.0f} s"
                ) from None

    async def unplug_nic(self, slot: int, timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> None:
        """Take NIC ``slot`` out (QMP "device_del", then "netdev_del" once QEMU reports
        ``DEVICE_DELETED``: the guest let go of it through ACPI eject); its tap fd closes with the netdev."""
        await self._device_del(f"nic{slot}", f"NIC {slot}", timeout)
        await self._execute("netdev_del", {"id": f"netdev{slot}"})
