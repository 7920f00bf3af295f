"""containerd 1.6 (its default instance) with its runc shim (io.containerd.runc.v2)
and the runtime under test as the shim's runc binary, driven with ``ctr`` in its
own namespace (``default``): the runtime gets the shim's default root,
``--root /run/containerd/runc/default``."""

from __future__ import annotations

import pytest
from e2e_engines import IMAGE, Containerd
from e2e_support import Runtime, assert_nothing_left, expected_kernel_release, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]


def ctr_run(containerd: Containerd, *args: str) -> list[str]:
    return [
        "run",
        "--runtime", "io.containerd.runc.v2",
        "--runc-binary", str(containerd.runtime.wrapper),
        *args,
    ]  # fmt: skip


def task_status(containerd: Containerd, cid: str) -> str:
    for line in containerd.ctr("tasks", "ls", timeout=30).check().stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return "absent"


def test_run_prints_guest_kernel(containerd: Containerd, runtime: Runtime) -> None:
    result = containerd.ctr(*ctr_run(containerd, "--rm", IMAGE, "k1", "uname", "-r")).check()
    assert result.out == expected_kernel_release(runtime)


def test_exit_code(containerd: Containerd) -> None:
    assert containerd.ctr(*ctr_run(containerd, "--rm", IMAGE, "x7", "sh", "-c", "exit 7")).code == 7


def test_detached_exec_kill_delete(containerd: Containerd) -> None:
    cid = "d1"
    containerd.ctr(
        *ctr_run(containerd, "--detach", IMAGE, cid, "sh", "-c", 'trap "exit 42" TERM; while :; do sleep 1; done')
    ).check()
    try:
        assert task_status(containerd, cid) == "RUNNING"
        exec_result = containerd.ctr("tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo from exec; exit 3")
        assert exec_result.code == 3
        assert exec_result.out == "from exec"
        containerd.ctr("tasks", "kill", "--signal", "SIGTERM", cid).check()
        wait_until(lambda: task_status(containerd, cid) == "STOPPED", 60, "the task to stop")
        containerd.ctr("tasks", "delete", cid).check()
        assert task_status(containerd, cid) == "absent"
    finally:
        containerd.ctr("tasks", "delete", "--force", cid)
        containerd.ctr("containers", "delete", cid).check()


def test_nothing_left(containerd: Containerd) -> None:
    made = [cid for _, cid in containerd.runtime.created()]
    assert made, "no container was created through the runtime"
    listed = containerd.ctr("containers", "ls", "--quiet").check().stdout.split()
    assert [cid for cid in listed if cid in made] == []
    assert_nothing_left(
        containerd.runtime, containerd.runtime_root, containerd.needles, engine_words=("containerd-shim",)
    )
