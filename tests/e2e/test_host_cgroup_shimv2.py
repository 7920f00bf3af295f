"""containerd-shim-capsa-v2 and the host cgroup (Kata's ``sandbox_cgroup_only``): the shim
process itself, QEMU and virtiofsd go into the first container's cgroupsPath, which for a
CRI pod is the sandbox's, below the pod cgroup; they leave and it goes at teardown.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cri.harness import BUSYBOX_IMAGE, CAPSA_RUNTIME, CTR_NAMESPACE, ShimContainerd, capsa_shim, skip_or_fail, wait_for
from e2e_cgroups import CGROUP_ROOT
from e2e_support import Proc

from capsa.runtime.hostcgroup import parse_proc_cgroup

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

NS = CTR_NAMESPACE  # ctr's own, "default"


@pytest.fixture(scope="module")
def k(k: ShimContainerd) -> ShimContainerd:
    """conftest's containerd, with the busybox image in this module's ctr namespace; capsa's shim is a must."""
    if capsa_shim() is None:
        skip_or_fail("containerd-shim-capsa-v2 is not installed (set CAPSA_E2E_SHIM or reinstall capsa)")
    k.import_busybox(NS)
    return k


def cgroups_of(pid: int) -> dict[str, str]:
    return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def directories(cgroup: str) -> list[Path]:
    """The cgroup in every hierarchy our own process is in."""
    found = []
    for hierarchy in cgroups_of(os.getpid()):
        if hierarchy:
            base = CGROUP_ROOT / hierarchy.removeprefix("name=")
        else:
            base = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
        found.append(base / cgroup.lstrip("/"))
    return found


def vm_processes(k: ShimContainerd) -> dict[str, int]:
    """The one pod VM's QEMU, the shim v2 server that started it (and the ``capsa-vmm``
    between them, if any) and the shim's virtiofsd."""
    qemus = k.qemus()
    assert len(qemus) == 1, [str(q) for q in qemus]
    shim = k.spawner(qemus[0])
    virtiofsd: list[Proc] = [p for p in k.processes() if p.ppid == shim and "virtiofsd" in p.cmdline]
    found = {"qemu": qemus[0].pid, "shim v2": shim}
    if qemus[0].ppid != shim:
        found["capsa-vmm"] = qemus[0].ppid
    if virtiofsd:
        found["virtiofsd"] = virtiofsd[0].pid
    return found


def assert_all_in(pids: dict[str, int], cgroup: str) -> None:
    for name, pid in pids.items():
        paths = cgroups_of(pid)
        assert set(paths.values()) == {cgroup}, f"{name} ({pid}): {paths}"


def test_ctr_run_puts_the_shim_and_its_vm_in_the_container_cgroup(k: ShimContainerd) -> None:
    cid = "hc-ctr"
    cgroup = f"/capsa-e2e-hc/{cid}"
    run = ["run", "--runtime", CAPSA_RUNTIME, "--cgroup", cgroup, "--detach", BUSYBOX_IMAGE, cid, "sleep", "1000"]
    k.ctr(NS, *run).check()
    try:
        pids = vm_processes(k)
        assert_all_in(pids, cgroup)
        metrics = k.ctr(NS, "tasks", "metrics", cid).check().stdout
        assert "memory" in metrics, metrics
        k.ctr(NS, "tasks", "kill", "--signal", "SIGKILL", cid).check()
        wait_for(lambda: "RUNNING" not in k.ctr(NS, "tasks", "ls").stdout, 60, "the task to stop")
    finally:
        k.ctr(NS, "tasks", "delete", "--force", cid)
        k.ctr(NS, "containers", "delete", cid)
    deadline = time.monotonic() + 30
    while any(d.exists() for d in directories(cgroup)) and time.monotonic() < deadline:
        time.sleep(0.3)  # the shim removes it as it shuts down, after containerd's delete returned
    assert [d for d in directories(cgroup) if d.exists()] == []
    assert [d for d in directories("/capsa-e2e-hc") if d.exists()] == []


def test_a_pod_vm_is_accounted_to_the_pod_sandbox_cgroup(k: ShimContainerd) -> None:
    """CRI with cgroupfs: the sandbox's cgroupsPath is ``<pod cgroup parent>/<sandbox id>``."""
    with k.pod("hc", "capsa") as (pod_id, _):
        cgroup = f"{k.cgroup_parent}/{pod_id}"
        assert_all_in(vm_processes(k), cgroup)
    deadline = time.monotonic() + 30
    while any(d.exists() for d in directories(cgroup)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert [d for d in directories(cgroup) if d.exists()] == []
