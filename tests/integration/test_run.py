"""`capsa run` end to end: a real VM under the host's accelerator (TCG here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import Capsa, kill_leftovers, leftovers, socket_dirs

from capsa.config import load_config

pytestmark = pytest.mark.vm


def guest_kernel_release() -> str:
    """The release string baked into the guest kernel ("Linux version X ...")."""
    data = load_config().hypervisor.kernel.read_bytes()
    match = re.search(rb"Linux version (\S+)", data)
    assert match, "no version string in the guest kernel"
    return match.group(1).decode()


def assert_one_clean_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr


def test_uname_shows_the_guest_kernel(capsa: Capsa) -> None:
    capsa.spec(["uname", "-r"])
    result = capsa.run("uname")
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == guest_kernel_release()
    assert result.stdout.strip() != os.uname().release


def test_cpuinfo_and_meminfo_show_the_vm(capsa: Capsa, tmp_path: Path) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text("[hypervisor]\ndefault_vcpus = 2\ndefault_memory_mib = 768\n")
    capsa.spec(["sh", "-c", "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo"])
    result = capsa("--config", str(config), "run", "--bundle", str(capsa.bundle), "hw")
    assert result.code == 0, result.stderr
    cpus, meminfo = result.stdout.splitlines()
    assert int(cpus) == 2
    mem_kib = int(meminfo.split()[1])
    # The kernel keeps some memory for itself; the rest must be the VM's 768 MiB, not the host's.
    assert 600 * 1024 < mem_kib <= 768 * 1024


@pytest.mark.parametrize(("args", "code"), [(["true"], 0), (["sh", "-c", "exit 7"], 7)])
def test_exit_status_is_the_containers(capsa: Capsa, args: list[str], code: int) -> None:
    capsa.spec(args)
    result = capsa.run("exit")
    assert result.code == code, result.stderr


def test_killed_by_a_signal_is_128_plus_n(capsa: Capsa) -> None:
    # A PID namespace's init ignores signals it has no handler for, except
    # SIGKILL from outside the namespace: `capsa kill` sends it from the agent.
    capsa.spec(["sleep", "1000"])
    with tempfile.TemporaryFile() as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "capsa", "--root", str(capsa.root), "run", "--bundle", str(capsa.bundle), "killed"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
        try:
            deadline = time.monotonic() + 120
            while '"running"' not in capsa("state", "killed").stdout:
                assert runner.poll() is None and time.monotonic() < deadline, "the container never ran"
                time.sleep(0.2)
            assert capsa("kill", "killed", "KILL").code == 0
            assert runner.wait(timeout=60) == 137
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()


def test_stdin_reaches_the_container_and_stderr_is_kept_apart(capsa: Capsa) -> None:
    capsa.spec(["sh", "-c", "cat; echo oops >&2"])
    result = capsa.run("stdin", input="hi\n")
    assert result.code == 0, result.stderr
    assert result.stdout == "hi\n"
    assert result.stderr == "oops\n"


def test_large_output_arrives_whole(capsa: Capsa) -> None:
    capsa.spec(["sh", "-c", "head -c 3000000 /dev/zero | wc -c; head -c 200000 /dev/zero"])
    result = capsa.run("big")
    assert result.code == 0, result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert first.strip() == "3000000"
    assert len(rest) == 200000


def test_pid_file_and_detach(capsa: Capsa, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    capsa.spec(["sh", "-c", "trap 'exit 0' TERM; sleep 60 & wait"])
    result = capsa.run("detached", "-d", "--pid-file", str(pid_file))
    assert result.code == 0, result.stderr
    keeper = int(pid_file.read_text())
    os.kill(keeper, 0)  # alive: the shim stands for the container
    # The ID is taken while it runs.
    again = capsa.run("detached")
    assert again.code != 0
    assert_one_clean_line(again.stderr)
    assert "already exists" in again.stderr
    os.kill(keeper, signal.SIGTERM)  # forwarded to the container, which exits
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(keeper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the container did not stop on SIGTERM")
    # As with runc, a detached container that exited stays until deleted.
    assert '"stopped"' in capsa("state", "detached").stdout
    assert capsa("delete", "detached").code == 0


def test_any_root_and_id_length_runc_takes(capsa: Capsa) -> None:
    """A 200-byte state root and a 250-byte ID (a file name holds 255): the VM's
    sockets do not live under the root, so neither length matters."""
    base = capsa.root.parent / "long"
    root = base / ("d" * (200 - len(str(base)) - 1))
    assert len(os.fsencode(root)) == 200
    long = Capsa(root=root, bundle=capsa.bundle)
    container_id = "x" * 250
    try:
        capsa.spec(["cat"])
        result = long.run(container_id, input="through a 250-byte ID\n")
        assert (result.code, result.stdout, result.stderr) == (0, "through a 250-byte ID\n", "")

        # What an engine does: create, start, exec, kill, delete.
        capsa.spec(["sh", "-c", "trap 'exit 0' TERM; sleep 60 & wait"])
        created = long("create", "--bundle", str(capsa.bundle), container_id)
        assert created.code == 0, created.stderr
        assert long("start", container_id).code == 0
        assert long.status(container_id) == "running"
        execed = long("exec", container_id, "echo", "exec works")
        assert (execed.code, execed.stdout) == (0, "exec works\n"), execed.stderr
        assert long("kill", container_id, "TERM").code == 0
        deadline = time.monotonic() + 60
        while long.status(container_id) != "stopped":
            assert time.monotonic() < deadline, "the container did not stop on SIGTERM"
            time.sleep(0.2)
        deleted = long("delete", container_id)
        assert deleted.code == 0, deleted.stderr
        assert leftovers(root) == []
        assert socket_dirs(root) == set()
    finally:
        long("delete", "--force", container_id)
        kill_leftovers(root)


def _bad_spec(capsa: Capsa, what: str) -> None:
    config = capsa.bundle / "config.json"
    if what == "not-json":
        config.write_text("{ this is not json")
    elif what == "no-process":
        capsa.spec(["true"])
        spec = json.loads(config.read_text())
        del spec["process"]
        config.write_text(json.dumps(spec))
    elif what == "no-such-executable":
        capsa.spec(["nosuch-binary"])
    elif what == "no-such-path":
        capsa.spec(["/bin/nosuch"])


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("not-json", "not valid JSON"),
        ("no-process", "process: missing"),
        ("no-such-executable", "executable file not found"),
        ("no-such-path", "no such file"),
    ],
)
def test_bad_bundles_fail_cleanly(capsa: Capsa, what: str, message: str) -> None:
    _bad_spec(capsa, what)
    result = capsa.run("bad")
    assert result.code != 0
    assert_one_clean_line(result.stderr)
    assert message in result.stderr
    assert leftovers(capsa.root) == []


def test_missing_bundle(capsa: Capsa) -> None:
    result = capsa("run", "--bundle", str(capsa.bundle / "nope"), "x")
    assert result.code != 0
    assert_one_clean_line(result.stderr)
    assert "no such directory" in result.stderr


@pytest.mark.parametrize("bad_id", ["a/b", "..", "../etc", "x/../y"])
def test_bad_ids(capsa: Capsa, bad_id: str) -> None:
    capsa.spec(["true"])
    result = capsa.run(bad_id)
    assert result.code != 0
    assert_one_clean_line(result.stderr)
    assert "invalid container id" in result.stderr


def test_failure_inside_the_guest_leaves_nothing(capsa: Capsa) -> None:
    """The host's pre-check passes (the file exists) but it cannot be executed in the guest."""
    (capsa.bundle / "rootfs" / "bin" / "notexec").write_text("plain text\n")
    capsa.spec(["/bin/notexec"])
    result = capsa.run("guestfail")
    assert result.code != 0
    assert_one_clean_line(result.stderr)
    assert leftovers(capsa.root) == []


@pytest.mark.slow
def test_twenty_runs_leave_nothing_behind(capsa: Capsa) -> None:
    capsa.spec(["true"])
    for n in range(20):
        result = capsa.run(f"loop{n}")
        assert result.code == 0, result.stderr
    assert leftovers(capsa.root) == []
