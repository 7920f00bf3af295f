"""capsa-proxy: the one process that owns a VM.

It lives from ``capsa create`` to ``capsa delete``.  Starting, it enters a
mount namespace of its own and makes ``<run_dir>/shared/``, the directory
the guest sees through virtio-fs (or 9p), where each container's rootfs is
bind-mounted, and with virtio-fs ``<run_dir>/volumes/``, the second share
(its virtiofsd keeps no guest metadata cache, so host changes show at
once), where the source of each host bind mount of a spec is
(:mod:`capsa.runtime.mounts` plans them, :mod:`capsa.storage.shared` makes
them; with 9p both go to ``shared/``).  Because the namespace belongs to the proxy and its children (QEMU,
virtiofsd), those mounts are invisible to the rest of the host and vanish
when the proxy does, however it ends: nothing to clean up after a crash.

Then it boots the sandbox (:class:`capsa.runtime.sandbox.Sandbox`), keeps
the agent connection, and serves ``proxy.sock`` (:mod:`capsa.proxy.service`)
until the VM stops, ``Shutdown`` arrives or SIGTERM does.  QEMU and
virtiofsd die with it (``PR_SET_PDEATHSIG``), so a proxy killed with
SIGKILL takes its VM along.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from capsa.config import Config
from capsa.errors import CapsaError, HypervisorError, InvalidArgument
from capsa.hypervisor import guest_console
from capsa.hypervisor.qemu import BlockDisk
from capsa.network.attach import NetworkAttachment
from capsa.protocols import proxy_pb2
from capsa.proxy.launch import STOPPED_FILE
from capsa.runtime import debug_console
from capsa.runtime.agent_client import AgentClient
from capsa.runtime.bundle import load_bundle
from capsa.runtime.mounts import (
    GUEST_VOLUME_SHARE_DIR,
    SHARE_TAG,
    VOLUME_SHARE_TAG,
    BlockVolume,
    HostBind,
    MountPlan,
    container_request,
    disk_name,
    plan_mounts,
    port_shortage,
)
from capsa.runtime.sandbox import Sandbox, SandboxSpec
from capsa.storage.host import block_device, check_not_mounted, tmpfs_size
from capsa.storage.shared import SharedDir
from capsa.ttrpc.client import Client

log = logging.getLogger("capsa.proxy")

SHARED_DIR_NAME = "shared"
VOLUMES_DIR_NAME = "volumes"


#: The annotation that carries a sandbox's agent policy: base64 of its TOML
#: text (capsa/agent/policy.py), as Kata's io.katacontainers.config.agent.policy.
POLICY_ANNOTATION = "io.capsa.agent.policy"

#: How long a virtiofsd's exit waits for QEMU's: QEMU's end closes the
#: vhost-user socket and virtiofsd exits on that, often seen first.
QEMU_EXIT_GRACE = 0.5
#: Console lines the proxy's log shows when the VM stopped by itself (with --debug).
DEBUG_CONSOLE_LINES = 40


def stop_report(ended: str, words: tuple[str, ...]) -> str:
    """Why a VM stopped without being asked, in one line: who ended (``QEMU``,
    ``virtiofsd for ...``) and the guest console's last words."""
    if guest_console.panicked(words):
        return f"the guest kernel panicked; {guest_console.quote(words)}"
    return f"{ended} exited; {guest_console.quote(words)}"


def annotated_policy(annotations: Mapping[str, str]) -> bytes | None:
    """The policy a sandbox's annotations carry, decoded; None when they carry none."""
    encoded = annotations.get(POLICY_ANNOTATION)
    if encoded is None:
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"annotation {POLICY_ANNOTATION}: not base64 ({exc})") from exc


class Proxy:
    def __init__(
        self,
        config: Config,
        sandbox_id: str,
        run_dir: Path,
        hostname: str = "",
        debug: bool = False,
        *,
        socket_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        #: Where proxy.sock and the VM's sockets are (runtime/state.py: short).
        self.socket_dir = socket_dir or run_dir
        self.shared = SharedDir(run_dir / SHARED_DIR_NAME)
        # The bind-volume share (virtio-fs only; 9p serves binds from shared/).
        self.volumes = SharedDir(run_dir / VOLUMES_DIR_NAME) if config.shared_fs.kind == "virtio-fs" else None
        self.network: NetworkAttachment | None = None
        self._network_watch: asyncio.Task[None] | None = None
        self.sandbox = Sandbox(
            config,
            SandboxSpec(
                id=sandbox_id,
                run_dir=run_dir,
                socket_dir=self.socket_dir,
                rootfs=self.shared.path,
                hostname=hostname,
                volumes=self.volumes.path if self.volumes is not None else None,
            ),
            debug=debug,
        )
        self._agent: AgentClient | None = None
        self._done = asyncio.Event()
        self._binds: dict[str, tuple[HostBind, ...]] = {}
        self._disks: dict[str, list[BlockDisk]] = {}
        self._created_any = False
        self.reason = ""
        #: What ended the VM when it stopped without being asked ("QEMU",
        #: "virtiofsd for ..."); None while it runs or after Shutdown.
        self.ended_by: str | None = None

    async def start(self) -> None:
        """Make the shared directories and boot the VM; on failure everything started is stopped."""
        self.shared.create()
        if self.volumes is not None:
            self.volumes.create()
        if self.config.runtime.debug_console:
            self._share_debug_tools()
        self._agent = await self.sandbox.start()

    def _share_debug_tools(self) -> None:
        """The host's busybox, read-only in the rootfs share, for ``capsa debug-console`` (runtime/debug_console.py).

        Without it the sandbox runs all the same; the debug console then
        fails in the guest, and this log says why.
        """
        bind = debug_console.tools_bind()
        if not bind.source.is_file():
            log.warning("no %s on the host (busybox-static): the debug console will have no shell", bind.source)
            return
        try:
            self.shared.apply([bind])
        except CapsaError as exc:
            log.warning("the debug console will have no shell: %s", exc)

    def agent_connection(self) -> Client:
        if self._agent is None:
            raise CapsaError("the sandbox is not running")
        return self._agent.connection

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise CapsaError("the sandbox is not running")
        return self._agent

    async def create_container(
        self,
        container_id: str,
        bundle_path: str,
        sandbox_container_id: str = "",
        pod_pids: frozenset[int] = frozenset(),
        check_schema: bool = True,
    ) -> None:
        """Bind the container's rootfs and volumes into the share, then create it in the guest.

        A pod's later container names the pod's sandbox container, and
        ``pod_pids`` the host PIDs whose namespace paths mean the pod's.
        """
        bundle = load_bundle(bundle_path, pod_pids=pod_pids, check_schema=check_schema)
        plan = plan_mounts(
            bundle.spec,
            container_id,
            bundle.rootfs,
            os.stat,
            bundle=bundle.path,
            tmpfs_size=tmpfs_size,
            block_device=block_device,
            volume_share_dir=GUEST_VOLUME_SHARE_DIR if self.volumes is not None else None,
        )
        request = container_request(container_id, plan, self.config.shared_fs.kind)
        request.sandbox_container_id = sandbox_container_id
        if not self._created_any and not sandbox_container_id:
            # The sandbox's own annotation, before its first container; later
            # containers' annotations cannot change the sandbox's policy.
            policy = annotated_policy(bundle.annotations)
            if policy is not None:
                await self.agent.set_policy(policy)
        await asyncio.to_thread(self._apply_binds, plan.binds)
        disks: list[BlockDisk] = []
        try:
            await self._plug_volumes(plan, disks)
            await self.agent.create_container(request)
        except BaseException:
            with contextlib.suppress(CapsaError):
                self._release_binds(plan.binds)
            await self._unplug_volumes(disks)
            raise
        self._binds[container_id] = plan.binds
        self._disks[container_id] = disks
        self._created_any = True

    def _shared_dirs(self, binds: tuple[HostBind, ...]) -> list[tuple[SharedDir, tuple[HostBind, ...]]]:
        """Each share's directory with the binds that go into it (:attr:`HostBind.share`)."""
        dirs = [(self.shared, tuple(bind for bind in binds if bind.share == SHARE_TAG))]
        if self.volumes is not None:
            dirs.append((self.volumes, tuple(bind for bind in binds if bind.share == VOLUME_SHARE_TAG)))
        known = {SHARE_TAG, VOLUME_SHARE_TAG} if self.volumes is not None else {SHARE_TAG}
        unknown = {bind.share for bind in binds} - known
        if unknown:
            raise CapsaError(f"this sandbox has no share {', '.join(sorted(unknown))}")
        return [(shared, own) for shared, own in dirs if own]

    def _apply_binds(self, binds: tuple[HostBind, ...]) -> None:
        """Bind into both shares, all or none (SharedDir.apply is all or none per share)."""
        done: list[tuple[SharedDir, tuple[HostBind, ...]]] = []
        try:
            for shared, own in self._shared_dirs(binds):
                shared.apply(own)
                done.append((shared, own))
        except BaseException:
            for shared, own in reversed(done):
                with contextlib.suppress(CapsaError):
                    shared.release(own)
            raise

    def _release_binds(self, binds: tuple[HostBind, ...]) -> None:
        """Undo :meth:`_apply_binds` (every share tried; the first failure is raised)."""
        failure: CapsaError | None = None
        for shared, own in self._shared_dirs(binds):
            try:
                shared.release(own)
            except CapsaError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _plug_volumes(self, plan: MountPlan, plugged: list[BlockDisk]) -> None:
        """Attach the plan's block volumes and devices as virtio-blk disks; ``plugged`` collects what is attached.

        The VM's free hot-plug ports are counted first: a container with more
        disks than that is refused naming the first disk that would find
        none, with nothing attached (each attach and detach is a round trip
        to the guest).  A port taken meanwhile (a NIC of the pod's network)
        fails that disk's attach, named too; the caller detaches the rest.
        """
        if not plan.disks:
            return
        hypervisor = self.sandbox.hypervisor
        if hypervisor is None:
            raise CapsaError("the sandbox is not running")
        ports = await hypervisor.hotplug_root_ports()
        free = sum(not used for used in ports.values())
        shortage = port_shortage(plan.disks, free, len(ports) - free)
        if shortage is not None:
            raise HypervisorError(shortage)
        for volume in plan.disks:
            if isinstance(volume, BlockVolume) and volume.host_device and not volume.readonly:
                check_not_mounted(volume.source)
            disk = BlockDisk(volume.source, volume.serial, volume.readonly, volume.host_device)
            try:
                await hypervisor.plug_block(disk)
            except HypervisorError as exc:
                raise HypervisorError(f"cannot attach {disk_name(volume)} to the VM: {exc}") from exc
            plugged.append(disk)

    async def _unplug_volumes(self, disks: list[BlockDisk]) -> None:
        """Detach disks (a pod's VM lives on and its root ports are few); failures are logged."""
        hypervisor = self.sandbox.hypervisor
        for disk in reversed(disks):
            if hypervisor is None:
                return
            try:
                await hypervisor.unplug_block(disk)
            except CapsaError as exc:
                log.warning("%s", exc)

    async def remove_container(self, container_id: str) -> None:
        """Undo a container's binds and disks once the agent removed it (a pod's VM lives on)."""
        binds = self._binds.pop(container_id, ())
        await self._unplug_volumes(self._disks.pop(container_id, []))
        if binds:
            await asyncio.to_thread(self._release_binds, binds)

    def info(self) -> proxy_pb2.InfoResponse:
        """The host PIDs of this VM's processes, from what the proxy started.

        No guest round trip: every ``capsa create`` asks, and the agent's
        GetGuestDetails spawns ``crun --version`` in the emulated guest.
        """
        hypervisor = self.sandbox.hypervisor
        virtiofsd = self.sandbox.virtiofsd
        return proxy_pb2.InfoResponse(
            proxy_pid=os.getpid(),
            hypervisor_pid=(hypervisor.vmm_pid or 0) if hypervisor else 0,
            virtiofsd_pid=(virtiofsd.pid or 0) if virtiofsd else 0,
        )

    async def resize(self, vcpus: int, memory_mib: int) -> tuple[int, int]:
        hypervisor = self.sandbox.hypervisor
        if hypervisor is None:
            raise CapsaError("the sandbox is not running")
        size = await hypervisor.resize(vcpus, memory_mib)
        return size.vcpus, size.memory_mib

    async def attach_network(self, netns_path: str) -> None:
        """Put the VM on the engine's network namespace (:mod:`capsa.network.attach`); once per VM.

        After the sandbox started: the NICs are hot-plugged and the agent
        configures them.  A failure leaves nothing in the namespace.  Then
        the VM follows the namespace's changes (interfaces added later).
        """
        hypervisor = self.sandbox.hypervisor
        if hypervisor is None:
            raise CapsaError("the sandbox is not running")
        if self.network is not None:
            raise CapsaError(f"the VM is already on the network of {self.network.netns_path}")
        attachment = NetworkAttachment(netns_path, self.config.network.model)
        await attachment.attach(hypervisor, self.agent)
        self.network = attachment
        self._network_watch = asyncio.ensure_future(attachment.watch(hypervisor, self.agent))

    async def stop_words(self) -> str | None:
        """Why the VM stopped by itself (:func:`stop_report`), once its console's last bytes are in;
        None while it runs or when it was asked to stop.  For a shim that runs the proxy in process."""
        hypervisor = self.sandbox.hypervisor
        if self.ended_by is None or hypervisor is None or hypervisor.console_log is None:
            return None
        await hypervisor.console_drained()
        return stop_report(self.ended_by, guest_console.last_words(guest_console.read_tail(hypervisor.console_log)))

    def _report_stop(self, ended: str, console_log: Path) -> None:
        """Log why the VM stopped by itself and leave it in :data:`STOPPED_FILE` for the shims."""
        text = guest_console.read_tail(console_log)
        report = stop_report(ended, guest_console.last_words(text))
        log.error("the VM stopped: %s", report)
        if log.isEnabledFor(logging.DEBUG):
            lines = [line for line in text.splitlines() if line.strip()]
            log.debug("guest console (%s), last lines:\n%s", console_log, "\n".join(lines[-DEBUG_CONSOLE_LINES:]))
        target = self.run_dir / STOPPED_FILE
        try:
            partial = target.with_name(f".{STOPPED_FILE}.tmp")
            partial.write_text(report + "\n", encoding="utf-8")
            partial.replace(target)
        except OSError as exc:
            log.warning("cannot record why the VM stopped in %s: %s", target, exc.strerror)

    def request_shutdown(self, reason: str) -> None:
        if not self._done.is_set():
            self.reason = reason
            self._done.set()

    async def run_until_done(self, handle_signals: bool = True) -> None:
        """Serve until Shutdown, SIGTERM/SIGINT (``handle_signals``), or the VM's end."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_shutdown, f"signal {signum}")
        vm_exit = asyncio.ensure_future(self.sandbox.wait_helpers())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({vm_exit, done}, return_when=asyncio.FIRST_COMPLETED)
            if vm_exit.done() and not done.done():
                ended = "the VM"
                with contextlib.suppress(CapsaError):
                    ended = vm_exit.result()
                hypervisor = self.sandbox.hypervisor
                if ended != "QEMU" and hypervisor is not None:
                    with contextlib.suppress(asyncio.TimeoutError, CapsaError):
                        await asyncio.wait_for(hypervisor.wait(), QEMU_EXIT_GRACE)
                        ended = "QEMU"
                self.ended_by = ended
                if ended != "QEMU":
                    # A VM without its file server is no sandbox: end it as if QEMU had died.
                    log.error("%s exited: stopping the VM", ended)
                    await self.sandbox.stop_hypervisor()
                self.request_shutdown(f"{ended} stopped")
        finally:
            for task in (vm_exit, done):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, CapsaError):
                    await task
        log.info("proxy stopping: %s", self.reason)

    async def stop(self) -> None:
        watch, self._network_watch = self._network_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        self._agent = None
        hypervisor = self.sandbox.hypervisor
        console_log = hypervisor.console_log if hypervisor is not None else None
        await self.sandbox.stop()
        if self.ended_by is not None and console_log is not None:
            # After the stop: the console pump has written the VM's last words.
            self._report_stop(self.ended_by, console_log)
        # After QEMU: its taps went with it; the qdiscs and macvtaps are ours to remove.
        network, self.network = self.network, None
        if network is not None:
            await network.detach()
        # Not needed for the host's sake (the binds live in our namespace and
        # go with it), but it leaves shared/ and volumes/ empty for `delete` to remove.
        for shared in (self.shared, self.volumes):
            if shared is not None:
                with contextlib.suppress(CapsaError):
                    shared.destroy()
