"""A private containerd 1.6 with its CRI plugin on, for the shim v2 tests: runtime
handlers ``runc`` (``io.containerd.runc.v2``, proves the harness) and ``capsa``
(``io.containerd.capsa.v2``), a CNI network of the test's own, a local pause
image, and a CRI client speaking gRPC (``cri/api.proto``).

Choices, and why:

- **Network.** containerd 1.6's CRI sets up every pod that does not use the
  host's network with CNI and refuses to run one without a CNI config; capsa
  refuses pods on the host's network. So the test gives CNI a ``bridge``
  network on a bridge the test names (``cb`` + 6 hex digits), with
  ``host-local`` IPAM in ``10.199.77.0/24`` keeping its leases under the
  test's directory, no gateway, no masquerading, no iptables rules; the
  bridge is deleted on ``stop()``. (A ``loopback``-only config does not do:
  CRI insists on an address on the pod's ``eth0``.)
- **Shim lookup.** containerd resolves ``io.containerd.capsa.v2`` to the
  binary ``containerd-shim-capsa-v2`` on its own ``PATH``; the test puts a
  directory holding a symlink to the venv's script first on that ``PATH``.
- **Sandbox image.** No registry is reachable: a busybox image whose
  entrypoint sleeps forever is imported with ``ctr -n k8s.io images import``
  and named as ``sandbox_image``.
- **Host specifics.** ``restrict_oom_score_adj`` (no CAP_SYS_RESOURCE here),
  cgroupfs (``SystemdCgroup = false``) under a cgroup parent the test names
  and removes, runc's state under the test's directory, the streaming
  server on 127.0.0.1 with a port the kernel picks.

Every process containerd starts (shims, and what they start) inherits
``CAPSA_E2E_MARK=<session dir>``, so what outlives a test is found by that
marker or by this containerd's directory in its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from cri import api_pb2 as cri
from cri import api_pb2_grpc as cri_grpc
from e2e_engines import _short_dir, _stop_daemon, _tail, _wait_daemon
from e2e_support import (
    MARK_VAR,
    Proc,
    Result,
    expected_kernel_release,
    kill_pids,
    make_oci_archive,
    run,
    session_processes,
    unmount_under,
)

K8S_NAMESPACE = "k8s.io"
PAUSE_IMAGE = "localhost/cri-e2e-pause:latest"
BUSYBOX_IMAGE = "localhost/cri-e2e-busybox:latest"
CAPSA_RUNTIME = "io.containerd.capsa.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
SHIM_NAME = "containerd-shim-capsa-v2"
SUBNET = "10.199.77.0/24"
CNI_BIN = Path("/usr/lib/cni")
# Long enough for a pod VM under TCG (a cold boot is ~5 s, a template one ~1.5 s).
CRI_TIMEOUT = 180.0


def capsa_shim() -> Path | None:
    """The capsa shim v2 binary: ``CAPSA_E2E_SHIM``, else the script next to
    this Python (the venv's), else one on PATH; None when there is none."""
    chosen = os.environ.get("CAPSA_E2E_SHIM")
    candidates = [Path(chosen)] if chosen else [Path(sys.executable).parent / SHIM_NAME]
    if not chosen and (found := shutil.which(SHIM_NAME)):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists() and os.access(candidate, os.X_OK):
            return candidate
    return None


def cri_unready() -> str | None:
    """Why the CRI harness cannot run here (the CNI plugins it uses are missing), or None."""
    missing = [p for p in ("bridge", "host-local", "loopback") if not (CNI_BIN / p).exists()]
    if missing:
        return f"missing CNI plugins {', '.join(missing)} in {CNI_BIN}: run scripts/setup.sh"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip, but fail under CI, where a missing part is a broken setup, not a reason to pass."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class ShimContainerd:
    """containerd with the CRI plugin, both handlers and a CNI bridge, all private.

    ``ctr`` and the CRI client both talk to it; ``stop()`` removes every pod
    and container it knows, stops it, ends what it left running (found by the
    session marker and its directory), deletes the bridge, the cgroup parent
    and its files.
    """

    def __init__(self, session: Path, image_tar: Path, shim: Path | None) -> None:
        self.session = session
        self.shim = shim
        self.dir = _short_dir("k")
        self.address = self.dir / "c.sock"
        self.bridge = "cb" + secrets.token_hex(3)
        self.cgroup_parent = f"/capsa-cri-{self.bridge}"
        self.runc_root = self.dir / "runc"
        self.log = session / f"cri-containerd-{self.bridge}.log"
        self.pod_logs = self.dir / "pods"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.runtime: cri_grpc.RuntimeServiceStub | None = None
        self._namespaces = {K8S_NAMESPACE}
        self._netns_paths: list[str] = []
        try:
            self._configure()
            self._start()
            self._import_images(image_tar)
            self.channel = grpc.insecure_channel(f"unix://{self.address}")
            self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
            self.images = cri_grpc.ImageServiceStub(self.channel)
            self._wait_cri()
        except BaseException:
            self.stop()
            raise

    # -- setup ------------------------------------------------------------------------------

    def _configure(self) -> None:
        bindir = self.dir / "bin"
        bindir.mkdir()
        if self.shim is not None:
            (bindir / SHIM_NAME).symlink_to(self.shim)
        self.env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            MARK_VAR: str(self.session),
        }
        netd = self.dir / "net.d"
        netd.mkdir()
        (netd / "10-cri-e2e.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": f"cri-e2e-{self.bridge}",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": self.bridge,
                            "isGateway": False,
                            "ipMasq": False,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": SUBNET}]],
                                "dataDir": str(self.dir / "ipam"),
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
        self.config = self.dir / "config.toml"
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.dir / "root"}"\n'
            f'state = "{self.dir / "state"}"\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
            f"[{cri_plugin}]\n"
            f'  sandbox_image = "{PAUSE_IMAGE}"\n'
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
            f'  Root = "{self.runc_root}"\n'
            f"[{cri_plugin}.containerd.runtimes.capsa]\n"
            f'  runtime_type = "{CAPSA_RUNTIME}"\n'
            # The same shims named by path (CRI's runtime_path), not found on PATH.
            f"[{cri_plugin}.containerd.runtimes.runc-path]\n"
            f'  runtime_type = "{RUNC_RUNTIME}"\n'
            f'  runtime_path = "{shutil.which("containerd-shim-runc-v2")}"\n'
            f"[{cri_plugin}.containerd.runtimes.runc-path.options]\n"
            "  SystemdCgroup = false\n"
            f'  Root = "{self.runc_root}"\n'
            f"[{cri_plugin}.containerd.runtimes.capsa-path]\n"
            f'  runtime_type = "{CAPSA_RUNTIME}"\n'
            f'  runtime_path = "{self.shim or "/nonexistent/" + SHIM_NAME}"\n'
            f"[{cri_plugin}.cni]\n"
            f'  bin_dir = "{CNI_BIN}"\n'
            f'  conf_dir = "{netd}"\n'
            "  max_conf_num = 1\n"
        )

    def _start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        _wait_daemon(self.proc, self.address, self.log, self.ctr_argv(K8S_NAMESPACE, "version"), "containerd")

    def _import_images(self, image_tar: Path) -> None:
        pause = self.dir / "pause.tar"
        # The pause container only has to stay alive, as PID 1, until it is killed.
        make_oci_archive(
            image_tar, pause, PAUSE_IMAGE, entrypoint=["/bin/sh", "-c", "while :; do sleep 3600; done"], cmd=[]
        )
        busybox = self.dir / "busybox.tar"
        make_oci_archive(image_tar, busybox, BUSYBOX_IMAGE)
        for archive in (pause, busybox):
            self.ctr(K8S_NAMESPACE, "images", "import", str(archive), timeout=120).check()

    def _wait_cri(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.runtime.Version(cri.VersionRequest(version="v1"), timeout=10)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"CRI did not answer: {e}\n{_tail(self.log)}") from None
                time.sleep(0.5)

    # -- ctr -------------------------------------------------------------------------------

    def ctr_argv(self, namespace: str, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", namespace, *args]

    def ctr(self, namespace: str, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        self._namespaces.add(namespace)
        return run(self.ctr_argv(namespace, *args), timeout=timeout, input=input)

    def import_busybox(self, namespace: str) -> str:
        """Import the busybox image into another namespace (for ``ctr run``); its name."""
        archive = self.dir / "busybox.tar"
        self.ctr(namespace, "images", "import", str(archive), timeout=120).check()
        return BUSYBOX_IMAGE

    # -- processes -------------------------------------------------------------------------

    @property
    def needles(self) -> list[str]:
        return [str(self.dir), str(self.address)]

    def processes(self) -> list[Proc]:
        """Everything alive that this containerd started (directly or not), but
        containerd itself and this test."""
        daemon = self.proc.pid if self.proc is not None else -1
        return [p for p in session_processes(self.session, self.needles) if p.pid != daemon]

    def qemus(self) -> list[Proc]:
        return [p for p in self.processes() if "qemu-system" in p.cmdline.split(" ", 1)[0]]

    def shims(self) -> list[Proc]:
        """The shim v2 servers alive (runc's binary, or capsa's, whose server is ``python -m capsa.shim.v2``)."""
        return [
            p
            for p in self.processes()
            if "containerd-shim" in p.cmdline.split(" ", 1)[0] or "capsa.shim.v2" in p.cmdline
        ]

    def leftovers(self) -> list[Proc]:
        """QEMU, virtiofsd, shims and the runtime's helpers still alive."""
        words = ("qemu-system", "virtiofsd", "containerd-shim", "capsa", "runc")
        return [p for p in self.processes() if any(w in p.cmdline for w in words)]

    def wait_nothing_left(self, timeout: float = 30) -> list[Proc]:
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    # -- CRI -------------------------------------------------------------------------------

    def call(self, method: str, request: Any, timeout: float = CRI_TIMEOUT) -> Any:
        """A RuntimeService call; a failure names the call and carries containerd's log."""
        try:
            return getattr(self.runtime, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise AssertionError(
                f"CRI {method} failed: {code}: {details}\ncontainerd log:\n{_tail(self.log)}"
            ) from None

    def pod_config(self, name: str, pid: int = cri.CONTAINER) -> Any:
        """A pod's config; ``pid`` is its PID namespace mode (``cri.POD``: the kubelet's
        ``shareProcessNamespace: true``, the pod's containers then pass it too)."""
        uid = secrets.token_hex(8)
        log_dir = self.pod_logs / f"{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="cri-e2e", attempt=0),
            hostname=name,
            log_directory=str(log_dir),
            labels={"cri-e2e": "1"},
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.POD, pid=pid, ipc=cri.POD)
                ),
            ),
        )

    def run_pod(self, config: Any, handler: str) -> str:
        response = self.call("RunPodSandbox", cri.RunPodSandboxRequest(config=config, runtime_handler=handler))
        return str(response.pod_sandbox_id)

    def create_container(
        self, pod_id: str, pod: Any, name: str, command: list[str], resources: Any = None, mounts: Any = ()
    ) -> str:
        """A busybox container in the pod, in the pod's PID namespace mode; ``resources``
        (a ``cri.LinuxContainerResources``) sets its limits, ``mounts`` (``cri.Mount``) its volumes."""
        pid = pod.linux.security_context.namespace_options.pid
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=BUSYBOX_IMAGE),
            command=command,
            log_path=f"{name}.log",
            mounts=list(mounts),
            linux=cri.LinuxContainerConfig(
                resources=resources,
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.POD, pid=pid, ipc=cri.POD)
                ),
            ),
        )
        response = self.call(
            "CreateContainer", cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        )
        return str(response.container_id)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 60) -> Any:
        return self.call(
            "ExecSync", cri.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout), timeout=timeout + 30
        )

    def sh(self, container_id: str, script: str, timeout: int = 60) -> str:
        """ExecSync ``sh -c script`` in the container; its stdout, which must come with exit status 0."""
        result = self.exec_sync(container_id, ["sh", "-c", script], timeout)
        assert result.exit_code == 0, f"{script!r} exited {result.exit_code}: {result.stderr.decode(errors='replace')}"
        return str(result.stdout.decode())

    def container_state(self, container_id: str) -> int:
        status = self.call("ContainerStatus", cri.ContainerStatusRequest(container_id=container_id)).status
        return int(status.state)

    def remove_pod(self, pod_id: str) -> None:
        self.call("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self.call("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    @contextlib.contextmanager
    def pod(self, name: str, handler: str, pid: int = cri.CONTAINER) -> Iterator[tuple[str, Any]]:
        """A running pod sandbox (ID, config), stopped and removed on the way out."""
        config = self.pod_config(name, pid)
        pod_id = self.run_pod(config, handler)
        try:
            yield pod_id, config
        finally:
            self.remove_pod(pod_id)

    # -- teardown --------------------------------------------------------------------------

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._remove_everything()
        if self.channel is not None:
            self.channel.close()
        _stop_daemon(self.proc)
        # Shims outlive containerd by design; ours carry the marker or name our socket.
        kill_pids([p.pid for p in session_processes(self.session, self.needles)])
        unmount_under([self.dir])
        for netns in self._netns_paths:
            unmount_under([Path(netns)])
            with contextlib.suppress(OSError):
                Path(netns).unlink()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30, check=False)
        _remove_cgroup_parent(self.cgroup_parent)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_everything(self) -> None:
        """Bounded, failures only noted: a stuck pod must not stop the rest of the clean-up."""
        if self.runtime is not None:
            with contextlib.suppress(grpc.RpcError, AssertionError):
                pods = self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
                for pod in pods:
                    with contextlib.suppress(grpc.RpcError, ValueError, KeyError):
                        info = self.runtime.PodSandboxStatus(
                            cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id, verbose=True), timeout=30
                        ).info
                        path = json.loads(info.get("info", "{}")).get("runtimeSpec", {})
                        for ns in path.get("linux", {}).get("namespaces", []):
                            if ns.get("type") == "network" and ns.get("path"):
                                self._netns_paths.append(ns["path"])
                    for call, request in (
                        ("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod.id)),
                        ("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id)),
                    ):
                        with contextlib.suppress(grpc.RpcError):
                            getattr(self.runtime, call)(request, timeout=120)
        for namespace in sorted(self._namespaces - {K8S_NAMESPACE}):
            with contextlib.suppress(AssertionError):
                tasks = run(self.ctr_argv(namespace, "tasks", "ls", "--quiet"), timeout=30)
                for task in tasks.stdout.split() if tasks.code == 0 else []:
                    run(self.ctr_argv(namespace, "tasks", "kill", "--signal", "SIGKILL", task), timeout=30)
                    run(self.ctr_argv(namespace, "tasks", "delete", "--force", task), timeout=60)
                containers = run(self.ctr_argv(namespace, "containers", "ls", "--quiet"), timeout=30)
                for container in containers.stdout.split() if containers.code == 0 else []:
                    run(self.ctr_argv(namespace, "containers", "delete", container), timeout=60)


def _remove_cgroup_parent(parent: str) -> None:
    """Remove the (then empty) cgroup parent in every v1 hierarchy, deepest first."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in base.iterdir() if base.exists() else []:
        top = hierarchy / parent.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


class _Capsa:
    capsa = True


def kernel_release(runtime: str) -> str:
    """What ``uname -r`` prints in a container of ``runtime`` ("runc" or "capsa")."""
    if runtime == "runc":
        return os.uname().release
    return expected_kernel_release(_Capsa())  # type: ignore[arg-type]  # it reads only .capsa


def state_paths(procs: list[Proc]) -> list[Path]:
    """The runtime's state (sockets, state directories, the VM's RAM file) that the
    shim, QEMU and virtiofsd name outside the test's directory: below /run/capsa
    and /run/containerd, and /dev/shm/capsa-*."""
    found = set()
    for proc in procs:
        for match in re.finditer(r"(?:/run/(?:capsa|containerd)/|/dev/shm/capsa-)[^\s,=]+", proc.cmdline):
            path = Path(match.group(0))
            # The directory right below the shim's own (/run/capsa/v2/<pod>, /run/capsa/s/<hash>).
            found.add(Path(*path.parts[:5]) if len(path.parts) > 5 else path)
    return sorted(found)
