"""Docker 20.10 (dockerd, containerd 1.6 and its runc shim) driving the runtime
under test, registered with ``dockerd --add-runtime``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_cgroups import cgroup_dirs, memory_bytes
from e2e_engines import Docker
from e2e_support import (
    Runtime,
    assert_nothing_left,
    end_runtime_processes,
    expected_kernel_release,
    run_in_pty,
    runtime_pids,
)

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]


@contextlib.contextmanager
def removed_after(docker: Docker, name: str) -> Iterator[None]:
    """Remove container ``name`` after the block, whatever state a failure left it
    in, keeping the block's own error: if the block failed, the runtime processes
    it made are ended first, since one that hangs holds Docker's rm up too."""
    before = runtime_pids(docker.runtime.session)
    try:
        yield
    except BaseException:
        end_runtime_processes(docker.runtime.session, before)
        raise
    finally:
        with contextlib.suppress(AssertionError):
            docker("rm", "--force", name, timeout=60)


def docker_run(docker: Docker, *args: str) -> list[str]:
    return ["run", "--runtime", docker.runtime_name, "--network", "none", *args]


def test_run_rm_prints_guest_kernel(docker: Docker, runtime: Runtime) -> None:
    result = docker(*docker_run(docker, "--rm", docker.image, "uname", "-r")).check()
    assert result.out == expected_kernel_release(runtime)


@pytest.mark.parametrize("code", [0, 7])
def test_exit_code(docker: Docker, code: int) -> None:
    assert docker(*docker_run(docker, "--rm", docker.image, "sh", "-c", f"exit {code}")).code == code


def test_missing_command(docker: Docker) -> None:
    """The runtime's error reaches the user through containerd's runc shim (the
    last error line of the runtime's JSON log), and Docker maps "not found" to 127."""
    result = docker(*docker_run(docker, "--rm", docker.image, "/no/such/command"))
    assert result.code == 127, result.stderr
    assert "/no/such/command" in result.stderr


def test_interactive_tty(docker: Docker) -> None:
    """``docker run -it``: a shell on a pty of the caller's size, typed into."""
    with removed_after(docker, "e2e-it"):
        result = run_in_pty(
            docker.argv(*docker_run(docker, "-it", "--rm", "--name", "e2e-it", docker.image, "sh")),
            rows=29,
            cols=97,
            send=[("# ", "tty; stty size; exit 3\r")],
            timeout=60,
        )
        assert result.code == 3, result.output
        assert "/dev/pts/0" in result.output
        assert "29 97" in result.output


def test_exec_tty(docker: Docker) -> None:
    with removed_after(docker, "e2e-exec-it"):
        docker(*docker_run(docker, "-d", "--name", "e2e-exec-it", docker.image, "sleep", "1000")).check()
        # (Docker 20.10 leaves an exec's terminal at 0x0 even with runc: no size check.)
        result = run_in_pty(
            docker.argv("exec", "-it", "e2e-exec-it", "sh"),
            send=[("# ", "tty; echo typed-$((6*7)); exit 4\r")],
            timeout=60,
        )
        assert result.code == 4, result.output
        assert "/dev/pts/" in result.output and "typed-42" in result.output


def test_detached_exec_and_stop(docker: Docker) -> None:
    cid = (
        docker(*docker_run(docker, "-d", docker.image, "sh", "-c", 'trap "" TERM; while :; do sleep 1; done'))
        .check()
        .out
    )
    try:
        assert docker("exec", cid, "echo", "from exec").check().out == "from exec"
        assert docker("exec", "-i", cid, "cat", input="piped\n").check().stdout == "piped\n"
        assert docker("exec", cid, "sh", "-c", "exit 5").code == 5
        began = time.monotonic()
        docker("stop", "--time", "2", cid).check()
        assert time.monotonic() - began >= 2
        assert docker.inspect(cid, "{{.State.ExitCode}}") == "137"
    finally:
        docker("rm", "--force", cid).check()


def test_stop_delivers_term(docker: Docker) -> None:
    cid = (
        docker(*docker_run(docker, "-d", docker.image, "sh", "-c", 'trap "exit 42" TERM; while :; do sleep 1; done'))
        .check()
        .out
    )
    try:
        docker("stop", "--time", "20", cid).check()
        assert docker.inspect(cid, "{{.State.ExitCode}}") == "42"
    finally:
        docker("rm", "--force", cid).check()


def test_stats_from_the_host_cgroup(docker: Docker) -> None:
    """containerd's runc shim loads the cgroup of the PID from ``--pid-file``
    (capsa's shim) and ``docker stats`` reads it: it must be the container's
    (cgroupfs driver: ``/docker/<id>``), holding the VM's processes, and gone
    after ``rm -f``."""
    cid = docker(*docker_run(docker, "-d", docker.image, "sleep", "1000")).check().out
    try:
        pid = int(docker.inspect(cid, "{{.State.Pid}}"))
        dirs = cgroup_dirs(pid, cid)
        assert dirs, Path(f"/proc/{pid}/cgroup").read_text()
        result = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", cid, timeout=60)
        assert result.code == 0, result.stderr
        assert memory_bytes(result.out) > 0, result.out
    finally:
        docker("rm", "--force", cid).check()
    assert [d for d in dirs if d.exists()] == []


def test_nothing_left(docker: Docker) -> None:
    assert docker("ps", "--all", "--quiet").check().out == ""
    assert_nothing_left(docker.runtime, docker.runtime_root, docker.needles, engine_words=("containerd-shim",))


def test_a_configured_agent_policy_refuses_exec(docker: Docker, runtime: Runtime) -> None:
    """A runtime registered with ``runtimeArgs: ["--config", FILE]`` whose configuration sets the
    no-exec agent policy (Debian's docker 20.10 CLI has no ``--annotation``): ``docker exec`` fails
    with the rule's name."""
    if docker.no_exec_runtime is None:
        pytest.skip("an agent policy is capsa's")
    run = ["run", "--runtime", docker.no_exec_runtime, "--network", "none", "-d", docker.image, "sleep", "600"]
    cid = docker(*run).check().out
    try:
        refused = docker("exec", cid, "echo", "should not run")
        assert refused.code == 126  # docker exec: the command could not be run
        # Docker 20.10 prints "OCI runtime exec failed: ..." on stdout.
        said = refused.stdout + refused.stderr
        assert "should not run" not in said
        assert 'ExecProcess refused by the agent policy (rule "no-exec")' in said, said
        assert "Traceback" not in said
    finally:
        docker("rm", "--force", cid).check()
