"""The hypervisor driver interface and the VM description it takes.

A driver turns one :class:`VMConfig` into one running VMM process and back
into nothing.  The interface is deliberately narrow (start, stop, wait,
pause, resume, and where the console goes) so that another VMM (Firecracker,
Cloud Hypervisor) can stand behind it: everything the runtime knows about a
VM is in the config, everything VMM-specific is in the driver.

The config is already *resolved*: the accelerator is ``kvm`` or ``tcg``
(never ``auto``, see :mod:`capsa.hypervisor.accel`), the paths are final and
the kernel parameters are the caller's.  A driver adds only the parameters its
virtual hardware needs (e.g. ``console=hvc0`` for a virtio console).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from capsa.errors import HypervisorError

ACCELERATORS = ("kvm", "tcg")
MACHINE_TYPES = ("q35", "microvm")

#: Name of the virtio-serial port the agent listens on (common brief); the
#: guest finds it through ``/sys/class/virtio-ports/*/name``.
AGENT_PORT_NAME = "capsa.agent"

#: QEMU device id of the agent's virtio-serial port on a templated VM: QMP
#: ``VSERPORT_CHANGE`` events name the port by it.
AGENT_PORT_ID = "agent-port"

#: Root ports a q35 VM keeps free for devices plugged after boot (a
#: clone's two virtio-fs shares, NICs, block volumes), named ``hotplug0``,
#: ...  Five: a clone's shares take ``hotplug0`` and ``hotplug1``, which
#: leaves three for NICs and disks, as many as before the volume share.
HOTPLUG_SLOTS = 5

#: DIMM slots a VM with memory hot-plug has: each growth plugs one DIMM.
#: vhost-user backends (virtiofsd) map every RAM region; without the
#: CONFIGURE_MEM_SLOTS protocol feature they take 8, of which q35's RAM below
#: 4 GiB uses 2, so 6 DIMMs work with any backend.
MEMORY_SLOTS = 6

#: Hot-plugged memory comes in multiples of the guest's memory block (the
#: x86-64 sparsemem section, 128 MiB): Linux onlines whole blocks only
#: (Documentation/admin-guide/mm/memory-hotplug.rst, "Memory Blocks").
MEMORY_BLOCK_MIB = 128

#: Default AF_VSOCK port of the agent (kernel parameter ``capsa.vsock_port``).
DEFAULT_VSOCK_PORT = 1024

# AF_VSOCK reserves CIDs 0 (hypervisor), 1 (loopback) and 2 (host), and
# VMADDR_CID_ANY is 0xFFFFFFFF (linux/vm_sockets.h).
_MIN_GUEST_CID = 3
_MAX_GUEST_CID = 0xFFFFFFFE


@dataclass(frozen=True)
class SerialChannel:
    """The agent behind a virtio-serial port, bridged to a host unix socket.

    The VMM listens on ``socket_path``; the host connects to it.  Used where
    ``/dev/vhost-vsock`` is missing.
    """

    socket_path: Path


@dataclass(frozen=True)
class VsockChannel:
    """The agent on AF_VSOCK ``guest_cid:port`` through vhost-vsock."""

    guest_cid: int
    port: int = DEFAULT_VSOCK_PORT

    def __post_init__(self) -> None:
        if not _MIN_GUEST_CID <= self.guest_cid <= _MAX_GUEST_CID:
            raise HypervisorError(f"vsock guest CID {self.guest_cid} is out of range 3..{_MAX_GUEST_CID}")


AgentChannel = SerialChannel | VsockChannel


@dataclass(frozen=True)
class VirtioFsShare:
    """A directory served by a virtiofsd listening on ``socket_path``.

    The guest mounts it with ``mount -t virtiofs <tag> <dir>``.  The daemon is
    started by :mod:`capsa.storage.virtiofsd`, not by the driver.
    """

    tag: str
    socket_path: Path


@dataclass(frozen=True)
class NinePShare:
    """A host directory exported by the VMM itself over virtio-9p.

    The guest mounts it with ``mount -t 9p -o trans=virtio,version=9p2000.L
    <tag> <dir>``.
    """

    tag: str
    host_path: Path
    readonly: bool = False


Share = VirtioFsShare | NinePShare


@dataclass(frozen=True, kw_only=True)
class VMConfig:
    """Everything a driver needs to start one VM; checked when built."""

    #: Sandbox ID: names the VM in ``ps`` and logs.
    name: str
    #: Where the VM's sockets live.  Unix socket paths are limited to
    #: 107 bytes, so this must be short.
    run_dir: Path
    hypervisor_path: Path
    kernel: Path
    agent_channel: AgentChannel
    #: ``kvm`` or ``tcg``, already chosen (:func:`capsa.hypervisor.accel.resolve_accelerator`).
    accelerator: str
    machine_type: str = "q35"
    vcpus: int = 1
    #: CPUs the VM can grow to by hot-plug (``-smp maxcpus``).
    max_vcpus: int = 1
    memory_mib: int = 512
    #: RAM the VM can grow to by hot-plugging DIMMs (``-m maxmem``); None:
    #: no memory hot-plug.  q35 only.
    max_memory_mib: int | None = None
    #: At most one of ``initrd`` and ``rootfs_image``; neither boots the
    #: kernel alone (the accelerator probe does that).
    initrd: Path | None = None
    rootfs_image: Path | None = None
    kernel_params: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    #: Firmware instead of the VMM's default (e.g. qboot.rom for a faster q35).
    firmware: Path | None = None
    #: Appended verbatim to the VMM's command line; the escape hatch.
    extra_args: tuple[str, ...] = ()
    #: Debug: the console captures the guest's boot from its first line.
    debug: bool = False
    #: The VM is saved as, or restored from, a template
    #: (:mod:`capsa.hypervisor.template`): its hardware is the layout both
    #: sides share (guest RAM always in a shareable memfd, free PCIe root
    #: ports for hot-plugged shares, a named agent port); q35 and the serial
    #: agent channel only.
    templated: bool = False
    #: Start paused, waiting for a saved state (QEMU ``-incoming defer``).
    incoming: bool = False
    #: Guest RAM in this file, mapped shared, instead of an anonymous memfd:
    #: a template keeps its memory there, and a clone runs on a copy of it,
    #: so the saved state need not carry the RAM (templated VMs only).
    memory_file: Path | None = None
    #: Where the console and VMM logs go (None: ``run_dir``).
    log_dir: Path | None = None
    #: A virtio-balloon device that only reports free pages
    #: (``free-page-reporting=on``): the guest hands back blocks it freed,
    #: and QEMU punches them out of the RAM file (or memfd), so the host
    #: gets them back.  Never inflated: the guest keeps all of its RAM.
    free_page_reporting: bool = False

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise HypervisorError(f"accelerator must be one of {', '.join(ACCELERATORS)}, not {self.accelerator!r}")
        if self.machine_type not in MACHINE_TYPES:
            raise HypervisorError(f"machine type must be one of {', '.join(MACHINE_TYPES)}, not {self.machine_type!r}")
        if self.vcpus < 1 or self.max_vcpus < self.vcpus:
            raise HypervisorError(f"vcpus {self.vcpus} and max_vcpus {self.max_vcpus}: need 1 <= vcpus <= max_vcpus")
        if self.memory_mib < 64:
            raise HypervisorError(f"memory {self.memory_mib} MiB is too small for a guest kernel (at least 64)")
        if self.max_memory_mib is not None:
            if self.max_memory_mib < self.memory_mib:
                raise HypervisorError(
                    f"memory {self.memory_mib} MiB and max_memory {self.max_memory_mib} MiB: need memory <= max_memory"
                )
            if self.machine_type != "q35":
                # microvm has no ACPI memory hot-plug controller for DIMMs.
                raise HypervisorError("memory hot-plug (max_memory_mib) needs machine type q35")
        if self.initrd is not None and self.rootfs_image is not None:
            raise HypervisorError("a VM boots from an initrd or a rootfs image, not both")
        if self.templated and (self.machine_type != "q35" or not isinstance(self.agent_channel, SerialChannel)):
            # Hot-plug needs PCIe root ports; a vsock CID is device state
            # that a restored clone cannot change.
            raise HypervisorError("a templated VM needs machine type q35 and the serial agent channel")
        if (self.incoming or self.memory_file is not None) and not self.templated:
            raise HypervisorError("only a templated VM can be restored from a saved state")
        tags = [share.tag for share in self.shares]
        for tag in tags:
            # virtio-fs tags are at most 36 bytes (virtio spec 1.2, 5.11.4,
            # "tag"); 9p mount tags are limited the same way in practice.
            if not tag or len(tag.encode()) > 36:
                raise HypervisorError(f"share tag {tag!r} must be 1 to 36 bytes")
        if len(set(tags)) != len(tags):
            raise HypervisorError(f"share tags must be unique: {', '.join(tags)}")

    @property
    def console_log(self) -> Path:
        """Where the guest console is written."""
        return (self.log_dir or self.run_dir) / "console.log"

    @property
    def vmm_log(self) -> Path:
        """Where the VMM's own stderr goes; its last line explains a failed start."""
        return (self.log_dir or self.run_dir) / "vmm.log"


class VMSize(NamedTuple):
    """A running VM's size: its vCPUs and its RAM in MiB."""

    vcpus: int
    memory_mib: int


class Hypervisor(abc.ABC):
    """One VM's VMM process, from start to reaped.

    Every method raises :class:`~capsa.errors.HypervisorError` (never the
    VMM library's or the OS's exceptions) and is safe to call from one asyncio
    task at a time.
    """

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """PID of the VMM once started, until it is reaped."""

    @property
    @abc.abstractmethod
    def console_log(self) -> Path | None:
        """The file holding the guest console, if the driver writes one."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the VMM; return once it runs the guest and is controllable.

        On failure nothing is left running and the error carries the VMM's
        own explanation.
        """

    @abc.abstractmethod
    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the VMM and reap it: politely, then by SIGKILL after ``timeout``.

        Idempotent, and safe before :meth:`start` or after the VM exited.
        """

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait until the VMM exits; return its exit status."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Freeze every vCPU."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Run the vCPUs again after :meth:`pause`."""

    @abc.abstractmethod
    async def resize(self, vcpus: int, memory_mib: int) -> VMSize:
        """Grow the VM to at least ``vcpus`` vCPUs and ``memory_mib`` MiB of RAM; return its new size.

        Only grows: a smaller value than the VM has leaves that part as it
        is (taking CPUs or memory back from a running guest needs its
        cooperation and can fail; no caller needs it).  Growing past the
        VM's ``max_vcpus`` / ``max_memory_mib`` is an error, and so is any
        growth on a VMM or machine without hot-plug.  Returns once the guest
        kernel has taken the new hardware (memory online; CPUs present,
        which the agent onlines).
        """

    @abc.abstractmethod
    async def plug_nic(self, tap_fd: int, mac: str, mtu: int, slot: int) -> None:
        """Hot-plug a virtio-net NIC with ``mac`` and ``mtu`` on the tap (or
        macvtap) open at ``tap_fd``; ``slot`` numbers the sandbox's NICs
        (0, 1, ...) and names the VMM's objects for it.

        The VMM keeps its own copy of ``tap_fd``; the caller may close its
        one afterwards.  Returns once the VMM added the device; the guest
        kernel probes it a moment later.  A VM without free hot-plug room
        (microvm, or every root port taken) is a HypervisorError.
        """

    @abc.abstractmethod
    async def unplug_nic(self, slot: int) -> None:
        """Take out the NIC :meth:`plug_nic` plugged as ``slot``; returns once the guest let go of it."""
