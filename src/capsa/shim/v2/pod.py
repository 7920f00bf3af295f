"""One pod's VM and its containers, as containerd-shim-capsa-v2 runs them.

The shim v2 process plays runtime, shim and proxy at once: it owns the
pod's VM (an in-process :class:`capsa.proxy.proxy.Proxy`), every container
of the pod runs in that one VM, and every process's stdio is relayed here
between containerd's FIFOs and the agent.  This module knows nothing of
containerd's messages (``task.py`` maps them); it speaks in containers,
processes, exit statuses and times.

The first container created boots the VM; with CRI that is the pod's
sandbox ("pause") container, and later containers naming the same
``io.kubernetes.cri.sandbox-id`` come to this same shim (``main.py``'s
``start`` returns its address).  The VM is sized by the configuration's
defaults and grown by hot-plug when a container's limits need more
(:func:`capsa.runtime.resources.vm_size`, summed over the pod's containers).

Each container's rootfs comes from containerd as mounts (an overlay,
usually); they are mounted at ``<bundle>/rootfs`` in the shim's own mount
namespace, as the proxy's binds are, so nothing is mounted on the host and
nothing leaks if the shim dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.agent import libc
from capsa.agent.storage import split_options
from capsa.config import Config, host_cpus, host_memory_mib, max_memory_mib_for, max_vcpus_for
from capsa.dirs import ensure_dir
from capsa.errors import AgentGone, CapsaError, ContainerExists, ContainerNotFound, StorageError, WrongState
from capsa.proxy.proxy import Proxy
from capsa.runtime import hostcgroup
from capsa.runtime.bundle import check_namespaces
from capsa.runtime.hostcgroup import HostCgroup
from capsa.runtime.resources import vm_size
from capsa.shim.link import VM_LOST_STATUS
from capsa.shim.relay import ProcessIO, relay, write_all

log = logging.getLogger("capsa.shimv2")

#: The pod's host cgroup as made (``HostCgroup.save``), in the shim's state dir, for ``delete`` after a crash.
HOST_CGROUP_FILE = "host-cgroup.json"
#: How long a process whose VM went away waits for the VM's last words (Pod._why_the_vm_stopped).
VM_WORDS_TIMEOUT = 10.0


@dataclass(frozen=True)
class RootfsMount:
    """containerd's ``Mount`` (types/mount.proto): what to mount at the rootfs."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Status:
    """containerd's task status words (types/task Status), as this module uses them."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"


@dataclass
class Process:
    container_id: str
    exec_id: str  # "" for the container's init
    stdio: Stdio
    spec: dict[str, Any] | None = None  # an exec's OCI process
    status: str = Status.CREATED
    exit_status: int = 0
    exited_at_ns: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    relay: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id


@dataclass
class Container:
    id: str
    bundle: Path
    init: Process
    resources: dict[str, Any] = field(default_factory=dict)
    rootfs_mounted: bool = False
    execs: dict[str, Process] = field(default_factory=dict)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise ContainerNotFound(f"process {exec_id} of container {self.id} does not exist") from None


OnExit = Callable[[Process], None]
OnOOM = Callable[[str], None]


class Pod:
    def __init__(
        self,
        config: Config,
        sandbox_id: str,
        run_dir: Path,
        on_exit: OnExit,
        debug: bool = False,
        on_oom: OnOOM | None = None,
    ) -> None:
        self.config = config
        self.sandbox_id = sandbox_id
        self.run_dir = run_dir
        self.debug = debug
        self._on_exit = on_exit
        self._on_oom = on_oom
        self._oom_watch: asyncio.Task[None] | None = None
        self.proxy: Proxy | None = None
        self.containers: dict[str, Container] = {}
        self._vm_watch: asyncio.Task[None] | None = None
        #: Why the pod's VM stopped by itself (its console's last words), once it did (_watch_vm).
        self.stop_words: str | None = None
        self.host_cgroup = HostCgroup()
        self._cgroup_origin: dict[str, str] = {}
        self._warned_need = 0  # the VM size last warned about as over the host's memory limit

    # -- the VM ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The host PID that stands for the pod's tasks: the VM's (QEMU)."""
        proxy = self.proxy
        hypervisor = proxy.sandbox.hypervisor if proxy else None
        return (hypervisor.vmm_pid or 0) if hypervisor else 0

    def _enter_host_cgroup(self, spec: dict[str, Any]) -> None:
        """Move this shim into the first container's host cgroup, before the VM boots (Kata's sandbox_cgroup_only).

        With CRI the first container is the pod's sandbox, whose cgroupsPath is
        below the pod cgroup: the shim, QEMU and virtiofsd (born there) are the
        pod's overhead, accounted to the pod.  containerd passes systemd's
        ``slice:prefix:name`` form when its runc options say SystemdCgroup; it
        is told apart by its shape, as Kata's shim does.

        Its limits (``[security] cgroup_limits``) are the VM's alone, from its
        size: memory, pids and CPU quota as for a runc-CLI container (no
        exec helpers here: the pod's execs are relayed by this shim), raised
        as the VM grows.  Not the sandbox spec's CPU weight or cpuset: that
        spec is the pause process's (containerd gives it ``cpu.shares`` 2),
        and the kubelet's pod cgroup above carries the pod's weight and its
        limits (the containers' sum plus the RuntimeClass overhead).
        """
        path = hostcgroup.spec_cgroups_path(spec)
        try:
            cgroup = hostcgroup.setup(path, None, systemd=hostcgroup.looks_like_systemd(path))
        except CapsaError as exc:
            log.warning("no host cgroup for the pod: %s", exc)
            return
        if not cgroup:
            return
        accelerator = hostcgroup.accelerator_of(self.config)
        cgroup.overhead_mib = hostcgroup.vmm_overhead_mib(accelerator, exec_helpers=False)
        if self.config.security.cgroup_limits:
            hv = self.config.hypervisor
            cgroup.limit({}, hv.default_vcpus, hv.default_memory_mib, cgroup.overhead_mib)
        ensure_dir(self.run_dir, 0o700)
        cgroup.save(self.run_dir / HOST_CGROUP_FILE)
        self.host_cgroup = cgroup
        self._cgroup_origin = cgroup.enter()

    def _remove_host_cgroup(self) -> None:
        """Leave the pod's host cgroup and remove it (its other processes, QEMU and virtiofsd, are gone)."""
        cgroup, self.host_cgroup = self.host_cgroup, HostCgroup()
        if not cgroup:
            return
        cgroup.leave(self._cgroup_origin)
        cgroup.remove()
        (self.run_dir / HOST_CGROUP_FILE).unlink(missing_ok=True)

    async def _ensure_vm(self, hostname: str, netns: str = "") -> Proxy:
        """The pod's VM, booted by its first container, on that container's network namespace."""
        if self.proxy is not None:
            return self.proxy
        ensure_dir(self.run_dir, 0o700)
        proxy = Proxy(self.config, self.sandbox_id, self.run_dir, hostname, self.debug)
        try:
            await proxy.start()
            if netns:
                await proxy.attach_network(netns)
        except BaseException:
            await proxy.stop()
            raise
        self.proxy = proxy
        self._vm_watch = asyncio.ensure_future(self._watch_vm(proxy))
        if self._on_oom is not None:
            self._oom_watch = asyncio.ensure_future(self._watch_oom(proxy, self._on_oom))
        return proxy

    async def _watch_oom(self, proxy: Proxy, on_oom: OnOOM) -> None:
        """Pass on every OOM kill the agent reports, for the VM's life."""
        while True:
            try:
                container_id = await proxy.agent.get_oom_event()
            except CapsaError as exc:
                log.debug("no more OOM events: %s", exc)
                return
            if container_id in self.containers:
                on_oom(container_id)

    async def _watch_vm(self, proxy: Proxy) -> None:
        await proxy.run_until_done(handle_signals=False)
        log.warning("the pod's VM is gone: %s", proxy.reason)
        # Every process's relay fails now and reports VM_LOST_STATUS, with these words on its stderr.
        self.stop_words = await proxy.stop_words()
        if self.stop_words is not None:
            log.error("the pod's VM stopped: %s", self.stop_words)

    async def _why_the_vm_stopped(self) -> str | None:
        """What the pod's VM said as it stopped by itself (a guest panic's line); None if it was asked to."""
        watch = self._vm_watch
        if watch is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, CapsaError):
                await asyncio.wait_for(asyncio.shield(watch), VM_WORDS_TIMEOUT)
        return self.stop_words

    @property
    def agent_proxy(self) -> Proxy:
        if self.proxy is None:
            raise WrongState("the pod's VM is not running")
        return self.proxy

    # -- containers -----------------------------------------------------------

    async def create(
        self,
        container_id: str,
        bundle: Path,
        rootfs: Sequence[RootfsMount],
        stdio: Stdio,
        spec: dict[str, Any],
    ) -> Container:
        if container_id in self.containers:
            raise ContainerExists(f"container {container_id} already exists")
        container = Container(container_id, bundle, Process(container_id, "", stdio))
        container.resources = dict((spec.get("linux") or {}).get("resources") or {})
        try:
            if rootfs:
                await asyncio.to_thread(mount_rootfs, rootfs, bundle / "rootfs")
                container.rootfs_mounted = True
            # The sandbox's spec names the pod's network namespace (CNI's); a
            # later container's names the sandbox's, and the VM is on it already.
            netns = "" if self.proxy else str(check_namespaces(spec, bundle / "config.json") or "")
            if self.proxy is None and not self.host_cgroup:
                await asyncio.to_thread(self._enter_host_cgroup, spec)
            proxy = await self._ensure_vm(str(spec.get("hostname", "")), netns)
            # The pod's first container is its sandbox; later ones join its namespaces.
            sandbox = next(iter(self.containers), "")
            self.containers[container_id] = container
            await self._fit()
            await proxy.create_container(container_id, str(bundle), sandbox, frozenset({self.pid}))
        except BaseException:
            self.containers.pop(container_id, None)
            if container.rootfs_mounted:
                unmount_rootfs(bundle / "rootfs")
            raise
        container.init.relay = asyncio.ensure_future(self._relay(container.init))
        return container

    async def _fit(self) -> None:
        """Grow the VM so that the sum of its containers' limits fits (Kata's sizing)."""
        hv = self.config.hypervisor
        vcpus, memory_mib = hv.default_vcpus, hv.default_memory_mib
        for container in self.containers.values():
            size = vm_size(container.resources, 0, 0)
            vcpus += size.vcpus
            memory_mib += size.memory_mib
        vcpus = min(vcpus, max_vcpus_for(hv, host_cpus()))
        memory_mib = min(memory_mib, max_memory_mib_for(hv, host_memory_mib()))
        await asyncio.to_thread(self._grow_host_limits, vcpus, memory_mib)
        await asyncio.to_thread(self._check_host_memory_limit, memory_mib)
        if (vcpus, memory_mib) != (hv.default_vcpus, hv.default_memory_mib):
            await self.agent_proxy.resize(vcpus, memory_mib)

    def _grow_host_limits(self, vcpus: int, memory_mib: int) -> None:
        """Raise the sandbox cgroup's limits for the VM's new size before it grows (the guest uses new RAM at once)."""
        cgroup = self.host_cgroup
        if not cgroup or not self.config.security.cgroup_limits:
            return
        cgroup.grow({}, vcpus, memory_mib, cgroup.overhead_mib)
        cgroup.save(self.run_dir / HOST_CGROUP_FILE)

    def _check_host_memory_limit(self, guest_mib: int) -> None:
        """Warn when the pod's host cgroup cannot hold what its VM may come to hold.

        The VM is in the pod cgroup (``_enter_host_cgroup``), and the guest
        keeps what it freed as page cache, so QEMU may in time hold all of
        the guest's memory plus its own: under a tighter host limit the
        host's OOM killer ends the whole pod instead of the guest's ending a
        container (docs/kubernetes.md, "Sizing").  The sandbox cgroup's own
        limit (``_grow_host_limits``) is ``need`` itself: only a tighter
        ancestor, the pod cgroup, is told of.
        """
        if not self.host_cgroup:
            return
        limit = hostcgroup.memory_limit_mib(self.host_cgroup)
        overhead = self.host_cgroup.overhead_mib
        need = guest_mib + overhead
        if limit is None or limit >= need or need == self._warned_need:
            return
        self._warned_need = need
        log.warning(
            "pod %s: its host memory limit (%d MiB) is below what its VM may hold (%d MiB of guest memory and about"
            " %d MiB of QEMU, virtiofsd and shim): the host may OOM-kill the VM; raise the RuntimeClass's"
            " overhead.podFixed.memory or lower default_memory_mib",
            self.sandbox_id,
            limit,
            guest_mib,
            overhead,
        )

    def container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None

    async def start(self, container_id: str, exec_id: str = "") -> Process:
        container = self.container(container_id)
        process = container.process(exec_id)
        if process.status != Status.CREATED:
            raise WrongState(f"process {process.id} is {process.status}, not created")
        agent = self.agent_proxy.agent
        if exec_id:
            assert process.spec is not None
            await agent.exec_process(container_id, exec_id, process.spec)
            process.relay = asyncio.ensure_future(self._relay(process))
        else:
            await agent.start_container(container_id)
        process.status = Status.RUNNING
        return process

    async def exec(self, container_id: str, exec_id: str, spec: dict[str, Any], stdio: Stdio) -> Process:
        container = self.container(container_id)
        if exec_id in container.execs:
            raise ContainerExists(f"process {exec_id} already exists in container {container_id}")
        if container.init.status != Status.RUNNING:
            raise WrongState(f"container {container_id} is {container.init.status}, not running")
        process = Process(container_id, exec_id, stdio, spec=spec)
        container.execs[exec_id] = process
        return process

    async def _relay(self, process: Process) -> None:
        """Relay one process's stdio until it exits; record its status."""
        stdio = process.stdio
        opened: list[int] = []
        status = VM_LOST_STATUS
        try:
            stdout = await asyncio.to_thread(_open_output, stdio.stdout, opened)
            stderr = stdout if stdio.terminal else await asyncio.to_thread(_open_output, stdio.stderr, opened)
            io = ProcessIO(
                stdin=stdio.stdin, stdout=stdout, stderr=stderr, terminal=stdio.terminal, forward_signals=False
            )
            status = await relay(self.agent_proxy.agent, process.container_id, process.exec_id, io)
        except CapsaError as exc:
            log.warning("lost process %s: %s", process.id, exc)
            words = await self._why_the_vm_stopped() if isinstance(exc, AgentGone) else None
            if words is not None and opened:
                # On the process's stderr: the container's log, which is what CRI and ctr show of it.
                with contextlib.suppress(OSError):
                    write_all(opened[-1], f"capsa: the container's VM stopped: {words}\n".encode())
        except asyncio.CancelledError:
            raise
        finally:
            for fd in opened:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not process.exited.is_set():
                process.status = Status.STOPPED
                process.exit_status = status
                process.exited_at_ns = time.time_ns()
                process.exited.set()
                self._on_exit(process)

    async def kill(self, container_id: str, exec_id: str, signum: int, all_processes: bool) -> None:
        process = self.container(container_id).process(exec_id)
        if process.exited.is_set():
            raise WrongState(f"process {process.id} not running: it has exited")
        await self.agent_proxy.agent.signal_process(container_id, exec_id, signum, all=all_processes)

    async def wait(self, container_id: str, exec_id: str) -> Process:
        process = self.container(container_id).process(exec_id)
        await process.exited.wait()
        return process

    async def delete(self, container_id: str, exec_id: str) -> Process:
        container = self.container(container_id)
        process = container.process(exec_id)
        if process.status != Status.CREATED and not process.exited.is_set():
            raise WrongState(f"process {process.id} is still running")
        if exec_id:
            del container.execs[exec_id]
            return process
        if self.proxy is not None and self.proxy.sandbox.hypervisor is not None:
            with contextlib.suppress(CapsaError):
                await self.proxy.agent.remove_container(container_id)
        if process.relay is not None and not process.relay.done():
            process.relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await process.relay
        if not process.exited.is_set():
            # Deleted before it ever started: containerd still wants an exit.
            process.status = Status.STOPPED
            process.exit_status = 0
            process.exited_at_ns = time.time_ns()
            process.exited.set()
        del self.containers[container_id]
        if self.proxy is not None:
            with contextlib.suppress(CapsaError):
                await self.proxy.remove_container(container_id)
        if container.rootfs_mounted:
            unmount_rootfs(container.bundle / "rootfs")
        return process

    async def pause(self, container_id: str) -> None:
        container = self.container(container_id)
        await self.agent_proxy.agent.pause_container(container_id)
        container.init.status = Status.PAUSED

    async def resume(self, container_id: str) -> None:
        container = self.container(container_id)
        await self.agent_proxy.agent.resume_container(container_id)
        container.init.status = Status.RUNNING

    async def pids(self, container_id: str) -> list[int]:
        self.container(container_id)
        return await self.agent_proxy.agent.list_processes(container_id)

    async def resize_pty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        self.container(container_id).process(exec_id)
        await self.agent_proxy.agent.tty_win_resize(container_id, exec_id, rows, columns)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.container(container_id).process(exec_id)
        await self.agent_proxy.agent.close_stdin(container_id, exec_id)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        container = self.container(container_id)
        container.resources = resources
        await self._fit()
        await self.agent_proxy.agent.update_container(container_id, resources)

    async def stats(self, container_id: str) -> Any:
        self.container(container_id)
        return await self.agent_proxy.agent.stats_container(container_id)

    async def shutdown(self) -> None:
        """Stop the VM and everything of the pod; safe to call twice."""
        for container in list(self.containers.values()):
            for process in (container.init, *container.execs.values()):
                if process.relay is not None and not process.relay.done():
                    process.relay.cancel()
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.request_shutdown("the pod is shutting down")
            await proxy.stop()
        await asyncio.to_thread(self._remove_host_cgroup)
        for watch in (self._vm_watch, self._oom_watch):
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, CapsaError):
                    await watch
        for container in self.containers.values():
            if container.rootfs_mounted:
                unmount_rootfs(container.bundle / "rootfs")
        self.containers.clear()


def _open_output(path: str, opened: list[int]) -> int:
    """containerd's FIFO (it holds the read end already), or /dev/null when it gave none."""
    fd = os.open(path or os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    opened.append(fd)
    return fd


def mount_rootfs(mounts: Sequence[RootfsMount], target: Path) -> None:
    """Mount containerd's rootfs mounts at ``target`` (in our own mount namespace: it never reaches the host)."""
    target.mkdir(exist_ok=True)
    for mount in mounts:
        flags, data = split_options(list(mount.options))
        fstype = mount.type or "none"
        if fstype == "bind":
            fstype = "none"
            flags |= libc.MS_BIND
        try:
            libc.mount(mount.source, str(target), fstype, flags, data)
        except OSError as exc:
            raise StorageError(f"cannot mount the rootfs ({mount.type} {mount.source}) at {target}: {exc}") from exc


def unmount_rootfs(target: Path) -> None:
    with contextlib.suppress(OSError):
        libc.umount(str(target), libc.MNT_DETACH)
