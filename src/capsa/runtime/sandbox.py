"""A sandbox: one VM, the helpers that serve it, and the agent inside.

Starting one is: share the container's rootfs and, with virtio-fs, the bind
volumes (a virtiofsd each; 9p needs no helper and has one share), boot
QEMU, wait for the agent to answer ``Check``, then ``CreateSandbox``.
Stopping is the reverse and is safe to call at any point of a half-finished
start, which is what lets a failed ``capsa run`` leave nothing behind.

The kernel command line and the VM description are built by pure functions
(:func:`kernel_cmdline`, :func:`vm_config`) from the configuration, so they
are tested as data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from pathlib import Path

from capsa.config import Config, host_cpus, host_memory_mib, max_memory_mib_for, max_vcpus_for
from capsa.errors import CapsaError, GuestImageError, HypervisorError
from capsa.hypervisor import guest_console, refresh, template
from capsa.hypervisor.accel import resolve_accelerator
from capsa.hypervisor.base import (
    AgentChannel,
    NinePShare,
    SerialChannel,
    Share,
    VirtioFsShare,
    VMConfig,
    VsockChannel,
)
from capsa.hypervisor.jail import Confinement
from capsa.hypervisor.qemu import QemuHypervisor
from capsa.protocols import agent_pb2 as pb
from capsa.runtime import counters
from capsa.runtime.admission import admit
from capsa.runtime.agent_client import AgentClient
from capsa.runtime.identity import IdentityAllocator, SandboxIdentity
from capsa.runtime.mounts import SHARE_TAG, VOLUME_SHARE_TAG
from capsa.storage.virtiofsd import Virtiofsd

log = logging.getLogger("capsa.sandbox")

#: The shares' tags, one name with the mount plans that refer to them.
ROOTFS_TAG = SHARE_TAG
VOLUME_TAG = VOLUME_SHARE_TAG
VHOST_VSOCK = Path("/dev/vhost-vsock")
#: Bytes of host entropy each sandbox's kernel pool gets at CreateSandbox.
SANDBOX_ENTROPY_BYTES = 64
#: Where a clone's copy of the template RAM lives while QEMU opens it: tmpfs,
#: because guest RAM in a disk-backed file would be written back to disk.
CLONE_MEMORY_DIR = Path("/dev/shm")
#: How long a sandbox waits for another process making the same template.
TEMPLATE_LOCK_TIMEOUT = 120.0

# Kernel parameters that shave boot time in a VM with no legacy hardware
# worth probing (the same set Kata uses): trust the TSC, skip the i8042
# and timer checks, expedite RCU, no crypto self-tests.
FAST_BOOT_PARAMS = (
    "tsc=reliable",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "i8042.direct=1",
    "i8042.dumbkbd=1",
    "i8042.nopnp=1",
    "i8042.noaux=1",
    "noreplace-smp",
    "reboot=k",
    "cryptomgr.notests",
    "pci=lastbus=0",
)
#: The guest's root when it boots from the image (``[hypervisor] image``):
#: erofs on the virtio-pmem device, read-only, mounted with DAX.
ROOT_IMAGE_PARAMS = ("root=/dev/pmem0", "rootfstype=erofs", "rootflags=dax", "ro")


@dataclass(frozen=True)
class SandboxSpec:
    """What the runtime asks of a sandbox, before the configuration fills in the rest."""

    id: str
    #: Where the VM's logs go (the container's state directory).
    run_dir: Path
    rootfs: Path
    hostname: str = ""
    vcpus: int | None = None
    memory_mib: int | None = None
    # The bind-volume share's directory (virtio-fs only: a second virtiofsd
    # with [shared_fs] virtiofs_volume_timeout); None: the rootfs share only.
    volumes: Path | None = None
    #: Where the VM's sockets go (None: ``run_dir``); short, since a unix
    #: socket's path holds at most 107 bytes (runtime/state.py).
    socket_dir: Path | None = None

    @property
    def sockets(self) -> Path:
        return self.socket_dir or self.run_dir

    @property
    def vm_sockets(self) -> Path:
        """The VM's own sockets (agent, virtiofsd): a directory its QEMU's uid owns,
        apart from the proxy's socket, which that uid must not reach."""
        return self.sockets / "vm"


def choose_channel(config: Config, vhost_vsock_present: bool) -> str:
    """vsock where the host has vhost-vsock, else virtio-serial (DESIGN.md, decision 2)."""
    wanted = config.agent.channel
    if wanted == "auto":
        return "vsock" if vhost_vsock_present else "serial"
    if wanted == "vsock" and not vhost_vsock_present:
        raise HypervisorError(f"agent.channel is vsock but {VHOST_VSOCK} does not exist")
    return wanted


def renews_agent(mode: str, accelerator: str) -> bool:
    """Whether a clone's agent renews itself (``[hypervisor] template_renew_agent``); pure."""
    return mode == "always" or (mode == "auto" and accelerator == "kvm")


def kernel_cmdline(config: Config, channel: str, debug: bool) -> tuple[str, ...]:
    params: list[str] = ["panic=-1", "random.trust_cpu=on", *FAST_BOOT_PARAMS]
    params.append("loglevel=7" if debug else "quiet")
    params.append(f"capsa.channel={channel}")
    if channel == "vsock":
        params.append(f"capsa.vsock_port={config.agent.vsock_port}")
    if debug:
        params.append("capsa.debug=1")
    if config.hypervisor.image is not None:
        params += [*ROOT_IMAGE_PARAMS, "init=/init"]
    else:
        params.append("rdinit=/init")
    params += config.hypervisor.kernel_params
    return tuple(params)


def vm_config(
    config: Config,
    spec: SandboxSpec,
    accelerator: str,
    channel: AgentChannel,
    shares: tuple[Share, ...],
    debug: bool,
) -> VMConfig:
    hv = config.hypervisor
    vcpus = spec.vcpus or hv.default_vcpus
    memory_mib = spec.memory_mib or hv.default_memory_mib
    # Room to grow by hot-plug (`capsa update`); microvm has none.
    hotplug = hv.machine_type == "q35"
    max_vcpus = max(vcpus, max_vcpus_for(hv, host_cpus())) if hotplug else vcpus
    max_memory_mib = max(memory_mib, max_memory_mib_for(hv, host_memory_mib())) if hotplug else None
    return VMConfig(
        name=spec.id,
        run_dir=spec.vm_sockets,
        log_dir=spec.run_dir,
        hypervisor_path=hv.path,
        machine_type=hv.machine_type,
        accelerator=accelerator,
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_mib=memory_mib,
        max_memory_mib=max_memory_mib,
        kernel=hv.kernel,
        initrd=None if hv.image is not None else hv.initrd,
        rootfs_image=hv.image,
        kernel_params=kernel_cmdline(config, "vsock" if isinstance(channel, VsockChannel) else "serial", debug),
        agent_channel=channel,
        shares=shares,
        firmware=hv.firmware,
        extra_args=hv.extra_args,
        debug=debug,
        free_page_reporting=hv.free_page_reporting,
    )


def clone_memory_prefix(sockets: Path) -> str:
    """How a sandbox's RAM copies in ``/dev/shm`` are named: by a hash of its socket
    directory, not its ID (an ID can be as long as a file name may be)."""
    return f"capsa-{hashlib.sha256(os.fsencode(sockets)).hexdigest()[:16]}-"


def sweep_clone_memory(sockets: Path) -> list[Path]:
    """Remove the RAM copies a sandbox left behind (its proxy was killed before
    QEMU had mapped one, when it unlinks it); the paths removed."""
    prefix = clone_memory_prefix(sockets)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(CLONE_MEMORY_DIR):
            if entry.name.startswith(prefix) and entry.name.endswith(".mem"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def check_guest_files(config: Config) -> None:
    """The kernel and image must exist before anything is started."""
    hv = config.hypervisor
    where = f" (set in {config.source})" if config.source else ""
    if not hv.path.exists():
        raise HypervisorError(f"hypervisor {hv.path} does not exist{where}")
    if not hv.kernel.exists():
        raise GuestImageError(f"guest kernel {hv.kernel} does not exist{where}: build it with guest/kernel/build.py")
    image = hv.image or hv.initrd
    if image is not None and not image.exists():
        raise GuestImageError(f"guest image {image} does not exist{where}: build it with guest/image/build.py")


@dataclass
class Sandbox:
    config: Config
    spec: SandboxSpec
    debug: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    agent: AgentClient | None = None
    hypervisor: QemuHypervisor | None = None
    virtiofsd: Virtiofsd | None = None
    volume_virtiofsd: Virtiofsd | None = None
    #: The uid and gid its QEMU runs as (runtime/identity.py); None: as root.
    identity: SandboxIdentity | None = None
    _memory_file: Path | None = None
    #: Whether this sandbox's start made the template it was restored from.
    _template_made: bool = False

    def _confinement(self) -> Confinement | None:
        if self.identity is None:
            return None
        return Confinement(self.identity.uid, self.identity.gid, jailed=self.config.security.jail)

    def _allocate_identity(self) -> None:
        """A uid and gid of the sandbox's own, unless confinement is off or cannot work here."""
        security = self.config.security
        if not security.unprivileged_vmm or self.identity is not None:
            return
        if self.config.shared_fs.kind == "virtio-9p":
            # QEMU itself serves 9p, and only root can serve files with their owners.
            log.warning("shared_fs.kind = virtio-9p: QEMU runs as root, unconfined (use virtio-fs to confine it)")
            return
        self.identity = IdentityAllocator(security).allocate(self.spec.id)

    def _release_memory_file(self) -> None:
        memory_file, self._memory_file = self._memory_file, None
        if memory_file is not None:
            with contextlib.suppress(OSError):
                memory_file.unlink(missing_ok=True)

    def _mark(self, phase: str) -> None:
        self.timings[phase] = time.monotonic()

    async def start(self) -> AgentClient:
        """Boot the VM and return a connected agent; on failure, undo everything.

        Either way the host's runtime counters count it (runtime/counters.py).
        """
        began = time.monotonic()
        try:
            agent = await self._start()
        except BaseException as exc:
            await self.stop()
            counters.record_failure(exc)
            raise
        timings = self.timings
        boot = "template" if "template_restored" in timings else "cold"
        counters.record_start(boot, counters.template_result(timings, self._template_made), time.monotonic() - began)
        return agent

    async def _start(self) -> AgentClient:
        config = self.config
        check_guest_files(config)
        admit(self.spec.memory_mib or config.hypervisor.default_memory_mib, config.runtime.host_memory_reserve_mib)
        self._allocate_identity()
        accel = resolve_accelerator(config)
        self._mark("accelerator_chosen")
        if config.hypervisor.boot == "template":
            before = set(self.timings)
            try:
                return await self._start_from_template(accel.accelerator)
            except (CapsaError, OSError) as exc:
                # The cache must never cost the user their container.
                log.warning("starting from a VM template failed, booting cold: %s", exc)
                await self.stop()
                for phase in set(self.timings) - before:
                    del self.timings[phase]
                self._mark("template_failed")
                self._mark("accelerator_chosen")
        return await self._start_cold(accel.accelerator)

    def _channel(self, template_boot: bool = False) -> AgentChannel:
        # A template boots on the serial channel (a vsock CID is saved device
        # state), so "auto" picks it wherever a template is wanted.
        if template_boot and self.config.agent.channel == "auto":
            return SerialChannel(socket_path=self.spec.vm_sockets / "agent.sock")
        kind = choose_channel(self.config, VHOST_VSOCK.exists())
        if kind == "vsock":
            return VsockChannel(guest_cid=random.randrange(3, 0xFFFFFFFF), port=self.config.agent.vsock_port)
        return SerialChannel(socket_path=self.spec.vm_sockets / "agent.sock")

    async def _start_cold(self, accelerator: str) -> AgentClient:
        shares = await self._share_rootfs()
        self._mark("rootfs_shared")
        channel = self._channel()
        self.hypervisor = QemuHypervisor(
            vm_config(self.config, self.spec, accelerator, channel, shares, self.debug),
            die_with_parent=True,
            confinement=self._confinement(),
        )
        await self.hypervisor.start()
        self._mark("hypervisor_started")
        self.agent = await self._connect_agent(channel)
        self._mark("agent_ready")
        await self.agent.create_sandbox(self._create_sandbox_request(virtiofs_devices=0))
        await self._set_configured_policy(self.agent)
        self._mark("sandbox_created")
        return self.agent

    async def _set_configured_policy(self, agent: AgentClient) -> None:
        """The configuration's agent policy, in force before any container (capsa/agent/policy.py)."""
        path = self.config.agent.policy
        if path is None:
            return
        try:
            text = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise CapsaError(f"agent policy {path}: {exc.strerror}") from exc
        try:
            await agent.set_policy(text)
        except CapsaError as exc:
            raise CapsaError(f"agent policy {path}: {exc}") from exc

    def _create_sandbox_request(self, virtiofs_devices: int) -> pb.CreateSandboxRequest:
        # Sent on cold boots too: harmless there, and one code path.
        return pb.CreateSandboxRequest(
            hostname=self.spec.hostname,
            sandbox_id=self.spec.id,
            entropy=secrets.token_bytes(SANDBOX_ENTROPY_BYTES),
            realtime_ns=time.time_ns(),
            virtiofs_devices=virtiofs_devices,
            debug_console=self.config.runtime.debug_console,
        )

    async def _start_from_template(self, accelerator: str) -> AgentClient:
        """Restore the saved template VM (making it first if needed); see :mod:`capsa.hypervisor.template`."""
        config = self.config
        channel = self._channel(template_boot=True)
        if config.shared_fs.kind == "virtio-fs":
            # Only the socket paths matter for the key and the clone's argv.
            shares: tuple[Share, ...] = self._virtiofs_shares()
        else:
            shares = (NinePShare(tag=ROOTFS_TAG, host_path=self.spec.rootfs, readonly=False),)
        vm = vm_config(config, self.spec, accelerator, channel, shares, self.debug)
        reason = template.unsupported(vm)
        if reason is not None:
            raise template.TemplateError(f"no template boot: {reason}")
        hv = config.hypervisor
        store = template.default_store(template.TemplateLimits(hv.template_max_clones, hv.template_max_age))
        key = template.template_key(vm, template.vm_files(vm))

        def make() -> Awaitable[Path]:
            return store.create(key, vm, self._check_template_agent, config.agent.connect_timeout, self._confinement())

        # The template is leased until its state is loaded: it may retire
        # meanwhile (its clone bound reached), but is not removed under us.
        async with store.checkout(key, make, TEMPLATE_LOCK_TIMEOUT) as found:
            self._template_made = store.made
            self._mark("template_ready")
            await self._share_rootfs()
            self._mark("rootfs_shared")
            # Named for the sandbox's hash, not its ID: an ID can be as long as a file name may be.
            self._memory_file = CLONE_MEMORY_DIR / f"{clone_memory_prefix(self.spec.sockets)}{secrets.token_hex(4)}.mem"
            await asyncio.to_thread(template.copy_memory, found, self._memory_file)
            self._mark("template_memory_copied")
            self.hypervisor = QemuHypervisor(
                template.clone_vm(vm, self._memory_file), die_with_parent=True, confinement=self._confinement()
            )
            await self.hypervisor.start()
            self._mark("hypervisor_started")
            assert isinstance(channel, SerialChannel)
            # Connected before the state loads: the restored port then finds a
            # host already there, as the template left it, and the agent's
            # blocked read simply continues with this connection.
            agent = await AgentClient.connect_serial(channel.socket_path, config.agent.request_timeout)
            self.agent = agent
            try:
                await self.hypervisor.restore_state(found / template.STATE_FILE)
            except CapsaError:
                # A state QEMU cannot load is stale or corrupt: make it anew next time.
                log.warning("discarding VM template %s: it does not restore", found)
                store.discard(found)
                raise
        self._mark("template_restored")
        # QEMU and virtiofsd hold it mapped; the name has done its job.
        self._release_memory_file()
        plugged = template.plugged_shares(vm)
        for slot, share in enumerate(plugged):
            await self.hypervisor.plug_virtiofs(share, slot)
        await agent.check(timeout=config.agent.connect_timeout)
        self._mark("agent_ready")
        if renews_agent(config.hypervisor.template_renew_agent, accelerator):
            await self._renew_agent(agent)
            self._mark("agent_renewed")
        await agent.create_sandbox(self._create_sandbox_request(virtiofs_devices=len(plugged)))
        await self._set_configured_policy(agent)
        self._mark("sandbox_created")
        if store.refresh_due:
            # Its successor, made in the background by a process of its own (hypervisor/refresh.py).
            job = refresh.Job(
                store.root,
                store.limits,
                key,
                found.name,
                vm,
                config.security if self.identity is not None else replace(config.security, unprivileged_vmm=False),
                config.agent.connect_timeout,
                config.agent.request_timeout,
            )
            await asyncio.to_thread(refresh.start, job)
        return agent

    async def _renew_agent(self, agent: AgentClient) -> None:
        """Have a clone's agent replace itself with a fresh process (RenewAgent, agent.proto).

        The old process replies, closes its port and re-executes; QEMU
        tells of the close (VSERPORT_CHANGE).  Only then does Check go out,
        on the same connection: QEMU holds it until the new process opens
        the port, so nothing the host sends can reach the old one.
        """
        assert self.hypervisor is not None
        timeout = self.config.agent.connect_timeout
        async with self.hypervisor.agent_port_events() as events:
            await agent.renew_agent(secrets.token_bytes(SANDBOX_ENTROPY_BYTES))
            try:
                # The old process closes its port as it goes.
                while await asyncio.wait_for(self.hypervisor.agent_port_change(events), timeout):
                    pass
            except TimeoutError:
                raise CapsaError(f"the agent did not renew itself within {timeout:g} s") from None
        await agent.check(timeout=timeout)

    async def _check_template_agent(self, socket_path: Path) -> AgentClient:
        agent = self.config.agent
        return await AgentClient.serving_serial(socket_path, agent.request_timeout, agent.connect_timeout)

    def _virtiofs_shares(self) -> tuple[VirtioFsShare, ...]:
        """The rootfs share, and the bind-volume share when the spec has its directory."""
        shares = [VirtioFsShare(tag=ROOTFS_TAG, socket_path=self.spec.vm_sockets / "vfs.sock")]
        if self.spec.volumes is not None:
            shares.append(VirtioFsShare(tag=VOLUME_TAG, socket_path=self.spec.vm_sockets / "vol.sock"))
        return tuple(shares)

    async def _share_rootfs(self) -> tuple[Share, ...]:
        """Start the virtiofsd of each share (both at once); 9p has one share and no daemon.

        The volume share's daemon differs in one option: ``-o timeout=`` from
        ``[shared_fs] virtiofs_volume_timeout`` (0: the guest keeps no
        metadata of a volume, so host changes are seen at once); see
        :mod:`capsa.runtime.mounts`.  Both run for the VM's whole life,
        whether or not a container binds anything: a device plugged at the
        first bind would cost that create a hot-plug, and engines bind
        something into every container (``/etc/hosts``, ``resolv.conf``).
        """
        shared_fs = self.config.shared_fs
        if shared_fs.kind == "virtio-9p":
            return (NinePShare(tag=ROOTFS_TAG, host_path=self.spec.rootfs, readonly=False),)
        shares = self._virtiofs_shares()
        self._make_vm_sockets_dir()
        self.virtiofsd = Virtiofsd(
            shared_fs.virtiofsd_path,
            shared_dir=self.spec.rootfs,
            socket_path=shares[0].socket_path,
            log_path=self.spec.run_dir / "vfs.log",
            cache=shared_fs.virtiofs_cache,
            die_with_parent=True,
        )
        daemons = [self.virtiofsd]
        if self.spec.volumes is not None:
            self.volume_virtiofsd = Virtiofsd(
                shared_fs.virtiofsd_path,
                shared_dir=self.spec.volumes,
                socket_path=shares[1].socket_path,
                log_path=self.spec.run_dir / "vol.log",
                cache=shared_fs.virtiofs_cache,
                timeout=shared_fs.virtiofs_volume_timeout,
                die_with_parent=True,
            )
            daemons.append(self.volume_virtiofsd)
        # Both settle before a failure is raised, so stop() finds each one
        # either running or never started (a failed start stops itself).
        results = await asyncio.gather(*(daemon.start() for daemon in daemons), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self.identity is not None:
            # virtiofsd (root) made its socket; QEMU, as the sandbox's uid, must connect to it.
            for share in shares:
                try:
                    os.chown(share.socket_path, self.identity.uid, self.identity.gid)
                    os.chmod(share.socket_path, 0o600)
                except OSError as exc:
                    raise HypervisorError(f"cannot hand {share.socket_path} to the VM: {exc.strerror}") from exc
        return shares

    def _make_vm_sockets_dir(self) -> None:
        """The VM's socket directory: 0700, its QEMU's uid's when confined."""
        path = self.spec.vm_sockets
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.identity is not None:
                os.chown(path, self.identity.uid, self.identity.gid)
        except OSError as exc:
            raise HypervisorError(f"cannot make the VM's socket directory {path}: {exc.strerror}") from exc

    async def _connect_agent(self, channel: AgentChannel) -> AgentClient:
        """Wait for the agent's first answer, or for the VM to die trying."""
        assert self.hypervisor is not None
        timeout = self.config.agent.connect_timeout
        request_timeout = self.config.agent.request_timeout
        deadline = time.monotonic() + timeout
        if isinstance(channel, VsockChannel):
            connect = AgentClient.connect_vsock(channel.guest_cid, channel.port, deadline, request_timeout)
        else:
            connect = AgentClient.connect_serial(channel.socket_path, request_timeout)

        async def ready() -> AgentClient:
            agent = await connect
            try:
                await agent.check(timeout=max(0.1, deadline - time.monotonic()))
            except BaseException:
                await agent.aclose()
                raise
            return agent

        ready_task = asyncio.ensure_future(ready())
        exited_task = asyncio.ensure_future(self.hypervisor.wait())
        try:
            done, _ = await asyncio.wait({ready_task, exited_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited_task.cancel()
            if not ready_task.done():
                ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, CapsaError):
                await exited_task
        if ready_task in done and not ready_task.exception():
            return ready_task.result()
        # Either QEMU exited, or the channel broke, which is how a guest
        # that panicked or powered off looks from here: give QEMU a moment
        # to exit so the user hears about the VM, not about a socket.
        with contextlib.suppress(asyncio.TimeoutError, CapsaError):
            await asyncio.wait_for(self.hypervisor.wait(), 2)
        if self.hypervisor.pid is not None:
            ready_task.result()  # the VM lives: the channel's own error is the news
        with contextlib.suppress(asyncio.CancelledError, CapsaError):
            await ready_task
        raise HypervisorError(f"the VM stopped before its agent answered{self._console_hint()}")

    def _console_hint(self) -> str:
        """The guest console's last words, for an error message (all of them in --debug)."""
        log_path = self.hypervisor.console_log if self.hypervisor else None
        if log_path is None or not log_path.exists():
            return ""
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        if not lines:
            return " (the guest printed nothing; run with --debug to see its boot)"
        if self.debug:
            log.debug("guest console:\n%s", "\n".join(lines[-40:]))
        # A panic's own line, not the last line of its call trace.
        words = guest_console.last_words("\n".join(lines), count=1)
        return f": {' | '.join(words)}"

    async def wait_helpers(self) -> str:
        """Wait until QEMU or one of its virtiofsd exits; say which ("QEMU", "virtiofsd ...").

        A sandbox needs all of them: the engine must see the container end
        when any one dies, not a container whose files stopped answering.
        """
        waits: dict[asyncio.Future[int], str] = {}
        if self.hypervisor is not None:
            waits[asyncio.ensure_future(self.hypervisor.wait())] = "QEMU"
        for daemon in (self.virtiofsd, self.volume_virtiofsd):
            if daemon is not None:
                waits[asyncio.ensure_future(daemon.wait())] = f"virtiofsd for {daemon.config.shared_dir}"
        if not waits:
            raise HypervisorError("the sandbox is not running")
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in waits:
                future.cancel()
        return waits[next(iter(done))]

    async def stop_hypervisor(self) -> None:
        """End QEMU (the rest stays for :meth:`stop`)."""
        if self.hypervisor is not None:
            await self.hypervisor.stop(timeout=2)

    async def stop(self) -> None:
        """Tear down whatever was started; safe to call at any point, and twice."""
        agent, self.agent = self.agent, None
        if agent is not None:
            # A clean shutdown lets the guest flush what it wrote through
            # virtio-fs; a VM that does not answer in time is killed anyway.
            with contextlib.suppress(CapsaError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(agent.destroy_sandbox(), 5)
            with contextlib.suppress(CapsaError, OSError):
                await agent.aclose()
        hypervisor, self.hypervisor = self.hypervisor, None
        if hypervisor is not None:
            await hypervisor.stop()
        for virtiofsd in (self.virtiofsd, self.volume_virtiofsd):
            if virtiofsd is not None:
                await virtiofsd.stop()
        self.virtiofsd = self.volume_virtiofsd = None
        self._release_memory_file()
        identity, self.identity = self.identity, None
        if identity is not None:
            with contextlib.suppress(CapsaError):
                IdentityAllocator(self.config.security).release(identity)
        self._mark("sandbox_stopped")

