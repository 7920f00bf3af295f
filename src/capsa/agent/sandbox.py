"""What the agent does for its sandbox: container lifecycle through crun.

One :class:`Sandbox` per guest.  It owns the registry, the sandbox-wide
mounts and every crun invocation; the ttrpc handlers in
:mod:`capsa.agent.service` only translate messages to these calls and
errors to status codes.  Errors are :class:`capsa.errors.CapsaError`
subclasses: ContainerNotFound / ProcessNotFound (unknown IDs), WrongState
(the lifecycle forbids it now), InvalidArgument / BundleError (bad input),
StorageError (a mount failed), CrunFailed (crun said no, in its own words).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from capsa.agent import cgroup, clone, crun, hotplug, spawn, storage
from capsa.agent.container import Container, ContainerState, Process, Registry
from capsa.agent.guest_process import GuestProcesses
from capsa.agent.options import AgentOptions
from capsa.agent.reaper import Reaper, exit_status
from capsa.agent.stdio import ConsoleSocket, Pipes, ProcessIO, terminal_io
from capsa.errors import AgentError, BundleError, ContainerExists, InvalidArgument, WrongState
from capsa.protocols import agent_pb2 as pb
from capsa.runtime.ids import validate_id

log = logging.getLogger("capsa.agent")

#: How often a waiting GetOOMEvent looks at the containers' memory.events
#: when it cannot be told of their changes (no inotify), and how often
#: ``capsa events`` looks at one container's.
OOM_POLL_SECONDS = 0.5
#: How long a waiting GetOOMEvent trusts the change notifications before it
#: looks anyway (a missed notification costs at most this much delay).
OOM_RECHECK_SECONDS = 30.0

# How long crun may take to pass the pty master after it exited successfully.
CONSOLE_TIMEOUT_SECONDS = 5.0
# How long RemoveContainer waits for the init to die after SIGKILL.
KILL_WAIT_SECONDS = 10.0


class CrunFailed(AgentError):
    """crun exited non-zero; the message is crun's own error line."""


# (log_file, console_socket or None) -> argv
ArgvBuilder = Callable[[str, "str | None"], list[str]]


class Sandbox:
    """The guest's containers and mounts; see the module docstring."""

    def __init__(self, options: AgentOptions, reaper: Reaper) -> None:
        self.options = options
        self.crun = crun.Crun(binary=options.crun, root=options.crun_root)
        self.registry = Registry()
        self._reaper = reaper
        self._created = False
        #: CreateSandbox said the configuration allows DebugConsole.
        self._debug_console = False
        self.guest_processes = GuestProcesses(reaper)
        self._mounts: list[str] = []
        # Shares mounted once for every container (Storage.subpath):
        # mount point -> (driver, tag) of the share mounted there.
        self._shares: dict[str, tuple[str, str]] = {}
        # Containers' storages (CreateContainer.storages) by mount point: the
        # request and how many containers hold it.  The containers of a pod
        # that bind the same host shm dir get one guest tmpfs (Kata's agent
        # counts its storages the same way).
        self._storages: dict[str, tuple[pb.Storage, int]] = {}
        self._counter = itertools.count(1)
        self._oom_reported: dict[str, int] = {}
        self._oom_changes = cgroup.FileChanges(fallback=OOM_POLL_SECONDS)
        self._crun_version: str | None = None
        self._no_pivot: bool | None = None
        self._containers_dir = os.path.join(options.state_dir, "containers")
        self._runtime_dir = os.path.join(options.state_dir, "run")

    # --- sandbox -------------------------------------------------------

    @property
    def created(self) -> bool:
        return self._created

    def add_entropy(self, entropy: bytes) -> None:
        """Mix host entropy into the guest kernel's pool (a host test's agent leaves its host's alone)."""
        if self.options.guest:
            clone.add_entropy(entropy)

    async def adopt(self, entropy: bytes, realtime_ns: int, virtiofs_devices: int) -> None:
        """CreateSandbox, first part: a VM restored from a template becomes unique (:mod:`.clone`)."""
        if self._created:
            raise WrongState("the sandbox already exists")
        if not self.options.guest:
            return  # a host test's agent must not touch the host's RNG or clock
        clone.add_entropy(entropy)
        clone.set_realtime(realtime_ns)
        await clone.wait_virtiofs_devices(virtiofs_devices)

    def create(self, hostname: str, storages: list[pb.Storage], dns: list[str], debug_console: bool = False) -> None:
        """CreateSandbox: hostname, sandbox-wide mounts, resolv.conf; whether DebugConsole is allowed."""
        if self._created:
            raise WrongState("the sandbox already exists")
        _refuse_subpath(storages)
        requests = [storage.mount_request(item) for item in storages]
        mounted: list[str] = []
        try:
            for request in requests:
                storage.mount(request)
                mounted.append(request.target)
        except BaseException:
            self._unmount_all(mounted)
            raise
        self._mounts.extend(mounted)
        if self.options.guest:
            if hostname:
                import socket

                socket.sethostname(hostname)
            if dns:
                with open("/etc/resolv.conf", "w", encoding="utf-8") as file:
                    file.writelines(f"nameserver {server}\n" for server in dns)
        self._debug_console = debug_console
        self._created = True

    async def destroy(self) -> None:
        """DestroySandbox: every container killed and deleted, mounts gone, disks synced."""
        self.guest_processes.kill_all()
        for container in self.registry.all():
            try:
                await self.remove_container(container.id, timeout_seconds=0)
            except Exception:
                log.exception("destroying the sandbox: removing container %s failed", container.id)
        self._unmount_all(self._mounts)
        self._mounts = []
        self._shares.clear()
        os.sync()

    # --- containers ------------------------------------------------------

    async def create_container(
        self,
        container_id: str,
        spec_json: bytes,
        rootfs: pb.Storage,
        storages: list[pb.Storage],
        sandbox_container_id: str = "",
    ) -> None:
        """CreateContainer: mounts, bundle, ``crun create``; the init waits for start.

        ``sandbox_container_id`` names the pod's sandbox container, whose
        init's namespaces the spec's namespace paths then mean.
        """
        validate_id(container_id)
        join_pid = 0
        if sandbox_container_id:
            sandbox_init = self.registry.get(sandbox_container_id).init
            if sandbox_init is None:
                raise BundleError(f"the pod's sandbox container {sandbox_container_id} has no process")
            join_pid = sandbox_init.pid
        self.registry.reserve(container_id)
        bundle = os.path.join(self._containers_dir, container_id)
        mounted: list[str] = []
        try:
            if self.options.guest:
                # A pod's VM grows (hot-plug) before a container that needs it
                # is created; the kernel leaves new vCPUs offline.
                hotplug.online_hotplugged()
            spec = await storage.with_guest_devices(crun.load_spec(spec_json))
            _refuse_subpath(storages)
            os.makedirs(bundle, exist_ok=True)
            rootfs_path = self._mount_rootfs(rootfs, spec, os.path.join(bundle, "rootfs"), mounted)
            for item in storages:
                await self._hold_storage(item, mounted)
            with open(os.path.join(bundle, "config.json"), "wb") as file:
                file.write(crun.bundle_config(spec, rootfs_path, join_pid))
            pid_file = os.path.join(bundle, "pid")
            no_pivot = self._root_is_initramfs()

            def argv(log_file: str, console: str | None) -> list[str]:
                return crun.create_argv(self.crun, log_file, container_id, bundle, pid_file, console, no_pivot)

            container = Container(id=container_id, bundle=bundle, mounts=mounted)
            container.init = await self._launch(container, "", crun.wants_terminal(spec.get("process")), argv, pid_file)
            container.cgroup = cgroup.cgroup_of(container.init.pid)
        except BaseException:
            if os.path.exists(os.path.join(self.crun.root, container_id)):
                # crun create got far enough to record the container.
                with contextlib.suppress(CrunFailed, OSError):
                    await self._crun("delete", lambda log_file, _: crun.delete_argv(self.crun, log_file, container_id))
            self.registry.release(container_id)
            self._release_mounts(mounted)
            _remove_bundle(bundle)
            raise
        self.registry.add(container)
        log.debug("container %s created, init pid %d", container_id, container.init.pid)

    def _mount_rootfs(self, rootfs: pb.Storage, spec: dict[str, Any], default: str, mounted: list[str]) -> str:
        """Mount the rootfs Storage; without a driver it is already in the guest.

        With a subpath, the share is mounted once for the sandbox at the
        Storage's mount_point and its subpath is bound at ``default`` (the
        container's own rootfs directory, unmounted with the container).
        Without one, the share itself is mounted at ``default``.  A
        driverless rootfs names a directory the guest already has: its
        mount_point, else the spec's absolute root.path.
        """
        if rootfs.driver and rootfs.subpath:
            share_point = self._mount_share(rootfs)
            request = storage.bind_request(storage.share_subpath(share_point, rootfs.subpath), default)
            if not os.path.isdir(request.source):
                raise InvalidArgument(f"the rootfs {rootfs.subpath!r} is not a directory of share {rootfs.source!r}")
            storage.mount(request)
            mounted.append(request.target)
            return request.target
        if rootfs.driver:
            request = storage.mount_request(rootfs, default)
            storage.mount(request)
            mounted.append(request.target)
            return request.target
        root = spec.get("root")
        path = rootfs.mount_point or (root.get("path", "") if isinstance(root, dict) else "")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise InvalidArgument("the rootfs has no storage driver and the spec's root.path is not absolute")
        return path

    def _mount_share(self, share: pb.Storage) -> str:
        """Mount ``share`` (without its subpath) unless this sandbox already did; return where it is.

        A share stays mounted until DestroySandbox: a pod's containers come
        and go, and the host adds their directories to the same share.
        """
        request = storage.mount_request(share)
        key = (share.driver, share.source)
        mounted = self._shares.get(request.target)
        if mounted is not None:
            if mounted != key:
                raise InvalidArgument(
                    f"{request.target} already holds share {mounted[1]!r} ({mounted[0]}), not {share.source!r}"
                )
            return request.target
        storage.mount(request)
        self._mounts.append(request.target)
        self._shares[request.target] = key
        return request.target

    async def _hold_storage(self, item: pb.Storage, mounted: list[str]) -> None:
        """Mount a container's Storage, or take another hold on the same one already mounted there.

        A block volume named by its serial waits for the hot-plugged disk
        (:func:`storage.resolve`).  Another Storage at a mount point in use
        is InvalidArgument: one mount point, one filesystem.
        """
        held = self._storages.get(item.mount_point)
        if held is not None:
            if not storage.same_storage(held[0], item):
                raise InvalidArgument(f"storage at {item.mount_point} is already mounted with other options")
            self._storages[item.mount_point] = (held[0], held[1] + 1)
            mounted.append(item.mount_point)
            return
        request = storage.mount_request(await storage.resolve(item))
        storage.mount(request)
        self._storages[request.target] = (item, 1)
        mounted.append(request.target)

    def _release_mounts(self, targets: list[str]) -> None:
        """Undo a container's mounts: a shared storage is unmounted when its last holder lets go."""
        for target in reversed(targets):
            held = self._storages.get(target)
            if held is not None:
                if held[1] > 1:
                    self._storages[target] = (held[0], held[1] - 1)
                    continue
                del self._storages[target]
            self._unmount_all([target])

    async def start_container(self, container_id: str) -> None:
        """StartContainer: ``crun start`` lets the init exec the user's process."""
        container = self.registry.get(container_id)
        async with container.lock:
            container.require(ContainerState.CREATED, action="start")
            await self._crun("start", lambda log_file, _: crun.start_argv(self.crun, log_file, container_id))
            if container.state is ContainerState.CREATED:
                container.state = ContainerState.RUNNING

    async def exec_process(self, container_id: str, exec_id: str, process_json: bytes) -> None:
        """ExecProcess: ``crun exec --detach`` with the given OCI process."""
        container = self.registry.get(container_id)
        if not exec_id:
            raise InvalidArgument("an exec needs a non-empty exec_id")
        validate_id(exec_id)
        # A created container too, as runc and crun allow: its init waits on the exec fifo in its namespaces.
        container.require(ContainerState.RUNNING, ContainerState.CREATED, action="exec in")
        if exec_id in container.execs:
            raise ContainerExists(f"exec {exec_id} already exists in container {container_id}")
        process = crun.load_process(process_json)
        process_file = os.path.join(container.bundle, f"exec-{exec_id}.json")
        pid_file = os.path.join(container.bundle, f"exec-{exec_id}.pid")
        with open(process_file, "wb") as file:
            file.write(process_json)

        def argv(log_file: str, console: str | None) -> list[str]:
            return crun.exec_argv(self.crun, log_file, container_id, process_file, pid_file, console)

        try:
            launched = await self._launch(container, exec_id, crun.wants_terminal(process), argv, pid_file)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(process_file)
        if exec_id in container.execs:  # a concurrent exec with the same ID won
            launched.io.close()
            raise ContainerExists(f"exec {exec_id} already exists in container {container_id}")
        container.execs[exec_id] = launched

    def debug_console(self, exec_id: str, args: list[str], env: list[str], terminal: bool) -> None:
        """DebugConsole: ``args`` in the guest itself, outside every container (:mod:`.guest_process`)."""
        if not self._debug_console:
            raise WrongState(
                "the debug console is off in this sandbox: its configuration did not allow it"
                " when the sandbox was created ([runtime] debug_console)"
            )
        self.guest_processes.start(exec_id, args, env, terminal)

    async def signal_process(self, container_id: str, exec_id: str, signum: int, all_processes: bool) -> None:
        """SignalProcess: kill(2) the process, or ``crun kill --all`` for the whole container."""
        if not container_id:
            self._signal(self.guest_processes.get(exec_id), signum)
            return
        container = self.registry.get(container_id)
        if all_processes and not exec_id:
            await self._crun(
                "kill", lambda log_file, _: crun.kill_argv(self.crun, log_file, container_id, signum, True)
            )
            return
        self._signal(container.process(exec_id), signum)

    @staticmethod
    def _signal(process: Process, signum: int) -> None:
        if not process.running:
            raise WrongState(f"{process.describe()} is not running")
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            raise WrongState(f"{process.describe()} is not running") from None

    async def wait_process(self, container_id: str, exec_id: str) -> tuple[int, int]:
        """WaitProcess: (status, signal) once the process exited."""
        if not container_id:
            return await self.guest_processes.wait(exec_id)
        return await self.process(container_id, exec_id).wait()

    def process(self, container_id: str, exec_id: str) -> Process:
        """A container's process; container_id "" names the guest's own (DebugConsole)."""
        if not container_id:
            return self.guest_processes.get(exec_id)
        return self.registry.get(container_id).process(exec_id)

    async def remove_container(self, container_id: str, timeout_seconds: int) -> None:
        """RemoveContainer: stop it (SIGTERM, SIGKILL after the timeout), delete, unmount."""
        container = self.registry.get(container_id)
        async with container.lock:
            init = container.init
            if init is not None and init.running:
                if timeout_seconds > 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(init.pid, signal.SIGTERM)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(init.wait(), timeout_seconds)
                if container.state is ContainerState.PAUSED:
                    # A frozen cgroup would keep SIGKILL pending forever.
                    with contextlib.suppress(CrunFailed):
                        await self._crun(
                            "resume", lambda log_file, _: crun.resume_argv(self.crun, log_file, container_id)
                        )
            await self._crun("delete", lambda log_file, _: crun.delete_argv(self.crun, log_file, container_id))
            if init is not None and init.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init.pid, signal.SIGKILL)
                try:
                    await asyncio.wait_for(init.wait(), KILL_WAIT_SECONDS)
                except TimeoutError:
                    log.warning("container %s: init %d did not die after SIGKILL", container_id, init.pid)
            for process in container.processes():
                process.io.close()
            self._release_mounts(container.mounts)
            _remove_bundle(container.bundle)
            self.registry.remove(container_id)
            container.state = ContainerState.STOPPED

    async def pause_container(self, container_id: str) -> None:
        container = self.registry.get(container_id)
        async with container.lock:
            container.require(ContainerState.RUNNING, action="pause")
            await self._crun("pause", lambda log_file, _: crun.pause_argv(self.crun, log_file, container_id))
            if container.state is ContainerState.RUNNING:
                container.state = ContainerState.PAUSED

    async def resume_container(self, container_id: str) -> None:
        container = self.registry.get(container_id)
        async with container.lock:
            container.require(ContainerState.PAUSED, action="resume")
            await self._crun("resume", lambda log_file, _: crun.resume_argv(self.crun, log_file, container_id))
            if container.state is ContainerState.PAUSED:
                container.state = ContainerState.RUNNING

    async def update_container(self, container_id: str, resources_json: bytes) -> None:
        """UpdateContainer: new cgroup limits through ``crun update --resources`` (runc's ``update``).

        The host has grown the VM to fit first; CPUs and memory it
        hot-plugged are onlined here, before limits that may name them (a
        cpuset with the new CPU, say).
        """
        container = self.registry.get(container_id)
        resources = crun.load_resources(resources_json)
        async with container.lock:
            if container.state is ContainerState.STOPPED:
                raise WrongState(f"container {container_id} is stopped: there is no cgroup to update")
            if self.options.guest:
                hotplug.online_hotplugged()
            resources_file = os.path.join(container.bundle, f"resources-{next(self._counter)}.json")
            with open(resources_file, "w", encoding="utf-8") as file:
                json.dump(resources, file)
            try:
                await self._crun(
                    "update",
                    lambda log_file, _: crun.update_argv(self.crun, log_file, container_id, resources_file),
                )
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(resources_file)

    def stats(self, container_id: str) -> cgroup.CgroupStats:
        container = self.registry.get(container_id)
        return cgroup.read_stats(self._cgroup_dir(container))

    async def next_oom_event(self) -> str:
        """Wait until the OOM killer strikes in some container; return its ID.

        cgroup v2 counts kills in ``memory.events`` (``oom_kill``); each call
        reports one container whose count grew since it was last reported
        (Kata's GetOOMEvent: one caller, the host, loops on it: the shim v2
        always waits).  The files are read again when the kernel says one
        changed (inotify; a watch is set before each read, so no change
        between the two goes unseen), not on a timer: an idle sandbox wakes
        nobody.  Without inotify, every :data:`OOM_POLL_SECONDS`.
        """
        while True:
            for container in self.registry.all():
                if not container.cgroup:
                    continue
                directory = cgroup.directory(container.cgroup)
                self._oom_changes.watch(os.path.join(directory, "memory.events"))
                kills = cgroup.oom_kills(directory)
                if kills > self._oom_reported.get(container.id, 0):
                    self._oom_reported[container.id] = kills
                    return container.id
            await self._oom_changes.changed(OOM_RECHECK_SECONDS)

    async def wait_oom_kill(
        self, container_id: str, seen: int, poll_interval: float = OOM_POLL_SECONDS
    ) -> tuple[int, bool]:
        """GetOOMEvent for one container: (its ``oom_kill`` count, whether its init exited).

        Returns once the count exceeds ``seen`` or the init has exited,
        whichever comes first; nothing is recorded, so every ``capsa events``
        watching the container gets the same answer.  The kernel counts a kill
        when it picks the victim, before the victim dies, so the count read
        after the init's exit includes a kill that ended it.  Polled, like
        :meth:`next_oom_event`; the init's exit ends the wait at once.
        """
        container = self.registry.get(container_id)
        while True:
            kills = cgroup.oom_kills(cgroup.directory(container.cgroup)) if container.cgroup else 0
            stopped = container.state is ContainerState.STOPPED
            if kills > seen or stopped:
                return kills, stopped
            if container.init is None:
                await asyncio.sleep(poll_interval)
            else:
                # asyncio.wait leaves the shared exit future alone when it times out or is cancelled.
                await asyncio.wait([container.init.exited], timeout=poll_interval)

    def pids(self, container_id: str) -> list[int]:
        container = self.registry.get(container_id)
        return cgroup.read_pids(self._cgroup_dir(container))

    def _cgroup_dir(self, container: Container) -> str:
        if not container.cgroup:
            raise WrongState(f"container {container.id} has no cgroup")
        return cgroup.directory(container.cgroup)

    async def crun_version(self) -> str:
        if self._crun_version is None:
            result = await spawn.run(crun.version_argv(self.crun), self._reaper)
            self._crun_version = crun.parse_version(result.stdout.decode(errors="replace")) if result.ok else ""
        return self._crun_version

    # --- crun ------------------------------------------------------------------

    def _log_file(self) -> str:
        os.makedirs(self._runtime_dir, exist_ok=True)
        return os.path.join(self._runtime_dir, f"crun-{next(self._counter)}.log")

    async def _crun(self, command: str, argv: ArgvBuilder) -> spawn.Completed:
        """Run a crun command that leaves no process behind; CrunFailed if it fails."""
        log_file = self._log_file()
        try:
            result = await spawn.run(argv(log_file, None), self._reaper)
            if not result.ok:
                raise CrunFailed(self._crun_error(command, log_file, result))
            return result
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_file)

    @staticmethod
    def _crun_error(command: str, log_file: str, result: spawn.Completed) -> str:
        message = crun.error_message(
            spawn.read_text(log_file), result.stderr.decode(errors="replace"), command, result.describe()
        )
        log.debug("crun %s failed: %s", command, message)
        return message

    async def _launch(
        self, container: Container, exec_id: str, terminal: bool, argv: ArgvBuilder, pid_file: str
    ) -> Process:
        """Run crun create/exec with fresh stdio and return the process it started.

        Without a terminal the process gets three pipes; with one, crun
        passes the pty master over a console socket and crun's own stdio is
        /dev/null (its errors go to the log file either way).
        """
        loop = asyncio.get_running_loop()
        log_file = self._log_file()
        console: ConsoleSocket | None = None
        received: asyncio.Future[int] | None = None
        pipes: Pipes | None = None
        null: int | None = None
        io: ProcessIO | None = None
        pid: int | None = None
        try:
            if terminal:
                console = ConsoleSocket(os.path.join(self._runtime_dir, f"console-{next(self._counter)}.sock"))
                received = asyncio.ensure_future(console.receive())
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                stdio = (null, null, null)
            else:
                pipes = Pipes.open()
                stdio = (pipes.child_stdin, pipes.child_stdout, pipes.child_stderr)
            command = "create" if not exec_id else "exec"
            result = await spawn.run(
                argv(log_file, console.path if console else None),
                self._reaper,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
            )
            if not result.ok:
                raise CrunFailed(self._crun_error(command, log_file, result))
            pid = _read_pid(pid_file)
            if received is not None:
                try:
                    master = await asyncio.wait_for(received, CONSOLE_TIMEOUT_SECONDS)
                except TimeoutError:
                    raise CrunFailed(f"crun {command} did not pass the terminal to the console socket") from None
                io = terminal_io(loop, master)
            else:
                assert pipes is not None
                io = pipes.into_io(loop)
                pipes = None
            return Process(container.id, exec_id, pid, io, self._track(container, exec_id, pid))
        except BaseException:
            if io is not None:
                io.close()
            if pid is not None:
                # crun started it, but the agent cannot hand it out: it must
                # not live on unobserved.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise
        finally:
            if received is not None and not received.done():
                received.cancel()
            if console is not None:
                console.close()
            if pipes is not None:
                pipes.close_all()
            if null is not None:
                os.close(null)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_file)

    def _track(self, container: Container, exec_id: str, pid: int) -> asyncio.Future[tuple[int, int]]:
        """The (status, signal) future of a process crun started, fed by the reaper."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[tuple[int, int]] = loop.create_future()

        def on_reaped(raw: asyncio.Future[int]) -> None:
            if raw.cancelled() or exited.done():
                return
            status = exit_status(raw.result())
            exited.set_result(status)
            log.debug("container %s exec %r (pid %d) exited: %s", container.id, exec_id, pid, status)
            if not exec_id:
                container.state = ContainerState.STOPPED

        self._reaper.claim(pid).add_done_callback(on_reaped)
        return exited

    def _root_is_initramfs(self) -> bool:
        if self._no_pivot is None:
            from capsa.agent.init import root_is_initramfs

            self._no_pivot = self.options.guest and root_is_initramfs(spawn.read_text("/proc/self/mountinfo"))
        return self._no_pivot

    @staticmethod
    def _unmount_all(targets: list[str]) -> None:
        for target in reversed(targets):
            try:
                storage.unmount(target)
            except Exception as exc:
                log.warning("%s", exc)


def _refuse_subpath(storages: list[pb.Storage]) -> None:
    """A subpath only has a meaning for a container's rootfs (see _mount_rootfs)."""
    for item in storages:
        if item.subpath:
            raise InvalidArgument(f"storage {item.source!r}: a subpath is only supported for a container's rootfs")


def _read_pid(pid_file: str) -> int:
    text = spawn.read_text(pid_file).strip()
    try:
        return int(text)
    except ValueError:
        raise CrunFailed(f"crun did not write a PID to {pid_file}") from None


def _remove_bundle(bundle: str) -> None:
    """Remove what the agent wrote to a bundle directory, and the directory.

    Never recursive: if unmounting the rootfs failed, the rootfs directory is
    still the host's shared image and must not be emptied.  Files are
    unlinked and directories only rmdir'ed, which fails on anything mounted
    or non-empty.
    """
    try:
        entries = list(os.scandir(bundle))
    except FileNotFoundError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(bundle)
