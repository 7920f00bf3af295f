"""The container lifecycle behind runc's verbs (runtime.md "Lifecycle", "Operations").

Engines drive a runtime as separate short-lived commands: ``create`` leaves
the container created (VM booted, process made but not started) and
returns; ``start``, ``state``, ``kill``, ``exec``, ``delete`` come later.
Between them, two processes hold the container (docs/architecture.md):

- capsa-proxy owns the VM; every later command reaches the agent through it;
- capsa-shim stands for the container's process; its PID is the one
  engines wait on, and it exits with the process's status.

Every command that changes a container holds its lock (``state.py``), so
concurrent commands on one container queue and commands on different
containers never meet.  ``create`` checks everything it can on the host
before it claims the ID, and any failure after the claim tears down what
it started and removes the state directory: bad input leaves nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.config import Config, host_cpus, host_memory_mib, max_memory_mib_for, max_vcpus_for
from capsa.errors import CapsaError, InvalidArgument, WrongState
from capsa.proxy.launch import SHUTDOWN_TIMEOUT, ProxyClient, start_proxy
from capsa.runtime import daemon, hooks, hostcgroup, pids
from capsa.runtime.bundle import Bundle, load_bundle
from capsa.runtime.container import current_status, oci_state, with_proxy
from capsa.runtime.ids import validate_id
from capsa.runtime.mounts import plan_mounts
from capsa.runtime.resources import VMSize, check_resources, vm_size
from capsa.runtime.sandbox import check_guest_files, sweep_clone_memory
from capsa.runtime.state import ContainerState, StateStore, Status

log = logging.getLogger("capsa.lifecycle")

#: Extra time a proxy may take beyond the agent's connect timeout: the first
#: sandbox of a configuration also makes the VM template.
PROXY_START_SLACK = 120.0
SHIM_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Runtime:
    """What every operation needs: the configuration and the state store."""

    config: Config
    store: StateStore
    config_flag: str | None = None
    debug: bool = False
    # runc's --systemd-cgroup: cgroupsPath is "slice:prefix:name" (runtime/hostcgroup.py).
    systemd_cgroup: bool = False

    def helper_args(self) -> list[str]:
        args = ["--root", str(self.store.root)]
        if self.config_flag:
            args += ["--config", self.config_flag]
        if self.debug:
            args.append("--debug")
        return args


@dataclass
class CreateRequest:
    container_id: str
    bundle: Path
    pid_file: Path | None = None
    console_socket: str | None = None
    preserve_fds: int = 0
    # `capsa run` in the foreground: the shim uses our own terminal.
    foreground: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Created:
    state: ContainerState
    shim: daemon.Started


def create(rt: Runtime, request: CreateRequest) -> Created:
    container_id = validate_id(request.container_id)
    bundle = load_bundle(request.bundle)
    if request.preserve_fds > 0:
        raise InvalidArgument("--preserve-fds: file descriptors cannot be passed into a container in a VM")
    check_pid_file(request.pid_file)
    if bundle.terminal and not request.console_socket and not request.foreground:
        raise InvalidArgument("cannot allocate a pseudo-TTY without a console socket (use --console-socket)")
    if request.console_socket and not bundle.terminal:
        raise InvalidArgument("--console-socket given but process.terminal is false")
    hooks.validate_hooks(bundle.spec)
    # The proxy plans them again where it binds them; here a bad mount fails before a VM boots.
    plan_mounts(bundle.spec, container_id, bundle.rootfs, os.stat, bundle=bundle.path)
    # A cgroupsPath that --systemd-cgroup cannot read fails here too, as runc refuses it.
    hostcgroup.resolve(hostcgroup.spec_cgroups_path(bundle.spec), container_id, systemd=rt.systemd_cgroup)
    # The VM's size for the spec's limits; malformed ones fail here.
    size = create_size(rt.config, spec_resources(bundle.spec))
    check_guest_files(rt.config)
    run_dir = rt.store.claim(container_id)
    state = ContainerState(
        id=container_id,
        bundle=str(bundle.path),
        rootfs=str(bundle.rootfs),
        annotations=bundle.annotations,
        owner=_owner(),
        netns=str(bundle.network_namespace or ""),
        creator_pid=os.getpid(),
        creator_start=pids.start_time(os.getpid()) or 0,
    )
    try:
        with rt.store.locked(container_id):
            rt.store.save(state)
            shim = _create_locked(rt, request, bundle, state, run_dir, size)
    except BaseException:
        _teardown(rt, state)
        rt.store.remove(container_id)
        raise
    return Created(state, shim)


def _create_locked(
    rt: Runtime, request: CreateRequest, bundle: Bundle, state: ContainerState, run_dir: Path, size: VMSize
) -> daemon.Started:
    # The VM's host processes are born in the container's host cgroup (engines
    # read stats there): we hold it while we start them, and leave before the hooks.
    cgroup = hostcgroup.setup(hostcgroup.spec_cgroups_path(bundle.spec), state.id, systemd=rt.systemd_cgroup)
    limited = rt.config.security.cgroup_limits and bool(cgroup)
    resources = spec_resources(bundle.spec)
    if limited:
        # For the VM as it will be once grown (below), before anything is born
        # there; the cpuset once the VM is up (HostCgroup.limit says why).
        overhead = hostcgroup.vmm_overhead_mib(hostcgroup.accelerator_of(rt.config), exec_helpers=True)
        cgroup.limit(resources, size.vcpus, size.memory_mib, overhead, pin=False)
    state.host_cgroup = cgroup.to_dict()
    rt.store.save(state)
    with cgroup.joined():
        shim = _start_processes(rt, request, bundle, state, run_dir, size)
    if limited:
        cgroup.limit(resources, size.vcpus, size.memory_mib, cgroup.overhead_mib)
    # runtime.md "Lifecycle" step 5-6: these hooks run once the environment
    # exists and before the user's process starts.  They run on the host.
    # The create operation has not finished, so they see "creating" (as runc's do).
    for stage in ("prestart", "createRuntime", "createContainer"):
        hooks.run_hooks(bundle.spec, stage, oci_state(state, Status.CREATING))
    if request.pid_file is not None:
        write_pid_file(request.pid_file, shim.pid)
    return shim


def _start_processes(
    rt: Runtime, request: CreateRequest, bundle: Bundle, state: ContainerState, run_dir: Path, size: VMSize
) -> daemon.Started:
    """The proxy (and its VM) and the shim, the container created in the VM."""
    config = rt.config
    proxy = start_proxy(
        run_dir,
        state.id,
        str(bundle.spec.get("hostname", "")),
        rt.config_flag,
        rt.debug,
        timeout=config.agent.connect_timeout + PROXY_START_SLACK,
        netns=state.netns,
    )
    state.proxy_pid, state.proxy_start = proxy.pid, proxy.start_time
    rt.store.save(state)

    async def create_in_vm(client: ProxyClient) -> None:
        if size != base_size(config):
            # Grown before the container is made: the agent onlines hot-added CPUs as it makes it.
            await client.resize(size.vcpus, size.memory_mib)
        await client.create_container(state.id, bundle.path)
        info = await client.info()
        state.hypervisor_pid, state.virtiofsd_pid = info.hypervisor_pid, info.virtiofsd_pid

    args = [*rt.helper_args(), f"--id={state.id}"]  # an ID may begin with "-"
    if wants_private_netns(bundle.spec):
        args.append("--new-netns")
    if request.console_socket:
        args += ["--console-socket", request.console_socket]
    elif bundle.terminal:
        args.append("--terminal")
    # The shim starts (Python and its imports, a tenth of a second) while the
    # guest creates the container, held until that is done (daemon.Pending).
    # With a console socket the pty is the container's stdio, and our own must
    # not outlive us: go-runc (containerd's runc shim) reads create's stdout
    # to EOF before it takes the console, as runc lets go of it.
    pending = daemon.spawn(
        "capsa.shim",
        args,
        output=run_dir / "shim.out",
        inherit_stdio=not request.console_socket,
    )
    try:
        with_proxy(rt.store.socket_dir(state.id), config.agent.request_timeout, create_in_vm)
    except BaseException:
        pending.abandon()
        raise
    shim = pending.wait_ready(SHIM_START_TIMEOUT)
    state.pid, state.pid_start = shim.pid, shim.start_time
    state.status = Status.CREATED
    rt.store.save(state)
    return shim


def start(rt: Runtime, container_id: str) -> None:
    with rt.store.locked(validate_id(container_id)):
        state = rt.store.load(container_id)
        status = current_status(state)
        if status != Status.CREATED:
            raise WrongState(_start_refusal(status))
        spec = _spec(state)
        hooks.run_hooks(spec, "startContainer", oci_state(state, status))

        async def start_in_vm(client: ProxyClient) -> None:
            if wants_private_netns(spec) and pids.alive(state.pid, state.pid_start):
                # What an engine put into the shim's namespace since create (Docker 28).
                await client.attach_network(f"/proc/{state.pid}/ns/net")
            await client.agent.start_container(state.id)

        # Recorded before the guest is asked, not after: a state that cannot
        # be saved (a full filesystem under --root) then fails the start with
        # the process not started, instead of a process running in the guest
        # while the state says "created".  A start the guest refuses puts
        # "created" back.
        state.status = Status.RUNNING
        rt.store.save(state)
        try:
            with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, start_in_vm)
        except BaseException:
            state.status = Status.CREATED
            try:
                rt.store.save(state)
            except CapsaError as exc:
                log.warning("container %s did not start, but its state still says running: %s", state.id, exc)
            raise
        hooks.run_hooks_warn(spec, "poststart", oci_state(state, Status.RUNNING))


def _start_refusal(status: str) -> str:
    if status == Status.RUNNING or status == Status.PAUSED:
        return "cannot start an already running container"
    if status == Status.STOPPED:
        return "cannot start a container that has stopped"
    return f"cannot start a container in the {status} state"


def state_of(rt: Runtime, container_id: str) -> dict[str, Any]:
    return oci_state(rt.store.load(validate_id(container_id)))


def list_states(rt: Runtime) -> list[dict[str, Any]]:
    states = []
    try:
        entries = sorted(rt.store.root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CapsaError(f"cannot list the state root {rt.store.root}: {exc.strerror}") from exc
    for entry in entries:
        if not entry.is_dir():
            continue
        with contextlib.suppress(CapsaError):
            states.append(oci_state(rt.store.load(entry.name)))
    return states


def kill(rt: Runtime, container_id: str, signum: int, all_processes: bool = False) -> None:
    state = rt.store.load(validate_id(container_id))
    if current_status(state) == Status.STOPPED:
        # containerd's runc shim matches these words.
        raise WrongState("container not running")

    async def signal_in_vm(client: ProxyClient) -> None:
        await client.agent.signal_process(state.id, "", signum, all=all_processes)

    with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, signal_in_vm)


def delete(rt: Runtime, container_id: str, force: bool = False) -> None:
    container_id = validate_id(container_id)
    with rt.store.locked(container_id):
        state = rt.store.load(container_id)
        status = current_status(state)
        if status not in (Status.STOPPED, Status.CREATED) and not force:
            raise WrongState(f"cannot delete container {container_id} that is not stopped: {status}")
        if status != Status.STOPPED and pids.alive(state.pid, state.pid_start):
            # The process goes first, so that its shim reports a kill, not a lost VM.
            with contextlib.suppress(CapsaError):
                kill(rt, container_id, signal.SIGKILL, all_processes=True)
            pids.wait_gone(state.pid, state.pid_start, 5.0)
        spec = _spec(state, missing_ok=True)
        _teardown(rt, state)
        state.status = Status.STOPPED
        hooks.run_hooks_warn(spec, "poststop", oci_state(state, Status.STOPPED))
        rt.store.remove(container_id)


def _teardown(rt: Runtime, state: ContainerState) -> None:
    """Stop the VM and the shim, however far create got.  Never raises."""
    # Whether the proxy took the VM off the engine's network itself.
    detached = False
    if pids.alive(state.proxy_pid, state.proxy_start):

        async def shutdown(client: ProxyClient) -> None:
            await client.shutdown()

        try:
            with_proxy(rt.store.socket_dir(state.id), 5.0, shutdown)
            detached = True
        except (CapsaError, OSError) as exc:
            log.debug("proxy shutdown request failed: %s", exc)
            pids.kill(state.proxy_pid, state.proxy_start, signal.SIGTERM)
        if not pids.wait_gone(state.proxy_pid, state.proxy_start, SHUTDOWN_TIMEOUT):
            log.warning("capsa-proxy %d did not stop in time: killing it", state.proxy_pid)
            # QEMU and virtiofsd die with it (PR_SET_PDEATHSIG).
            pids.kill(state.proxy_pid, state.proxy_start)
            pids.wait_gone(state.proxy_pid, state.proxy_start, 5.0)
            detached = False
    if state.netns and not detached:
        from capsa.network.attach import sweep  # only here: it costs every other verb 40 ms to import

        for problem in sweep(state.netns):
            log.warning("network namespace %s: %s", state.netns, problem)
    # With its VM gone the shim reports a lost process and exits.
    if not pids.wait_gone(state.pid, state.pid_start, 5.0):
        pids.kill(state.pid, state.pid_start)
    # Last: it is removable once the processes above (and QEMU, virtiofsd, exec shims) are gone.
    hostcgroup.HostCgroup.from_dict(state.host_cgroup).remove()
    # A proxy killed between copying a template's RAM and QEMU mapping it left the copy.
    for path in sweep_clone_memory(rt.store.socket_dir(state.id)):
        log.warning("removed %s, a RAM copy its proxy left behind", path)


def pause(rt: Runtime, container_id: str) -> None:
    _transition(rt, container_id, Status.RUNNING, Status.PAUSED, "pause_container")


def resume(rt: Runtime, container_id: str) -> None:
    _transition(rt, container_id, Status.PAUSED, Status.RUNNING, "resume_container")


def _transition(rt: Runtime, container_id: str, before: str, after: str, call: str) -> None:
    with rt.store.locked(validate_id(container_id)):
        state = rt.store.load(container_id)
        status = current_status(state)
        if status != before:
            raise WrongState(f"container {container_id} is {status}, not {before}")

        async def in_vm(client: ProxyClient) -> None:
            await getattr(client.agent, call)(state.id)

        with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, in_vm)
        state.status = after
        rt.store.save(state)


def processes(rt: Runtime, container_id: str) -> list[int]:
    """The PIDs of the container's processes, as the guest numbers them."""
    state = _running(rt, container_id, "ps")

    async def in_vm(client: ProxyClient) -> list[int]:
        return await client.agent.list_processes(state.id)

    return with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, in_vm)


def update(rt: Runtime, container_id: str, resources: dict[str, Any]) -> None:
    """New limits for the container's cgroup, after growing its VM to hold them (never shrinking it).

    The host cgroup's limits grow first: the guest may use plugged memory at once.
    """
    with rt.store.locked(validate_id(container_id)):
        state = _running(rt, container_id, "update")
        hv = rt.config.hypervisor
        size = vm_size(
            resources,
            hv.default_vcpus,
            hv.default_memory_mib,
            max_vcpus=max_vcpus_for(hv, host_cpus()),
            max_memory_mib=max_memory_mib_for(hv, host_memory_mib()),
        )
        cgroup = hostcgroup.HostCgroup.from_dict(state.host_cgroup)
        if rt.config.security.cgroup_limits and cgroup:
            overhead = hostcgroup.vmm_overhead_mib(hostcgroup.accelerator_of(rt.config), exec_helpers=True)
            cgroup.grow(resources, size.vcpus, size.memory_mib, overhead)
            state.host_cgroup = cgroup.to_dict()
            rt.store.save(state)

        async def in_vm(client: ProxyClient) -> None:
            # First the VM: the agent onlines hot-added CPUs as it applies the limits.
            await client.resize(size.vcpus, size.memory_mib)
            await client.agent.update_container(state.id, resources)

        with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, in_vm)


def base_size(config: Config) -> VMSize:
    """The size a VM boots with."""
    return VMSize(config.hypervisor.default_vcpus, config.hypervisor.default_memory_mib)


def create_size(config: Config, resources: dict[str, Any]) -> VMSize:
    """The size a container's VM gets at create: its base grown for the spec's limits, as ``update`` grows it.

    A machine without hot-plug (microvm) keeps its base size, and the
    container its limits inside it, as before there was growth.
    """
    hv = config.hypervisor
    if hv.machine_type != "q35":
        return base_size(config)
    return vm_size(
        resources,
        hv.default_vcpus,
        hv.default_memory_mib,
        max_vcpus=max_vcpus_for(hv, host_cpus()),
        max_memory_mib=max_memory_mib_for(hv, host_memory_mib()),
    )


def spec_resources(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``linux.resources`` (config-linux.md "Control groups"), checked; {} for none."""
    linux = spec.get("linux")
    resources = linux.get("resources") if isinstance(linux, dict) else None
    if resources is None:
        return {}
    try:
        return check_resources(resources)
    except InvalidArgument as exc:
        raise InvalidArgument(f"linux.{exc}") from None


def _running(rt: Runtime, container_id: str, what: str) -> ContainerState:
    state = rt.store.load(validate_id(container_id))
    status = current_status(state)
    if status not in (Status.RUNNING, Status.PAUSED, Status.CREATED):
        raise WrongState(f"cannot {what} a container that is {status}")
    return state


def container_spec(rt: Runtime, container_id: str) -> dict[str, Any]:
    """The spec a container was created from ({} if its bundle is gone); ContainerNotFound for an unknown ID."""
    return _spec(rt.store.load(validate_id(container_id)), missing_ok=True)


def _spec(state: ContainerState, missing_ok: bool = False) -> dict[str, Any]:
    """The bundle's spec, for its hooks (engines keep the bundle until after delete)."""
    path = Path(state.bundle) / "config.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if missing_ok:
            return {}
        raise CapsaError(f"{path}: cannot read the container's spec: {exc}") from exc
    return spec if isinstance(spec, dict) else {}


def wants_private_netns(spec: dict[str, Any]) -> bool:
    """Whether the spec asks for a new network namespace without naming one (config-linux.md "Namespaces").

    Its shim then lives in a new one, which is the namespace an engine that
    configures ``/proc/<container pid>/ns/net`` after create (Docker) sees.
    """
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    return isinstance(namespaces, list) and any(
        isinstance(entry, dict) and entry.get("type") == "network" and not entry.get("path") for entry in namespaces
    )


def check_pid_file(path: Path | None) -> None:
    """Refuse a --pid-file we could not write, before anything starts."""
    if path is not None and not path.parent.is_dir():
        raise InvalidArgument(f"--pid-file {path}: no such directory {path.parent}")


def write_pid_file(path: Path, pid: int) -> None:
    """Atomically, as runc does: engines poll for the file and read it whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(str(pid))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CapsaError(f"--pid-file {path}: cannot write: {exc.strerror}") from exc


def _owner() -> str:
    with contextlib.suppress(KeyError, OSError):
        return getpass.getuser()
    return str(os.getuid())


def stats(rt: Runtime, container_id: str) -> Any:
    state = _running(rt, container_id, "get stats of")

    async def in_vm(client: ProxyClient) -> Any:
        return await client.agent.stats_container(state.id)

    return with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, in_vm)


def wait_oom_kill(rt: Runtime, container_id: str, seen: int, timeout: float) -> Any:
    """The agent's ``OOMEvent`` once the container's OOM kills exceed ``seen`` or its init exited.

    None when neither happened within ``timeout`` seconds.

    Asked whatever the container's status: one whose init the OOM killer
    just ended is ``stopped`` here, and the guest still counts that kill
    until ``delete``.  An error once the VM is gone.
    """
    state = rt.store.load(validate_id(container_id))

    async def in_vm(client: ProxyClient) -> Any:
        return await client.agent.wait_oom_kill(state.id, seen, timeout)

    return with_proxy(rt.store.socket_dir(container_id), rt.config.agent.request_timeout, in_vm)
