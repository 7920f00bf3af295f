"""The engines under test, each as its users install it on Debian 12: Podman 4.3
(daemonless), Docker 20.10 (dockerd on the system containerd) and containerd 1.6
(with its CRI plugin), all at their default paths.

- **Paths.** No root, state directory, exec root, run root, temp dir or socket
  is moved: Docker keeps ``/var/lib/docker``, ``/var/run/docker`` and
  ``/var/run/docker.sock``; containerd ``/var/lib/containerd``,
  ``/run/containerd`` and ``/run/containerd/containerd.sock``; Podman
  ``/var/lib/containers/storage`` and ``/run/containers/storage``.  So the
  runtime is called with the roots and IDs a user's engine passes it
  (``--root /var/run/docker/runtime-runc/moby`` and a 64-hex ID, none at all
  from Podman).  The configuration file each engine reads (``daemon.json``
  by ``--config-file``, containerd's ``--config``, Podman's
  ``CONTAINERS_CONF``) adds the runtime and what this host needs, nothing
  else.
- **Isolation** comes from owning the one default instance, not from paths
  of the test's own.  A daemon already serving a default socket (or a live
  ``/var/run/docker.pid``) is someone else's: the engine refuses to start
  (a skip; a failure under ``CI``).  While it runs, the session's instance
  is the only one; every container, network and image the tests make
  carries the session's label (``io.capsa.e2e=<session dir>``) or was
  imported by name, and ``stop()`` removes exactly those (containerd: what
  appeared in each namespace while it ran).  Nothing below a default data
  directory is deleted wholesale: the engines' data outlive the session,
  as on a user's host.
- **Host specifics.** No ``CAP_SYS_RESOURCE`` (ulimits that do not raise
  the host's), hybrid cgroups and no systemd (the cgroupfs manager), no
  journald (Podman's file events and ``k8s-file`` logs), and no change to
  the host's network (``--network none``, Docker without its bridge and
  iptables rules).

Given ``netns`` (the path of a network namespace the test made), Podman and
Docker run with their default bridge networks instead, entirely inside that
namespace: the engine's processes (for Docker: dockerd and the containerd it
uses) enter it with ``nsenter --net`` (the network namespace only: mounts
stay shared with the host, so every engine command sees the same overlay and
netns mounts), so the bridge, its NAT rules, published ports and
``docker-proxy`` live there, and the host's own namespace gets no address,
bridge or rule.

Every process an engine starts carries ``CAPSA_E2E_MARK=<session dir>`` (the
runtime's through the wrapper; containerd's shims through containerd's
environment), so what outlives a test is found by that marker or by the
session directory in its command line, and ended by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from e2e_support import (
    MARK_VAR,
    POLICIES,
    SHIM_NAME,
    Result,
    Runtime,
    capsa_shim,
    kill_pids,
    mounts_under,
    run,
    session_processes,
    skip_or_fail,
    unmount_under,
)

DOCKER = "/usr/bin/docker"  # Debian's 20.10 client; another docker on PATH may be newer
ULIMITS = ("nofile=20000:20000", "nproc=4096:4096")
IMAGE = "localhost/e2e-busybox:latest"
#: Every container and network the tests make through Podman or Docker carries
#: ``LABEL=<session dir>``: what ``stop()`` removes.
LABEL = "io.capsa.e2e"
START_TIMEOUT = 60.0

# The defaults, as Debian's packages install the engines.
CONTAINERD_SOCKET = Path("/run/containerd/containerd.sock")
CONTAINERD_DIRS = (Path("/var/lib/containerd"), Path("/run/containerd"))
#: The runc shim's default ``--root`` base (``<base>/<namespace>``).
CONTAINERD_RUNC_ROOT = Path("/run/containerd/runc")
DOCKER_SOCKET = Path("/var/run/docker.sock")
DOCKER_PIDFILE = Path("/var/run/docker.pid")
#: dockerd passes ``--root <exec root>/runtime-runc/<namespace>`` to every runtime
#: (20.10 names the directory after runc whatever the runtime).
DOCKER_RUNTIME_ROOT = Path("/var/run/docker/runtime-runc/moby")
DOCKER_DIRS = (Path("/var/lib/docker"), Path("/var/run/docker"))
PODMAN_DIRS = (Path("/var/lib/containers/storage"), Path("/run/containers/storage"), Path("/run/libpod"))

# containerd's CRI plugin: the handlers every CRI case can run under, and the images it needs.
CAPSA_RUNTIME = "io.containerd.capsa.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
PAUSE_IMAGE = "localhost/cri-e2e-pause:latest"
CNI_BIN = Path("/usr/lib/cni")


class EngineError(AssertionError):
    """An engine could not be started: the message carries the end of its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_daemon(proc: subprocess.Popen[bytes], socket: Path, log: Path, ready: list[str], what: str) -> None:
    """Wait until ``ready`` succeeds; fail with the daemon's log if it exits or hangs."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"{what} exited with {proc.returncode} while starting:\n{_tail(log)}")
        if socket.exists() and run(ready, timeout=30).code == 0:
            return
        time.sleep(0.3)
    raise EngineError(f"{what} did not answer within {START_TIMEOUT}s:\n{_tail(log)}")


def in_netns(netns: Path | None) -> list[str]:
    """The argv prefix that runs a command in the network namespace ``netns`` (and no other namespace)."""
    return [] if netns is None else ["nsenter", f"--net={netns}"]


def _stop_daemon(proc: subprocess.Popen[bytes] | None, grace: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- owning a default instance -----------------------------------------------------------------

#: The default sockets one of the session's daemons serves now, and what serves it.
_OURS: dict[Path, str] = {}


def serving(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and Path(f"/proc/{pid}").exists() else None


def claim_default(sock: Path, what: str, pidfile: Path | None = None) -> None:
    """Refuse to start a second instance where the default one lives: the tests
    own the engine's default instance while they run, or do not run."""
    if sock in _OURS:
        raise EngineError(f"the session's own {_OURS[sock]} still serves {sock}: a harness bug (two at once)")
    if serving(sock):
        skip_or_fail(f"another {what} already serves {sock}: stop it to run the engine tests")
    if pidfile is not None and (pid := _pid_alive(pidfile)) is not None:
        skip_or_fail(f"another {what} (PID {pid}, {pidfile}) is running: stop it to run the engine tests")


def _labelled(args: tuple[str, ...], label: str) -> tuple[str, ...]:
    """``args`` with ``--label LABEL`` added to what makes a container or a network."""
    if args[:1] in (("run",), ("create",)):
        return (args[0], "--label", label, *args[1:])
    if args[:2] in (("network", "create"), ("container", "create"), ("container", "run")):
        return (*args[:2], "--label", label, *args[2:])
    return args


# -- containerd --------------------------------------------------------------------------------


class Containerd:
    """containerd 1.6 at its default root, state and socket, with the CRI plugin
    on and its ``runc`` and ``capsa`` handlers (and the same shims named by
    ``runtime_path``, and with ``privileged_without_host_devices``) — the one
    configuration every user of containerd in the tests gets: Docker (namespace
    ``moby``), ``ctr`` (``default``) and CRI (``k8s.io``).  One runs at a time; each fixture that needs it starts it
    and stops it (so Docker's can run in a network namespace of the test's).

    The configuration sets no path containerd keeps state in.  CRI's CNI
    configuration directory is the session's (``cni_dir``; empty unless a
    CRI harness writes its network there): the host's ``/etc/cni/net.d``
    holds Podman's bridge, which would put a bridge, NAT and iptables rules
    in the host's network.
    """

    name = "containerd"

    def __init__(
        self, session: Path, *, tag: str, namespace: str = "default", runtime: Runtime | None = None,
        netns: Path | None = None, shim: Path | None = None,
    ) -> None:  # fmt: skip
        claim_default(CONTAINERD_SOCKET, "containerd")
        self.session = session
        self.namespace = namespace
        self.runtime = runtime.tagged(tag) if runtime is not None else None
        self.address = CONTAINERD_SOCKET
        # The runc shim passes --root <runc root>/<namespace> to the runtime.
        self.runtime_root = CONTAINERD_RUNC_ROOT / namespace
        self.dir = session / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cni_dir = self.dir / "net.d"
        self.cni_dir.mkdir(exist_ok=True)
        self.log = session / f"{tag}-containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._images: list[tuple[str, str]] = []
        self._before: dict[str, set[str]] = {}
        self._images_before: dict[str, set[str]] = {}
        self._mounts = set(mounts_under(list(CONTAINERD_DIRS)))
        bindir = self.dir / "bin"
        bindir.mkdir(exist_ok=True)
        # containerd finds io.containerd.capsa.v2 as containerd-shim-capsa-v2 on its PATH:
        # the shim under test (CAPSA_E2E_SHIM, else the venv's) comes first.
        self.shim = shim or capsa_shim()
        if self.shim is not None and not (bindir / SHIM_NAME).is_symlink():
            (bindir / SHIM_NAME).symlink_to(self.shim)
        self.env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            MARK_VAR: str(session),
        }
        self.config = self.dir / "config.toml"
        self.config.write_text(self.config_text())
        try:
            self.prepare()
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [*in_netns(netns), "containerd", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self.env,
                    start_new_session=True,
                )
            _OURS[CONTAINERD_SOCKET] = f"containerd (PID {self.proc.pid})"
            _wait_daemon(self.proc, self.address, self.log, self.ctr_argv("default", "version"), "containerd")
            self._before = self._containers()
            self._images_before = self._listed("images")
            self.started()
        except BaseException:
            self.stop()
            raise

    def config_text(self) -> str:
        cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
        runc_path = shutil.which("containerd-shim-runc-v2") or "/usr/bin/containerd-shim-runc-v2"
        return (
            "version = 2\n"
            f"[{cri_plugin}]\n"
            f'  sandbox_image = "{PAUSE_IMAGE}"\n'
            # No CAP_SYS_RESOURCE here: CRI must not lower an OOM score below the host's.
            "  restrict_oom_score_adj = true\n"
            '  stream_server_address = "127.0.0.1"\n'
            '  stream_server_port = "0"\n'
            "  enable_selinux = false\n"
            f"[{cri_plugin}.containerd]\n"
            '  snapshotter = "overlayfs"\n'
            '  default_runtime_name = "runc"\n'
            f"[{cri_plugin}.containerd.runtimes.runc]\n"
            f'  runtime_type = "{RUNC_RUNTIME}"\n'
            f"[{cri_plugin}.containerd.runtimes.runc.options]\n"
            "  SystemdCgroup = false\n"
            f"[{cri_plugin}.containerd.runtimes.capsa]\n"
            f'  runtime_type = "{CAPSA_RUNTIME}"\n'
            # Pod annotations reach the pod's sandbox only where the handler lists them (the agent policy's).
            '  pod_annotations = ["io.capsa.*"]\n'
            # The same shims named by path (CRI's runtime_path), not found on PATH.
            f"[{cri_plugin}.containerd.runtimes.runc-path]\n"
            f'  runtime_type = "{RUNC_RUNTIME}"\n'
            f'  runtime_path = "{runc_path}"\n'
            f"[{cri_plugin}.containerd.runtimes.runc-path.options]\n"
            "  SystemdCgroup = false\n"
            f"[{cri_plugin}.containerd.runtimes.capsa-path]\n"
            f'  runtime_type = "{CAPSA_RUNTIME}"\n'
            f'  runtime_path = "{self.shim or "/nonexistent/" + SHIM_NAME}"\n'
            # Privileged pods get none of the host's devices (docs/kubernetes.md, "Privileged pods").
            f"[{cri_plugin}.containerd.runtimes.runc-without-host-devices]\n"
            f'  runtime_type = "{RUNC_RUNTIME}"\n'
            "  privileged_without_host_devices = true\n"
            f"[{cri_plugin}.containerd.runtimes.runc-without-host-devices.options]\n"
            "  SystemdCgroup = false\n"
            f"[{cri_plugin}.containerd.runtimes.capsa-without-host-devices]\n"
            f'  runtime_type = "{CAPSA_RUNTIME}"\n'
            "  privileged_without_host_devices = true\n"
            f"[{cri_plugin}.cni]\n"
            f'  bin_dir = "{CNI_BIN}"\n'
            f'  conf_dir = "{self.cni_dir}"\n'
            "  max_conf_num = 1\n"
        )

    def prepare(self) -> None:
        """What a subclass sets up before containerd starts."""

    def started(self) -> None:
        """What a subclass does once containerd answers."""

    @property
    def needles(self) -> list[str]:
        return [str(self.dir)]

    def ctr_argv(self, namespace: str, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", namespace, *args]

    def ctr(self, *args: str, timeout: float = 120, input: str | None = None, namespace: str | None = None) -> Result:
        return run(self.ctr_argv(namespace or self.namespace, *args), timeout=timeout, input=input)

    def import_image(self, archive: Path, ref: str, namespace: str | None = None) -> str:
        """``ctr images import`` an OCI archive naming ``ref``; removed again on ``stop()``."""
        namespace = namespace or self.namespace
        if (namespace, ref) not in self._images:
            self._images.append((namespace, ref))
        run(self.ctr_argv(namespace, "images", "import", str(archive)), timeout=120).check()
        return ref

    def _namespaces(self) -> list[str]:
        listed = run(self.ctr_argv("default", "namespaces", "ls", "--quiet"), timeout=30)
        return listed.stdout.split() if listed.code == 0 else []

    def _listed(self, what: str) -> dict[str, set[str]]:
        """``ctr <what> ls --quiet`` in every namespace."""
        found = {}
        for namespace in self._namespaces():
            listed = run(self.ctr_argv(namespace, what, "ls", "--quiet"), timeout=30)
            found[namespace] = set(listed.stdout.split()) if listed.code == 0 else set()
        return found

    def _containers(self) -> dict[str, set[str]]:
        return self._listed("containers")

    def remove_new_containers(self) -> None:
        """Bounded, failures only noted: every container that appeared in any
        namespace while this instance ran (the session's), its task first."""
        with contextlib.suppress(AssertionError):
            for namespace, ids in self._containers().items():
                for cid in sorted(ids - self._before.get(namespace, set())):
                    run(self.ctr_argv(namespace, "tasks", "kill", "--signal", "SIGKILL", cid), timeout=30)
                    run(self.ctr_argv(namespace, "tasks", "delete", "--force", cid), timeout=60)
                    run(self.ctr_argv(namespace, "containers", "delete", cid), timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.remove_new_containers()
            with contextlib.suppress(AssertionError):
                # The images imported, and those that appeared with them (CRI adds a
                # reference by image ID to each image it sees).
                for namespace, refs in self._listed("images").items():
                    made = refs - self._images_before.get(namespace, set())
                    made |= {ref for ns, ref in self._images if ns == namespace and ref in refs}
                    if made:
                        run(self.ctr_argv(namespace, "images", "rm", *sorted(made)), timeout=60)
                # A namespace this instance made and the session emptied again goes too.
                for namespace in set(self._namespaces()) - set(self._before):
                    run(self.ctr_argv(namespace, "namespaces", "rm", namespace), timeout=30)
        _stop_daemon(self.proc)
        _OURS.pop(CONTAINERD_SOCKET, None)
        # Shims outlive containerd by design; ours carry the marker.
        kill_pids([p.pid for p in session_processes(self.session, self.needles)])
        unmount_under(list(CONTAINERD_DIRS), keep=self._mounts)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Podman ------------------------------------------------------------------------------------


class Podman:
    """Podman with its default storage, run root and temp dir, and a containers.conf
    (``CONTAINERS_CONF``) naming the runtime under test and this host's needs."""

    name = "podman"

    def __init__(
        self, runtime: Runtime, session: Path, image_tar: Path, *, netns: Path | None = None, tag: str | None = None
    ) -> None:
        tag = tag or ("podman" if netns is None else "podman-net")
        self.runtime = runtime = runtime.tagged(tag)
        self.netns = netns
        self.label = f"{LABEL}={session}"
        self.dir = session / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self._mounts = set(mounts_under(list(PODMAN_DIRS)))
        self.conf = self.dir / "containers.conf"
        # Podman 4.3 passes no --root to the runtime (and `--runtime-flag root=`
        # is dropped from its `delete --force`): the runtime's own default root.
        self.runtime_root = runtime.default_root
        names = ", ".join(f'"{n}"' for n in sorted({runtime.name, "crun", "runc"}))
        self.conf.write_text(
            "[containers]\n"
            f"default_ulimits = [{', '.join(f'{chr(34)}{u}{chr(34)}' for u in ULIMITS)}]\n"
            'log_driver = "k8s-file"\n' + ('netns = "none"\n' if netns is None else "") + "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'runtime = "{runtime.name}"\n'
            f"runtime_supports_json = [{names}]\n"
            "[engine.runtimes]\n"
            f'{runtime.name} = ["{runtime.wrapper}"]\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.image = IMAGE
        self._imported = False
        try:
            self("import", str(image_tar), self.image, timeout=120).check()
            self._imported = True
        except BaseException:
            self.stop()
            raise

    @property
    def needles(self) -> list[str]:
        # conmon names the runtime (the wrapper) on its command line.
        return [str(self.dir), str(self.runtime.wrapper.parent)]

    def argv(self, *args: str) -> list[str]:
        return [*in_netns(self.netns), "podman", *_labelled(args, self.label)]

    def __call__(self, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        return run(self.argv(*args), timeout=timeout, input=input, env=self.env)

    def inspect(self, cid: str, template: str) -> str:
        return self("inspect", "--format", template, cid, timeout=60).check().out

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            mine = ("--filter", f"label={self.label}", "--quiet")
            ids = self("ps", "--all", "--no-trunc", *mine, timeout=60)
            if ids.code == 0 and ids.stdout.split():
                self("rm", "--force", "--time", "0", *ids.stdout.split(), timeout=120)
            networks = self("network", "ls", *mine, timeout=60)
            if networks.code == 0 and networks.stdout.split():
                self("network", "rm", "--force", *networks.stdout.split(), timeout=60)
            if self._imported:
                self("rmi", self.image, timeout=60)
        kill_pids([p.pid for p in session_processes(self.runtime.session, self.needles)])
        unmount_under(list(PODMAN_DIRS), keep=self._mounts)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Docker ------------------------------------------------------------------------------------


class Docker:
    """dockerd 20.10 as Debian's unit starts it (``--containerd=/run/containerd/containerd.sock``),
    every path at its default, and a ``daemon.json`` (``--config-file``) that
    adds the runtime under test and this host's needs; the system containerd
    it uses is started with it (``Containerd``, in the same network namespace)."""

    name = "docker"

    def __init__(
        self, runtime: Runtime, session: Path, image_tar: Path, *, netns: Path | None = None, tag: str | None = None,
        default_runtime: bool = False,
    ) -> None:  # fmt: skip
        tag = tag or ("docker" if netns is None else "docker-net")
        claim_default(DOCKER_SOCKET, "dockerd", DOCKER_PIDFILE)
        self.runtime = runtime = runtime.tagged(tag)
        self.netns = netns
        self.label = f"{LABEL}={session}"
        self.dir = session / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runtime_root = DOCKER_RUNTIME_ROOT
        self.host = DOCKER_SOCKET
        self.log = session / f"{tag}d.log"
        # "runc" is dockerd's own name: the harness's runc goes by another.
        self.runtime_name = "capsa" if runtime.capsa else "e2e-runc"
        self.image = IMAGE
        self.proc: subprocess.Popen[bytes] | None = None
        self.containerd: Containerd | None = None
        self._imported = False
        self._mounts = set(mounts_under([d.resolve() for d in DOCKER_DIRS]))
        config: dict[str, object] = {
            "runtimes": {self.runtime_name: {"path": str(runtime.wrapper)}},
            # No systemd here (and the tests read cgroupfs paths: /docker/<id>).
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            # No CAP_SYS_RESOURCE: limits that do not raise the host's.
            "default-ulimits": {
                name: {"Name": name, "Soft": int(soft), "Hard": int(hard)}
                for name, soft, hard in (u.replace("=", ":").split(":") for u in ULIMITS)
            },
        }
        if netns is None:
            # Outside a namespace of the test's: no docker0 and no iptables rules
            # in the host's network (the tests use --network none).
            config.update({"bridge": "none", "iptables": False, "ip6tables": False, "ip-masq": False})
        if default_runtime:
            config["default-runtime"] = self.runtime_name
        #: The runtime again, with the example no-exec agent policy in its
        #: configuration: how a Docker user picks a policy (runtimeArgs; the
        #: docker CLI passes no annotations).  None under runc.
        self.no_exec_runtime: str | None = None
        if runtime.capsa:
            capsa_config = self.dir / "capsa-no-exec.toml"
            capsa_config.write_text(f'[agent]\npolicy = "{POLICIES / "no-exec.toml"}"\n')
            self.no_exec_runtime = "capsa-no-exec"
            runtimes = config["runtimes"]
            assert isinstance(runtimes, dict)
            runtimes[self.no_exec_runtime] = {
                "path": str(runtime.wrapper),
                "runtimeArgs": ["--config", str(capsa_config)],
            }
        self.config = self.dir / "daemon.json"
        self.config.write_text(json.dumps(config, indent=2) + "\n")
        try:
            self.containerd = Containerd(session, tag=f"{tag}-containerd", namespace="moby", netns=netns)
            argv = [
                *in_netns(netns), "dockerd", "--config-file", str(self.config), "--containerd", str(CONTAINERD_SOCKET),
            ]  # fmt: skip
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
                )
            _OURS[DOCKER_SOCKET] = f"dockerd (PID {self.proc.pid})"
            _wait_daemon(self.proc, self.host, self.log, self.argv("version"), "dockerd")
            self("import", str(image_tar), IMAGE, timeout=120).check()
            self._imported = True
        except BaseException:
            self.stop()
            raise

    @property
    def needles(self) -> list[str]:
        return [str(self.dir), *(self.containerd.needles if self.containerd else [])]

    def argv(self, *args: str) -> list[str]:
        # The default socket, named so that a DOCKER_HOST or context of the caller's does not count.
        return [DOCKER, "-H", f"unix://{self.host}", *_labelled(args, self.label)]

    def __call__(self, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        return run(self.argv(*args), timeout=timeout, input=input)

    def inspect(self, cid: str, template: str) -> str:
        return self("inspect", "--format", template, cid, timeout=60).check().out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # A container the runtime left stuck must not keep the rest of the
            # clean-up from running: bounded, and failures only noted.
            with contextlib.suppress(AssertionError):
                mine = ("--filter", f"label={self.label}", "--quiet")
                ids = self("ps", "--all", "--no-trunc", *mine, timeout=30)
                if ids.code == 0 and ids.stdout.split():
                    self("rm", "--force", *ids.stdout.split(), timeout=60)
                networks = self("network", "ls", *mine, timeout=30)
                if networks.code == 0 and networks.stdout.split():
                    self("network", "rm", *networks.stdout.split(), timeout=60)
                if self._imported:
                    self("rmi", IMAGE, timeout=60)
        _stop_daemon(self.proc)
        _OURS.pop(DOCKER_SOCKET, None)
        if self.containerd is not None:
            self.containerd.stop()
        kill_pids([p.pid for p in session_processes(self.runtime.session, self.needles)])
        unmount_under([d.resolve() for d in DOCKER_DIRS], keep=self._mounts)
        shutil.rmtree(self.dir, ignore_errors=True)


#: The two engines that call the runtime binary (conftest's ``engine`` fixture runs a test under each).
Engine = Podman | Docker
