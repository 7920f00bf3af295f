"""containerd 1.6 with its CRI plugin on, as installed (``e2e_engines.Containerd``:
default root, state and socket), for the shim v2 tests: runtime handlers
``runc`` (``io.containerd.runc.v2``, proves the harness) and ``capsa``
(``io.containerd.capsa.v2``), and each again by ``runtime_path`` (``-path``) and
with ``privileged_without_host_devices`` (``-without-host-devices``), a CNI network of the test's own, a local pause
image, and a CRI client speaking gRPC (``cri/api.proto``).  Pods are made in
CRI's own namespace ``k8s.io``; ``ctr`` runs in ``default``.

Choices, and why:

- **Network.** containerd 1.6's CRI sets up every pod that does not use the
  host's network with CNI and refuses to run one without a CNI config; capsa
  refuses pods on the host's network. So the test gives CNI a ``bridge``
  network on a bridge the test names (``cb`` + 6 hex digits), with
  ``host-local`` IPAM in ``10.199.77.0/24`` keeping its leases under the
  test's directory, no gateway, no masquerading, no iptables rules; the
  bridge is deleted on ``stop()``. (A ``loopback``-only config does not do:
  CRI insists on an address on the pod's ``eth0``.)  The host's
  ``/etc/cni/net.d`` (Podman's NATed bridge) is not used.
- **Shim lookup.** containerd resolves ``io.containerd.capsa.v2`` to the
  binary ``containerd-shim-capsa-v2`` on its own ``PATH``; the test puts a
  directory holding a symlink to the venv's script first on that ``PATH``.
- **Sandbox image.** No registry is reachable: a busybox image whose
  entrypoint sleeps forever is imported with ``ctr -n k8s.io images import``
  and named as ``sandbox_image``; it and the busybox image are removed on
  ``stop()``.
- **Host specifics.** ``restrict_oom_score_adj`` (no CAP_SYS_RESOURCE here),
  cgroupfs (``SystemdCgroup = false``) under a cgroup parent the test names
  and removes, the streaming server on 127.0.0.1 with a port the kernel
  picks.

Every process containerd starts (shims, and what they start) inherits
``CAPSA_E2E_MARK=<session dir>``, so what outlives a test is found by that
marker.  Only pods of the Kubernetes namespace ``cri-e2e`` and containers
that appeared while this containerd ran are removed on ``stop()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from cri import api_pb2 as cri
from cri import api_pb2_grpc as cri_grpc
from e2e_engines import (
    CAPSA_RUNTIME,
    CNI_BIN,
    CONTAINERD_SOCKET,
    PAUSE_IMAGE,
    RUNC_RUNTIME,
    Containerd,
    _tail,
)
from e2e_support import (
    SHIM_NAME,
    Proc,
    Result,
    capsa_shim,
    expected_kernel_release,
    make_oci_archive,
    run,
    session_processes,
    skip_or_fail,
    unmount_under,
)

__all__ = ["CAPSA_RUNTIME", "PAUSE_IMAGE", "RUNC_RUNTIME", "SHIM_NAME", "capsa_shim", "skip_or_fail"]

K8S_NAMESPACE = "k8s.io"
#: ``ctr``'s own namespace, where the ctr-driven shim v2 tests run their containers.
CTR_NAMESPACE = "default"
BUSYBOX_IMAGE = "localhost/cri-e2e-busybox:latest"
SUBNET = "10.199.77.0/24"
#: The name (comm) of the process capsa's jail leaves between a VMM and the process that started it.
VMM_KEEPER = "capsa-vmm"
# Long enough for a pod VM under TCG (a cold boot is ~5 s, a template one ~1.5 s).
CRI_TIMEOUT = 180.0
#: Every pod the harness makes is in this Kubernetes namespace (and carries the
#: label): what ``stop()`` removes.
POD_NAMESPACE = POD_LABEL = "cri-e2e"


def cri_unready() -> str | None:
    """Why the CRI harness cannot run here (the CNI plugins it uses are missing), or None."""
    missing = [p for p in ("bridge", "host-local", "loopback") if not (CNI_BIN / p).exists()]
    if missing:
        return f"missing CNI plugins {', '.join(missing)} in {CNI_BIN}: run scripts/setup.sh"
    return None


class ShimContainerd(Containerd):
    """The default containerd (CRI plugin, both handlers) with a CNI bridge of the test's.

    ``ctr`` and the CRI client both talk to it; ``stop()`` removes the pods
    (Kubernetes namespace ``cri-e2e``) and the containers the session made,
    stops it, ends what it left running (found by the session marker),
    deletes the bridge, the cgroup parent, the images it imported and its
    files.
    """

    def __init__(self, session: Path, image_tar: Path, shim: Path | None) -> None:
        self.bridge = "cb" + secrets.token_hex(3)
        self.cgroup_parent = f"/capsa-cri-{self.bridge}"
        self.channel: grpc.Channel | None = None
        self.service: cri_grpc.RuntimeServiceStub | None = None
        self._netns_paths: list[str] = []
        self._image_tar = image_tar
        self.pod_logs = session / f"cri-{self.bridge}" / "pods"
        super().__init__(session, tag=f"cri-{self.bridge}", namespace=K8S_NAMESPACE, shim=shim)

    # -- setup ------------------------------------------------------------------------------

    def prepare(self) -> None:
        (self.cni_dir / "10-cri-e2e.conflist").write_text(
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

    def started(self) -> None:
        self._import_images(self._image_tar)
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        self.service = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        self._wait_cri()

    def _import_images(self, image_tar: Path) -> None:
        pause = self.dir / "pause.tar"
        # The pause container only has to stay alive, as PID 1, until it is killed.
        make_oci_archive(
            image_tar, pause, PAUSE_IMAGE, entrypoint=["/bin/sh", "-c", "while :; do sleep 3600; done"], cmd=[]
        )
        busybox = self.dir / "busybox.tar"
        make_oci_archive(image_tar, busybox, BUSYBOX_IMAGE)
        self.import_image(pause, PAUSE_IMAGE, K8S_NAMESPACE)
        self.import_image(busybox, BUSYBOX_IMAGE, K8S_NAMESPACE)

    def _wait_cri(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.service.Version(cri.VersionRequest(version="v1"), timeout=10)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"CRI did not answer: {e}\n{_tail(self.log)}") from None
                time.sleep(0.5)

    # -- ctr -------------------------------------------------------------------------------

    def ctr(  # type: ignore[override]  # the namespace first: the tests use two
        self, namespace: str, *args: str, timeout: float = 120, input: str | None = None
    ) -> Result:
        return run(self.ctr_argv(namespace, *args), timeout=timeout, input=input)

    def import_busybox(self, namespace: str = CTR_NAMESPACE) -> str:
        """Import the busybox image into another namespace (for ``ctr run``); its name."""
        return self.import_image(self.dir / "busybox.tar", BUSYBOX_IMAGE, namespace)

    # -- processes -------------------------------------------------------------------------

    def processes(self) -> list[Proc]:
        """Everything alive that this containerd started (directly or not), but
        containerd itself and this test."""
        daemon = self.proc.pid if self.proc is not None else -1
        return [p for p in session_processes(self.session, self.needles) if p.pid != daemon]

    def qemus(self) -> list[Proc]:
        return [p for p in self.processes() if "qemu-system" in p.cmdline.split(" ", 1)[0]]

    def shims(self) -> list[Proc]:
        """The shim v2 servers alive (runc's binary, or capsa's, whose server is ``python -m capsa.shim.v2``;
        not the fork of it that keeps QEMU's jail, ``capsa-vmm``)."""
        return [
            p
            for p in self.processes()
            if p.name != VMM_KEEPER
            and ("containerd-shim" in p.cmdline.split(" ", 1)[0] or "capsa.shim.v2" in p.cmdline)
        ]

    def spawner(self, vmm: Proc) -> int:
        """The PID of the process that started QEMU ``vmm``: its parent, or the parent of
        the ``capsa-vmm`` between them (capsa's jail: QEMU is PID 1 of its own PID namespace,
        and the fork that made it stays as its parent on the host's side)."""
        parents = {p.pid: p for p in self.processes()}
        parent = parents.get(vmm.ppid)
        return parent.ppid if parent is not None and parent.name == VMM_KEEPER else vmm.ppid

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
            return getattr(self.service, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise AssertionError(
                f"CRI {method} failed: {code}: {details}\ncontainerd log:\n{_tail(self.log)}"
            ) from None

    def pod_config(self, name: str, pid: int = cri.CONTAINER, privileged: bool = False) -> Any:
        """A pod's config; ``pid`` is its PID namespace mode (``cri.POD``: the kubelet's
        ``shareProcessNamespace: true``, the pod's containers then pass it too);
        ``privileged`` lets its containers be privileged (the kubelet sets it when one is)."""
        uid = secrets.token_hex(8)
        log_dir = self.pod_logs / f"{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE, attempt=0),
            hostname=name,
            log_directory=str(log_dir),
            labels={POD_LABEL: "1"},
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.POD, pid=pid, ipc=cri.POD),
                    privileged=privileged,
                ),
            ),
        )

    def run_pod(self, config: Any, handler: str) -> str:
        response = self.call("RunPodSandbox", cri.RunPodSandboxRequest(config=config, runtime_handler=handler))
        return str(response.pod_sandbox_id)

    def create_container(
        self,
        pod_id: str,
        pod: Any,
        name: str,
        command: list[str],
        resources: Any = None,
        mounts: Any = (),
        privileged: bool = False,
        devices: Any = (),
    ) -> str:
        """A busybox container in the pod, in the pod's PID namespace mode; ``resources``
        (a ``cri.LinuxContainerResources``) sets its limits, ``mounts`` (``cri.Mount``) its volumes,
        ``privileged`` makes it privileged (Kubernetes' ``securityContext.privileged``: the pod must be),
        ``devices`` (``cri.Device``) gives it host devices, as a device plugin does."""
        pid = pod.linux.security_context.namespace_options.pid
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=BUSYBOX_IMAGE),
            command=command,
            log_path=f"{name}.log",
            mounts=list(mounts),
            devices=list(devices),
            linux=cri.LinuxContainerConfig(
                resources=resources,
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.POD, pid=pid, ipc=cri.POD),
                    privileged=privileged,
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
    def pod(
        self, name: str, handler: str, pid: int = cri.CONTAINER, privileged: bool = False
    ) -> Iterator[tuple[str, Any]]:
        """A running pod sandbox (ID, config), stopped and removed on the way out."""
        config = self.pod_config(name, pid, privileged)
        pod_id = self.run_pod(config, handler)
        try:
            yield pod_id, config
        finally:
            self.remove_pod(pod_id)

    # -- teardown --------------------------------------------------------------------------

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._remove_pods()
        if self.channel is not None:
            self.channel.close()
        # containerd's own clean-up (the containers that appeared, the images), its
        # stop, and the end of every process it left (found by the marker).
        super().stop()
        for netns in self._netns_paths:
            unmount_under([Path(netns)])
            with contextlib.suppress(OSError):
                Path(netns).unlink()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30, check=False)
        _remove_cgroup_parent(self.cgroup_parent)

    def _remove_pods(self) -> None:
        """Bounded, failures only noted: a stuck pod must not stop the rest of the clean-up."""
        if self.service is None:
            return
        with contextlib.suppress(grpc.RpcError, AssertionError):
            pods = self.service.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
            for pod in [p for p in pods if p.metadata.namespace == POD_NAMESPACE]:
                with contextlib.suppress(grpc.RpcError, ValueError, KeyError):
                    info = self.service.PodSandboxStatus(
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
                        getattr(self.service, call)(request, timeout=120)


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
    shim, QEMU and virtiofsd name outside the test's directory: below /run/capsa,
    /run/capsa-v2, /run/capsa-vm and /run/containerd (but containerd's own
    sockets), and /dev/shm/capsa-*."""
    found = set()
    pattern = r"(?:/run/(?:capsa|capsa-v2|capsa-vm|containerd)/|/dev/shm/capsa-)[^\s,=]+"
    for proc in procs:
        for match in re.finditer(pattern, proc.cmdline):
            if match.group(0).startswith(str(CONTAINERD_SOCKET)):
                continue  # the daemon's, which outlives every container
            path = Path(match.group(0))
            # The directory right below the shim's own (/run/capsa-v2/pods/<pod>,
            # /run/capsa-v2/s/<hash>), or a task's (/run/containerd/io.containerd.runtime.v2.task/<ns>/<id>).
            depth = 6 if path.parts[1:3] == ("run", "containerd") else 5
            found.add(Path(*path.parts[:depth]) if len(path.parts) > depth else path)
    return sorted(found)
