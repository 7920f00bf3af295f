"""Podman 4.3 (through conmon) driving the runtime under test, as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_cgroups import cgroup_dirs, memory_bytes
from e2e_confinement import assert_qemus_confined
from e2e_engines import Podman
from e2e_support import (
    Runtime,
    assert_nothing_left,
    expected_kernel_release,
    policy_annotation,
    run_in_pty,
    vm_process,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

NET = ("--network", "none")
TICKER = 'trap "echo got-usr1" USR1; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done'


def ticks(podman: Podman, cid: str) -> int:
    return podman("logs", cid, timeout=60).check().stdout.count("tick ")


def test_run_prints_guest_kernel_with_loopback_only(podman: Podman, runtime: Runtime) -> None:
    result = podman(
        "run", "--rm", *NET, podman.image, "sh", "-c", "uname -r; tail -n +3 /proc/net/dev | cut -d: -f1"
    ).check()
    lines = result.stdout.split()
    assert lines[0] == expected_kernel_release(runtime)
    assert lines[1:] == ["lo"]


@pytest.mark.parametrize("code", [0, 7])
def test_exit_code(podman: Podman, code: int) -> None:
    assert podman("run", "--rm", *NET, podman.image, "sh", "-c", f"exit {code}").code == code


def test_missing_command(podman: Podman) -> None:
    """The runtime's error reaches the user through conmon's JSON log, and Podman
    maps "not found" to 127 (``podman run`` exit status convention)."""
    result = podman("run", "--rm", *NET, podman.image, "/no/such/command")
    assert result.code == 127, result.stderr
    assert "/no/such/command" in result.stderr


def test_stdin(podman: Podman) -> None:
    text = "".join(f"line {i}\n" for i in range(20000))  # ~200 KB: more than any pipe buffer
    result = podman("run", "--rm", "-i", *NET, podman.image, "sh", "-c", "cat; echo done", input=text).check()
    assert result.stdout == text + "done\n"


def test_tty(podman: Podman) -> None:
    try:
        result = run_in_pty(
            podman.argv("run", "--rm", "-t", "--name", "e2e-t", *NET, podman.image, "sh", "-c", "tty; stty size"),
            rows=33,
            cols=101,
            env=podman.env,
            timeout=90,
        )
    finally:
        with contextlib.suppress(AssertionError):  # keep the test's own failure, if any
            podman("rm", "--force", "--time", "0", "--ignore", "e2e-t", timeout=60)
    assert result.code == 0, result.output
    assert "/dev/pts/0" in result.output
    assert "33 101" in result.output


def test_stop_sends_term_then_kill(podman: Podman) -> None:
    handles = podman("run", "-d", *NET, podman.image, "sh", "-c", 'trap "exit 42" TERM; while :; do sleep 1; done')
    ignores = podman("run", "-d", *NET, podman.image, "sh", "-c", 'trap "" TERM; while :; do sleep 1; done')
    handles_id, ignores_id = handles.check().out, ignores.check().out
    try:
        podman("stop", "--time", "10", handles_id).check()
        assert podman.inspect(handles_id, "{{.State.ExitCode}}") == "42"
        began = time.monotonic()
        podman("stop", "--time", "2", ignores_id).check()
        assert time.monotonic() - began >= 2
        assert podman.inspect(ignores_id, "{{.State.ExitCode}}") == "137"
    finally:
        podman("rm", "--force", "--time", "0", handles_id, ignores_id)


@pytest.fixture(scope="class")
def ticker(podman: Podman) -> Iterator[str]:
    """A detached container that prints a tick five times a second, removed
    when the class that uses it is done."""
    cid = podman("run", "-d", *NET, podman.image, "sh", "-c", TICKER).check().out
    try:
        wait_until(lambda: ticks(podman, cid) > 0, 60, "the container's first output")
        yield cid
    finally:
        podman("rm", "--force", "--time", "0", cid)


class TestRunning:
    """One detached container, shared by the checks that need it running."""

    def test_its_qemu_is_confined(self, podman: Podman, ticker: str, runtime: Runtime) -> None:
        if not runtime.capsa:
            pytest.skip("runc starts no QEMU")
        assert_qemus_confined(runtime.session)

    def test_exec(self, podman: Podman, ticker: str) -> None:
        assert podman("exec", ticker, "echo", "from exec").check().out == "from exec"
        assert podman("exec", "-i", ticker, "cat", input="piped\n").check().stdout == "piped\n"
        assert podman("exec", ticker, "sh", "-c", "exit 5").code == 5

    def test_exec_tty(self, podman: Podman, ticker: str) -> None:
        result = run_in_pty(
            podman.argv("exec", "-t", ticker, "sh", "-c", "tty; stty size"), rows=21, cols=77, env=podman.env
        )
        assert result.code == 0, result.output
        assert "/dev/pts/" in result.output and "21 77" in result.output

    def test_kill_signal(self, podman: Podman, ticker: str) -> None:
        podman("kill", "--signal", "USR1", ticker).check()
        wait_until(lambda: "got-usr1" in podman("logs", ticker).stdout, 30, "the USR1 trap's output")
        assert podman.inspect(ticker, "{{.State.Status}}") == "running"

    def test_pause_unpause(self, podman: Podman, ticker: str) -> None:
        podman("pause", ticker).check()
        try:
            assert podman.inspect(ticker, "{{.State.Status}}") == "paused"
            time.sleep(1)  # output already on its way may still land
            frozen = ticks(podman, ticker)
            time.sleep(2)
            assert ticks(podman, ticker) == frozen, "the container kept running while paused"
        finally:
            podman("unpause", ticker).check()
        assert podman.inspect(ticker, "{{.State.Status}}") == "running"
        wait_until(lambda: ticks(podman, ticker) > frozen, 30, "output after unpause")


def test_rm_force(podman: Podman, runtime: Runtime) -> None:
    # sleep as PID 1 ignores SIGTERM: rm -f ends it with SIGKILL after the stop timeout.
    cid = podman("run", "-d", "--stop-timeout", "2", *NET, podman.image, "sleep", "1000").check().out
    podman("rm", "--force", cid).check()
    assert podman("ps", "--all", "--quiet", "--no-trunc").check().stdout.split() == []
    assert cid not in runtime.listed(podman.runtime_root)


def test_killed_vm(podman: Podman, runtime: Runtime) -> None:
    """kill -9 of the VM (under runc: of the container's init): Podman sees the
    container exit non-zero, and rm cleans up."""
    cid = podman("run", "-d", *NET, podman.image, "sleep", "1000").check().out
    try:
        pid = int(podman.inspect(cid, "{{.State.Pid}}"))
        os.kill(vm_process(runtime, runtime.session, cid, pid), signal.SIGKILL)
        code = podman("wait", cid, timeout=60).check().out
        assert int(code) != 0
        assert podman.inspect(cid, "{{.State.Status}}") in ("exited", "stopped")
    finally:
        podman("rm", "--force", "--time", "0", cid).check()
    assert cid not in runtime.listed(podman.runtime_root)


def test_stats_from_the_host_cgroup(podman: Podman) -> None:
    """``podman stats`` loads the cgroup its container's PID is in (cgroupfs:
    ``/libpod_parent/libpod-<id>``): under capsa the shim, QEMU, virtiofsd and
    the proxy are there, so it works and counts the VM's memory; after
    ``rm -f`` no directory of it is left in any hierarchy."""
    cid = podman("run", "-d", *NET, podman.image, "sleep", "1000").check().out
    try:
        result = podman("stats", "--no-stream", "--format", "{{.MemUsage}}", cid, timeout=60)
        assert result.code == 0, result.stderr
        assert memory_bytes(result.out) > 0, result.out
        pid = int(podman.inspect(cid, "{{.State.Pid}}"))
        dirs = cgroup_dirs(pid, cid)
        assert dirs, Path(f"/proc/{pid}/cgroup").read_text()
    finally:
        podman("rm", "--force", "--time", "0", cid).check()
    assert [d for d in dirs if d.exists()] == []


def test_nothing_left(podman: Podman, runtime: Runtime) -> None:
    assert podman("ps", "--all", "--quiet").check().out == ""
    assert_nothing_left(runtime, podman.runtime_root, podman.needles, engine_words=("conmon",))


def test_an_annotated_agent_policy_refuses_exec(podman: Podman, runtime: Runtime) -> None:
    """``--annotation io.capsa.agent.policy=...`` (no-exec): ``podman exec`` fails with the rule's name."""
    if not runtime.capsa:
        pytest.skip("an agent policy is capsa's")
    name = "e2e-policy"
    podman(
        "run", "-d", "--name", name, "--annotation", policy_annotation("no-exec"), *NET, podman.image, "sleep", "600"
    ).check()
    try:
        refused = podman("exec", name, "echo", "should not run")
        assert refused.code != 0
        assert "should not run" not in refused.stdout
        assert 'ExecProcess refused by the agent policy (rule "no-exec")' in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        podman("rm", "--force", "--time", "0", name)


def test_privileged_is_privileged_in_the_vm(podman: Podman, runtime: Runtime) -> None:
    """``podman run --privileged`` lists every host device in the spec. Under capsa the container
    is privileged in the guest (it can mount) and gets the guest's devices: the host's root disk
    is neither in its /dev nor among the guest kernel's block devices."""
    device = os.stat("/").st_dev
    uevent = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/uevent").read_text()
    disk = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)["DEVNAME"]
    script = "mkdir -p /tmp/m && mount -t tmpfs t /tmp/m && echo mounted; uname -r; ls /dev; echo blocks; ls /sys/block"
    result = podman("run", "--rm", "--privileged", *NET, podman.image, "sh", "-c", script).check()
    lines = result.stdout.split()
    assert lines[0] == "mounted"
    assert lines[1] == expected_kernel_release(runtime)
    devices, blocks = lines[2 : lines.index("blocks")], lines[lines.index("blocks") + 1 :]
    if runtime.capsa:
        assert disk not in devices and disk not in blocks, result.stdout
    else:
        assert disk in devices
