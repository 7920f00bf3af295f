"""``ctr`` against containerd 1.6 with ``--runtime io.containerd.capsa.v2``: containerd's
own ttrpc client is the peer of capsa's shim v2 (Task service, events), for run,
exit codes, exec, kill, pause/resume, metrics, ps, a terminal, and a VM killed
under a running task. Each case also runs with ``io.containerd.runc.v2``, which
proves the harness (the host's kernel instead of the guest's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from cri.harness import (
    BUSYBOX_IMAGE,
    CAPSA_RUNTIME,
    CTR_NAMESPACE,
    RUNC_RUNTIME,
    ShimContainerd,
    capsa_shim,
    kernel_release,
    skip_or_fail,
    state_paths,
    wait_for,
)
from e2e_confinement import assert_confined, pod_qemus
from e2e_support import run_in_pty

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

NS = CTR_NAMESPACE  # ctr's own, "default"
TRAP_LOOP = 'trap "exit 42" TERM; while :; do sleep 1; done'


@pytest.fixture(scope="module")
def k(k: ShimContainerd) -> ShimContainerd:
    """conftest's containerd, with the busybox image in this module's ctr namespace."""
    k.import_busybox(NS)
    return k


@pytest.fixture(params=["runc", "capsa"])
def runtime(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "capsa" and capsa_shim() is None:
        skip_or_fail("containerd-shim-capsa-v2 is not installed (set CAPSA_E2E_SHIM or reinstall capsa)")
    return name


def ctr_run(k: ShimContainerd, runtime: str, *args: str) -> list[str]:
    if runtime == "runc":
        return ["run", "--runtime", RUNC_RUNTIME, *args]
    return ["run", "--runtime", CAPSA_RUNTIME, *args]


def task_status(k: ShimContainerd, cid: str) -> str:
    for line in k.ctr(NS, "tasks", "ls", timeout=30).check().stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return "absent"


def test_run_prints_kernel_and_exit_code(k: ShimContainerd, runtime: str) -> None:
    image = BUSYBOX_IMAGE
    result = k.ctr(NS, *ctr_run(k, runtime, "--rm", image, f"u-{runtime}", "uname", "-r")).check()
    assert result.out == kernel_release(runtime)
    assert k.ctr(NS, *ctr_run(k, runtime, "--rm", image, f"x-{runtime}", "sh", "-c", "exit 3")).code == 3
    assert task_status(k, f"u-{runtime}") == "absent"


def test_exec_ps_metrics_pause_kill(k: ShimContainerd, runtime: str) -> None:
    cid = f"d-{runtime}"
    image = BUSYBOX_IMAGE
    k.ctr(NS, *ctr_run(k, runtime, "--detach", image, cid, "sh", "-c", TRAP_LOOP)).check()
    try:
        assert task_status(k, cid) == "RUNNING"
        if runtime == "capsa":
            assert_confined(pod_qemus())  # issue 13: the host side, under the shim v2

        result = k.ctr(NS, "tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo from exec; exit 3")
        assert (result.code, result.out) == (3, "from exec"), result.stderr

        ps = k.ctr(NS, "tasks", "ps", cid).check().stdout.splitlines()
        assert ps[0].split()[0] == "PID" and len(ps) >= 2, ps

        metrics = k.ctr(NS, "tasks", "metrics", cid).check().stdout
        assert "METRIC" in metrics and "memory" in metrics, metrics

        k.ctr(NS, "tasks", "pause", cid).check()
        assert task_status(k, cid) == "PAUSED"
        k.ctr(NS, "tasks", "resume", cid).check()
        assert task_status(k, cid) == "RUNNING"
        result = k.ctr(NS, "tasks", "exec", "--exec-id", "e2", cid, "echo", "resumed")
        assert (result.code, result.out) == (0, "resumed"), result.stderr

        k.ctr(NS, "tasks", "kill", "--signal", "SIGTERM", cid).check()
        wait_for(lambda: task_status(k, cid) == "STOPPED", 60, "the task to stop")
        k.ctr(NS, "tasks", "delete", cid).check()
        assert task_status(k, cid) == "absent"
    finally:
        k.ctr(NS, "tasks", "delete", "--force", cid)
        k.ctr(NS, "containers", "delete", cid)


def memory_usage(output: str) -> int:
    """Memory in use from ``ctr tasks metrics``'s table: ``memory.usage`` (cgroup v2 metrics,
    what capsa's shim sends) or ``memory.usage_in_bytes`` (v1, a runc shim on a v1 host)."""
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] in ("memory.usage", "memory.usage_in_bytes"):
            return int(fields[1])
    raise AssertionError(f"no memory usage in:\n{output}")


def test_metrics_show_what_the_container_holds(k: ShimContainerd, runtime: str) -> None:
    """A container that fills 200 MiB of a tmpfs (memory charged to its cgroup): ``ctr tasks
    metrics`` shows at least that much memory in use, under capsa the guest cgroup's."""
    cid = f"m-{runtime}"
    script = "dd if=/dev/zero of=/big/f bs=1M count=200 2>/dev/null && echo filled && sleep 600"
    tmpfs = "type=tmpfs,src=tmpfs,dst=/big,options=size=300m"
    k.ctr(NS, *ctr_run(k, runtime, "--detach", "--mount", tmpfs, BUSYBOX_IMAGE, cid, "sh", "-c", script)).check()
    try:
        wait_for(
            lambda: memory_usage(k.ctr(NS, "tasks", "metrics", cid).check().stdout) > 200 << 20,
            120,
            "the container's memory to reach 200 MiB",
        )
    finally:
        k.ctr(NS, "tasks", "kill", "--signal", "SIGKILL", cid)
        k.ctr(NS, "tasks", "delete", "--force", cid)
        k.ctr(NS, "containers", "delete", cid)


def test_foreground_run_gets_the_exit_status_of_a_kill(k: ShimContainerd, runtime: str) -> None:
    """``ctr run --rm`` in the foreground, ``ctr task kill`` from elsewhere: the
    container's trap answers SIGTERM with 42, which ``ctr run`` exits with (the
    shim's Wait and /tasks/exit carry it), and --rm removes the container."""
    cid = f"f-{runtime}"
    proc = subprocess.Popen(
        k.ctr_argv(NS, *ctr_run(k, runtime, "--rm", BUSYBOX_IMAGE, cid, "sh", "-c", TRAP_LOOP)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: task_status(k, cid) == "RUNNING", 120, "the task to run")
        # Let the shell reach its trap before the signal comes.
        time.sleep(1)
        k.ctr(NS, "tasks", "kill", "--signal", "SIGTERM", cid).check()
        assert proc.wait(timeout=60) == 42, proc.stderr.read() if proc.stderr else ""
        wait_for(lambda: k.ctr(NS, "containers", "ls", "--quiet").out.split().count(cid) == 0, 30, "--rm")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        k.ctr(NS, "tasks", "delete", "--force", cid)
        k.ctr(NS, "containers", "delete", cid)


def test_terminal(k: ShimContainerd, runtime: str) -> None:
    image = BUSYBOX_IMAGE
    argv = k.ctr_argv(NS, *ctr_run(k, runtime, "-t", "--rm", image, f"t-{runtime}", "sh"))
    result = run_in_pty(
        argv,
        rows=33,
        cols=101,
        send=[("# ", "stty size; tty; echo $((6*7))\n"), ("42", "exit 5\n")],
        timeout=120,
        env=k.env,
    )
    assert "33 101" in result.output, result.output
    assert "/dev/pts/" in result.output or "/dev/console" in result.output, result.output
    assert result.code == 5, result.output


def test_killed_vm_ends_the_task(k: ShimContainerd, runtime: str) -> None:
    """SIGKILL to the VM's QEMU under a running task and a running exec: both end,
    containerd sees the task stopped, delete cleans up, nothing is left."""
    if runtime != "capsa":
        pytest.skip("runc has no VM to kill")
    cid = "killed"
    image = BUSYBOX_IMAGE
    k.ctr(NS, *ctr_run(k, runtime, "--detach", image, cid, "sh", "-c", TRAP_LOOP)).check()
    exec_proc = subprocess.Popen(
        k.ctr_argv(NS, "tasks", "exec", "--exec-id", "long", cid, "sleep", "3600"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(k.ctr(NS, "tasks", "ps", cid).stdout.splitlines()) >= 3, 60, "the exec to run")
        qemus = k.qemus()
        assert len(qemus) == 1, f"not one QEMU for the task: {[str(q) for q in qemus]}"
        state = state_paths(k.processes())
        assert state, "capsa's shim names no state directory or socket"
        os.kill(qemus[0].pid, signal.SIGKILL)
        wait_for(lambda: task_status(k, cid) == "STOPPED", 60, "the task to stop")
        assert exec_proc.wait(timeout=60) != 0
        k.ctr(NS, "tasks", "delete", cid).check()
        k.ctr(NS, "containers", "delete", cid).check()
    finally:
        if exec_proc.poll() is None:
            exec_proc.kill()
            exec_proc.wait()
        k.ctr(NS, "tasks", "delete", "--force", cid)
        k.ctr(NS, "containers", "delete", cid)
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
    assert [p for p in state if p.exists()] == [], "state left behind"


def test_nothing_left(k: ShimContainerd) -> None:
    assert k.ctr(NS, "containers", "ls", "--quiet").check().out == ""
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_an_oom_kill_reaches_containerd_as_an_event(k: ShimContainerd, runtime: str) -> None:
    """A process the OOM killer takes in the container's cgroup (the guest's under capsa)
    becomes containerd's ``/tasks/oom`` event, as runc's shim reports it."""
    cid = f"oom-{runtime}"
    with subprocess.Popen(
        k.ctr_argv(NS, "events"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as events:
        try:
            time.sleep(0.5)  # subscribed before the container starts
            script = "tail /dev/zero; sleep 2"  # tail is killed; the shell lives on
            limit = str(32 << 20)
            k.ctr(NS, *ctr_run(k, runtime, "--rm", "--memory-limit", limit, BUSYBOX_IMAGE, cid, "sh", "-c", script))
        finally:
            time.sleep(0.5)
            events.terminate()
        output, _ = events.communicate(timeout=30)
    oom = [line for line in output.splitlines() if "/tasks/oom" in line]
    assert oom and f'"container_id":"{cid}"' in oom[0], output[-2000:]


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    remaining = iter(seen)
    return all(topic in remaining for topic in wanted)


def test_task_events_reach_containerd_in_order(k: ShimContainerd, runtime: str) -> None:
    """The task events the shim publishes (``Events.Forward`` on TTRPC_ADDRESS) reach
    containerd's subscribers, in the order the calls came: create, start,
    exec-added, exec-started, paused, resumed, the init's exit, delete."""
    cid = f"ev-{runtime}"
    with subprocess.Popen(
        k.ctr_argv(NS, "events"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as events:
        try:
            time.sleep(0.5)  # subscribed before the container starts
            k.ctr(NS, *ctr_run(k, runtime, "--detach", BUSYBOX_IMAGE, cid, "sh", "-c", TRAP_LOOP)).check()
            result = k.ctr(NS, "tasks", "exec", "--exec-id", "e1", cid, "true")
            assert result.code == 0, result.stderr
            k.ctr(NS, "tasks", "pause", cid).check()
            k.ctr(NS, "tasks", "resume", cid).check()
            k.ctr(NS, "tasks", "kill", "--signal", "SIGTERM", cid).check()
            wait_for(lambda: task_status(k, cid) == "STOPPED", 60, "the task to stop")
            k.ctr(NS, "tasks", "delete", cid).check()
        finally:
            k.ctr(NS, "tasks", "delete", "--force", cid)
            k.ctr(NS, "containers", "delete", cid)
            time.sleep(0.5)
            events.terminate()
        output, _ = events.communicate(timeout=30)
    # ctr events: "<date> <time> <zone> UTC <namespace> <topic> <event as JSON>"
    topics = [
        word
        for line in output.splitlines()
        if f'"container_id":"{cid}"' in line
        for word in line.split()[:6]
        if word.startswith("/tasks/")
    ]
    wanted = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ]
    assert is_subsequence(wanted, topics), f"{topics}\n{output[-2000:]}"
    assert topics.count("/tasks/exit") >= 2, topics  # the exec's and the init's
