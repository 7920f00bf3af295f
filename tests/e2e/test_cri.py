"""Pods through Kubernetes' CRI: containerd 1.6's CRI plugin driven over gRPC
(``cri/api.proto``), with the ``capsa`` runtime handler (``containerd-shim-capsa-v2``:
one VM per pod) and with ``runc`` (``io.containerd.runc.v2``), which proves the
harness: the same steps, the host's kernel instead of a VM.

``CAPSA_E2E_SHIM`` names the capsa shim binary (default: the venv's
``containerd-shim-capsa-v2``); without one the capsa cases are skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cri import api_pb2 as cri
from cri.harness import (
    BUSYBOX_IMAGE,
    SUBNET,
    ShimContainerd,
    host_boot_id,
    kernel_release,
    state_paths,
    wait_for,
)
from e2e_confinement import assert_confined, pod_qemus
from e2e_support import policy_annotation

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

BOOT_ID = "/proc/sys/kernel/random/boot_id"
SLEEP = ["sleep", "3600"]


def start_containers(k: ShimContainerd, pod_id: str, pod: cri.PodSandboxConfig, n: int) -> list[str]:
    ids = [k.create_container(pod_id, pod, f"c{i}", SLEEP) for i in range(1, n + 1)]
    for cid in ids:
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
    return ids


def test_version(k: ShimContainerd) -> None:
    version = k.call("Version", cri.VersionRequest(version="v1"))
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    assert k.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=BUSYBOX_IMAGE))).image.id


def test_pod_of_two_containers(k: ShimContainerd, handler: str) -> None:
    """RunPodSandbox, two containers, ExecSync in each: one kernel for the pod
    (the guest's under capsa, with exactly one QEMU; the host's under runc),
    then StopPodSandbox/RemovePodSandbox leave nothing behind."""
    with k.pod(f"two-{handler}", handler) as (pod_id, pod):
        status = k.call("PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        assert status.state == cri.SANDBOX_READY
        assert status.runtime_handler == handler
        assert status.network.ip.startswith(SUBNET.rsplit(".", 1)[0] + "."), status.network.ip

        ids = start_containers(k, pod_id, pod, 2)
        for cid in ids:
            assert k.container_state(cid) == cri.CONTAINER_RUNNING
        listed = k.call("ListContainers", cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id)))
        assert sorted(c.id for c in listed.containers) == sorted(ids)
        assert {c.state for c in listed.containers} == {cri.CONTAINER_RUNNING}

        boot_ids = []
        for cid in ids:
            result = k.exec_sync(cid, ["cat", BOOT_ID])
            assert result.exit_code == 0, result.stderr
            boot_ids.append(result.stdout.decode().strip())
        assert boot_ids[0] == boot_ids[1]
        if handler == "capsa":
            assert_confined(pod_qemus())  # issue 13: the host side of a CRI pod

        # ExecSync passes output and the exit code through.
        result = k.exec_sync(ids[1], ["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")

        # One shim per pod, whatever the handler; under capsa it holds the pod's one VM.
        shims = k.shims()
        assert len(shims) == 1, f"not one shim for the pod: {[str(s) for s in shims]}"
        assert pod_id in shims[0].cmdline
        qemus = k.qemus()
        if handler == "capsa":
            assert boot_ids[0] != host_boot_id(), "the containers run on the host's kernel"
            assert len(qemus) == 1, f"not one QEMU for the pod: {[str(q) for q in qemus]}"
            assert pod_id in qemus[0].cmdline and k.spawner(qemus[0]) == shims[0].pid, str(qemus[0])
        else:
            assert boot_ids[0] == host_boot_id()
            assert qemus == []
        state = state_paths(k.processes())
        assert state or handler == "runc", "capsa's shim names no state directory or socket"

    assert pod_id not in [p.id for p in k.call("ListPodSandbox", cri.ListPodSandboxRequest()).items]
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
    assert [p for p in state if p.exists()] == [], "state left behind"


def test_killed_vm_stops_every_container(k: ShimContainerd, handler: str) -> None:
    """SIGKILL to the pod's QEMU: containerd sees every container of the pod exit,
    and removing the pod cleans up the rest."""
    if handler != "capsa":
        pytest.skip("runc has no VM to kill")
    with k.pod("killed", handler) as (pod_id, pod):
        ids = start_containers(k, pod_id, pod, 2)
        qemus = k.qemus()
        assert len(qemus) == 1, f"not one QEMU for the pod: {[str(q) for q in qemus]}"
        state = state_paths(k.processes())
        os.kill(qemus[0].pid, signal.SIGKILL)
        wait_for(
            lambda: all(k.container_state(cid) == cri.CONTAINER_EXITED for cid in ids),
            60,
            "every container of the pod to exit",
        )
        for cid in ids:
            status = k.call("ContainerStatus", cri.ContainerStatusRequest(container_id=cid)).status
            assert status.exit_code != 0 and status.finished_at > 0, status
        # The sandbox task's exit is its own event, which may come after the containers'.
        wait_for(
            lambda: (
                k.call("PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.state
                == cri.SANDBOX_NOTREADY
            ),
            60,
            "the pod's sandbox to be not ready",
        )
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
    assert [p for p in state if p.exists()] == [], "state left behind"


def test_shim_named_by_path(k: ShimContainerd, handler: str) -> None:
    """A handler whose shim is given as ``runtime_path`` (no PATH lookup) runs a pod too."""
    with k.pod(f"path-{handler}", f"{handler}-path") as (pod_id, pod):
        (cid,) = start_containers(k, pod_id, pod, 1)
        result = k.exec_sync(cid, ["cat", BOOT_ID])
        assert result.exit_code == 0, result.stderr
        assert (result.stdout.decode().strip() == host_boot_id()) == (handler == "runc")
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_pod_ip_inside(k: ShimContainerd, handler: str) -> None:
    """The address CNI gave the pod (PodSandboxStatus) is on an interface every
    container of the pod sees: the pod's network namespace under runc, the pod
    VM's NIC under capsa."""
    with k.pod(f"ip-{handler}", handler) as (pod_id, pod):
        ip = k.call("PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
        assert ip.startswith(SUBNET.rsplit(".", 1)[0] + "."), ip
        for cid in start_containers(k, pod_id, pod, 2):
            result = k.exec_sync(cid, ["ip", "-o", "-4", "addr", "show"])
            assert result.exit_code == 0, result.stderr
            assert f"inet {ip}/" in result.stdout.decode(), result.stdout.decode()
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_container_limits(k: ShimContainerd, handler: str) -> None:
    """A container's CPU and memory limits reach its cgroup (the host's under runc,
    the guest's under capsa), and under capsa the pod VM grows to hold them: the
    guest gains the memory and the vCPUs (as many as ``max_vcpus`` allows), online."""
    quota_cpus, limit_mib = 2, 768
    resources = cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=quota_cpus * 100000, memory_limit_in_bytes=limit_mib << 20
    )
    with k.pod(f"limits-{handler}", handler) as (pod_id, pod):
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="limited"),
            image=cri.ImageSpec(image=BUSYBOX_IMAGE),
            command=SLEEP,
            linux=cri.LinuxContainerConfig(resources=resources),
        )
        cid = k.call(
            "CreateContainer", cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        ).container_id
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        if handler == "runc":
            # The host's cgroup v1 hierarchies, as the container sees them.
            script = "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/memory/memory.limit_in_bytes"
        else:
            # The guest's cgroup v2 (no cgroup namespace: CRI adds none on a v1 host).
            script = "d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cut -d' ' -f1 $d/cpu.max; cat $d/memory.max"
        result = k.exec_sync(cid, ["sh", "-c", f"{script}; nproc; grep MemTotal /proc/meminfo"])
        assert result.exit_code == 0, result.stderr
        quota, limit, nproc, memtotal = result.stdout.decode().splitlines()
        assert (int(quota), int(limit)) == (quota_cpus * 100000, limit_mib << 20)
        if handler == "capsa":
            from capsa.config import host_cpus, load_config, max_vcpus_for

            hv = load_config().hypervisor
            assert int(nproc) == min(hv.default_vcpus + quota_cpus, max_vcpus_for(hv, host_cpus())), nproc
            memtotal_mib = int(memtotal.split()[1]) // 1024
            # The kernel keeps some of the RAM for itself; the limit came on top of the default.
            assert memtotal_mib > hv.default_memory_mib * 0.9 + limit_mib, memtotal
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_exec_sync_timeout(k: ShimContainerd, handler: str) -> None:
    """ExecSync past its timeout: containerd kills the exec'd process and says so; the
    container goes on, and the killed process is gone from it."""
    with k.pod(f"timeout-{handler}", handler) as (pod_id, pod):
        (cid,) = start_containers(k, pod_id, pod, 1)
        started = time.monotonic()
        with pytest.raises(AssertionError, match="timeout"):
            k.exec_sync(cid, ["sleep", "67"], timeout=2)
        assert time.monotonic() - started < 30
        wait_for(lambda: "sleep 67" not in k.exec_sync(cid, ["ps"]).stdout.decode(), 30, "the timed-out exec to end")
        assert k.container_state(cid) == cri.CONTAINER_RUNNING
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def create_started(k: ShimContainerd, pod_id: str, pod: cri.PodSandboxConfig, name: str, command: list[str]) -> str:
    cid = k.create_container(pod_id, pod, name, command)
    k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
    return cid


def finished(k: ShimContainerd, cid: str) -> cri.ContainerStatus:
    wait_for(lambda: k.container_state(cid) == cri.CONTAINER_EXITED, 60, f"container {cid[:12]} to exit")
    return k.call("ContainerStatus", cri.ContainerStatusRequest(container_id=cid)).status


def test_container_lifecycle_in_a_running_pod(k: ShimContainerd, handler: str) -> None:
    """Containers come and go while the pod (and its VM) stays: an exit status and
    the container's output reach CRI (its log file), StopContainer's SIGTERM is
    honoured or followed by SIGKILL after the grace period, RemoveContainer
    removes one, and a new container still joins the pod."""
    with k.pod(f"cycle-{handler}", handler) as (pod_id, pod):
        talker = create_started(k, pod_id, pod, "talker", ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"])
        status = finished(k, talker)
        assert status.exit_code == 3, status
        log = Path(status.log_path).read_text()
        # CRI's log format: <time> <stream> <F|P> <line>
        assert " stdout F to-stdout\n" in log and " stderr F to-stderr\n" in log, log

        polite = create_started(k, pod_id, pod, "polite", ["sh", "-c", 'trap "exit 0" TERM; while :; do sleep 1; done'])
        stubborn = create_started(k, pod_id, pod, "stubborn", ["sh", "-c", 'trap "" TERM; while :; do sleep 1; done'])
        # Give the shells time to set their traps.
        time.sleep(1)
        k.call("StopContainer", cri.StopContainerRequest(container_id=polite, timeout=20))
        assert finished(k, polite).exit_code == 0
        started = time.monotonic()
        k.call("StopContainer", cri.StopContainerRequest(container_id=stubborn, timeout=2))
        assert finished(k, stubborn).exit_code == 128 + signal.SIGKILL
        assert time.monotonic() - started >= 2

        for cid in (talker, polite, stubborn):
            k.call("RemoveContainer", cri.RemoveContainerRequest(container_id=cid))
        listed = k.call("ListContainers", cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id)))
        assert listed.containers == []

        late = create_started(k, pod_id, pod, "late", SLEEP)
        assert k.exec_sync(late, ["true"]).exit_code == 0
        assert len(k.shims()) == 1
        assert len(k.qemus()) == (1 if handler == "capsa" else 0)
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_a_pod_annotated_agent_policy_refuses_exec(k: ShimContainerd, handler: str) -> None:
    """The pod annotation ``io.capsa.agent.policy`` (no-exec, passed by the handler's
    ``pod_annotations``): ExecSync, what ``crictl exec`` and ``kubectl exec`` use, fails naming the rule."""
    if handler != "capsa":
        pytest.skip("an agent policy is capsa's")
    config = k.pod_config("policy")
    key, value = policy_annotation("no-exec").split("=", 1)
    config.annotations[key] = value
    pod_id = k.run_pod(config, handler)
    try:
        cid = create_started(k, pod_id, config, "c", ["sleep", "600"])
        with pytest.raises(AssertionError, match='ExecProcess refused by the agent policy \\(rule "no-exec"\\)'):
            k.exec_sync(cid, ["echo", "should not run"])
        assert k.container_state(cid) == cri.CONTAINER_RUNNING
    finally:
        k.remove_pod(pod_id)
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


# -- privileged pods (docs/kubernetes.md, "Privileged pods") ----------------------------------------


def host_disk() -> str:
    """The host's disk: the block device of the host's root filesystem (``vda`` here), by its /dev name."""
    device = os.stat("/").st_dev
    uevent = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/uevent").read_text()
    return dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)["DEVNAME"]


def containerd_caps(k: ShimContainerd) -> str:
    """containerd's effective capabilities: what it gives a privileged container (``WithAllCurrentCapabilities``)."""
    assert k.proc is not None
    status = Path(f"/proc/{k.proc.pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))


# What a privileged container is, seen from inside: ``name value`` lines.
PRIVILEGED_LOOK = (
    "grep -E '^(CapEff|Seccomp):' /proc/self/status; "
    "echo sys $(grep ' /sys sysfs ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1); "
    "mkdir -p /tmp/own && mount -t tmpfs privileged-tmpfs /tmp/own"
    " && echo mounted $(grep -c privileged-tmpfs /proc/mounts) && umount /tmp/own; "
    "echo kernel $(uname -r)"
)


def test_a_privileged_pod_without_host_devices(k: ShimContainerd, handler: str) -> None:
    """A handler with ``privileged_without_host_devices = true``: a privileged container is
    privileged in its kernel (containerd's capabilities, no seccomp filter, a writable /sys, a
    mount of its own) and gets no device of the host. Under capsa that kernel is the guest's:
    the host's disk is neither in the container's /dev nor among the kernel's block devices
    (/proc/partitions, /sys/block); under runc it is the host's, whose partitions list the disk."""
    disk = host_disk()
    with k.pod(f"priv-{handler}", f"{handler}-without-host-devices", privileged=True) as (pod_id, pod):
        cid = k.create_container(pod_id, pod, "privileged", SLEEP, privileged=True)
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        look = dict(line.split(None, 1) for line in k.sh(cid, PRIVILEGED_LOOK).splitlines())
        assert look["CapEff:"] == containerd_caps(k) and look["Seccomp:"] == "0", look
        assert look["mounted"] == "1", look
        assert look["kernel"] == kernel_release(handler), look
        if handler == "capsa":
            # containerd asks for a writable /sys; runc on this nested host mounts it read-only anyway.
            assert look["sys"] == "rw", look
        assert disk not in k.sh(cid, "ls /dev").split()
        partitions = k.sh(cid, "cat /proc/partitions; ls /sys/block")
        assert (disk in partitions.split()) == (handler == "runc"), partitions
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def refusal(k: ShimContainerd, cid: str) -> str:
    """The error of a container's StartContainer, where CRI creates its task (the shim's Create), which
    must fail; the container must be left exited with the same message, as CRI leaves a StartError."""
    with pytest.raises(AssertionError) as refused:
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
    message = str(refused.value).split("\ncontainerd log:", 1)[0]
    status = k.call("ContainerStatus", cri.ContainerStatusRequest(container_id=cid)).status
    assert status.state == cri.CONTAINER_EXITED and status.message in message, status
    assert "\n" not in message, message
    return message


def test_a_privileged_pod_given_the_hosts_devices(k: ShimContainerd, handler: str) -> None:
    """A handler without the option: containerd lists every device of the host in a privileged
    container's spec. runc gives them (the host's disk is in the container's /dev); capsa leaves the
    host's block devices out, as the option would, and the container runs privileged in the VM with
    the VM's devices: no disk of the host in its /dev or among the guest kernel's block devices."""
    disk = host_disk()
    with k.pod(f"hostdev-{handler}", handler, privileged=True) as (pod_id, pod):
        cid = k.create_container(pod_id, pod, "privileged", SLEEP, privileged=True)
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        look = dict(line.split(None, 1) for line in k.sh(cid, PRIVILEGED_LOOK).splitlines())
        assert look["Seccomp:"] == "0" and look["mounted"] == "1", look
        assert look["kernel"] == kernel_release(handler), look
        if handler == "runc":
            assert disk in k.sh(cid, "ls /dev").split()
        else:
            assert disk not in k.sh(cid, "ls /dev").split()
            # pmem0 is the guest's own root image, the VM's only disk of its own.
            assert k.sh(cid, "ls /sys/block").split() == ["pmem0"], "a disk of the host is in the VM"
            assert len(k.qemus()) == 1
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


@contextlib.contextmanager
def loop_devices(directory: Path, count: int) -> Iterator[list[str]]:
    """``count`` loop devices, each on a sparse 1 MiB file of its own; detached on the way out."""
    devices: list[str] = []
    try:
        for index in range(count):
            backing = directory / f"disk{index}.img"
            with backing.open("wb") as disk:
                disk.truncate(1 << 20)
            found = subprocess.run(
                ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, timeout=30, check=True
            )
            devices.append(found.stdout.strip())
        yield devices
    finally:
        for device in devices:
            subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30, check=False)


def test_more_disks_than_the_vm_has_hot_plug_ports_for(k: ShimContainerd, handler: str, tmp_path: Path) -> None:
    """A container given more host block devices (CRI ``devices``, as a device plugin hands
    them) than a VM has PCIe hot-plug ports: runc gives them all; capsa refuses the container
    with one line naming the first device that finds no port, before it attaches any, and the
    pod goes on: a container given one of the devices runs with that one disk in the VM."""
    from capsa.hypervisor.base import HOTPLUG_SLOTS

    with loop_devices(tmp_path, HOTPLUG_SLOTS + 1) as loops, k.pod(f"ports-{handler}", handler) as (pod_id, pod):
        devices = [
            cri.Device(container_path=f"/dev/xvd{chr(ord('a') + i)}", host_path=loop, permissions="rwm")
            for i, loop in enumerate(loops)
        ]
        cid = k.create_container(pod_id, pod, "many", SLEEP, devices=devices)
        if handler == "runc":
            k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
            assert k.sh(cid, "ls /dev | grep xvd").split() == [d.container_path[5:] for d in devices]
        else:
            message = refusal(k, cid)
            found = re.search(
                r"cannot attach host device (/dev/loop\d+) to the VM: no free PCIe hot-plug port "
                r"\((\d+) in use, (\d+) free for the container's (\d+) disks\); give the container at most \3 ",
                message,
            )
            assert found, message
            in_use, free, disks = (int(n) for n in found.group(2, 3, 4))
            assert (disks, in_use + free) == (HOTPLUG_SLOTS + 1, HOTPLUG_SLOTS), message
            assert found.group(1) == loops[free], message
            k.call("RemoveContainer", cri.RemoveContainerRequest(container_id=cid))
            one = k.create_container(pod_id, pod, "one", SLEEP, devices=devices[:1])
            k.call("StartContainer", cri.StartContainerRequest(container_id=one))
            assert k.sh(one, "ls /dev | grep xvd").split() == ["xvda"]
            disks = k.sh(one, "ls /sys/block").split()
            assert disks == ["pmem0", "vda"], f"a disk of the refused container is in the VM: {disks}"
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


PANIC_LINE = "Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled"


def test_a_guest_panic_reaches_the_containers_log(k: ShimContainerd, handler: str) -> None:
    """A privileged container makes its guest kernel panic (``vm.panic_on_oom = 2``, then it fills
    its 64 MiB limit): the shim v2 writes the panic's line to the container's stderr, which is the
    container log CRI keeps (what ``crictl logs`` and ``kubectl logs`` show), and the container exits."""
    if handler != "capsa":
        pytest.skip("a guest kernel is capsa's")
    with k.pod(f"panic-{handler}", handler, privileged=True) as (pod_id, pod):
        command = ["sh", "-c", "echo 2 > /proc/sys/vm/panic_on_oom && echo armed && exec tail /dev/zero"]
        limits = cri.LinuxContainerResources(memory_limit_in_bytes=64 << 20)
        cid = k.create_container(pod_id, pod, "panicking", command, resources=limits, privileged=True)
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        wait_for(lambda: k.container_state(cid) == cri.CONTAINER_EXITED, 180, "the container to exit")
        log = Path(pod.log_directory) / "panicking.log"
        wait_for(lambda: PANIC_LINE in log.read_text(), 30, "the panic's line in the container log")
        text = log.read_text()
        assert "armed" in text
        shown = f"capsa: the container's VM stopped: the guest kernel panicked; guest console: {PANIC_LINE}"
        assert f"stderr F {shown}" in text
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
