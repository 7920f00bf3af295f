"""The runc lifecycle through the capsa CLI, as an engine drives it: create, start,
state, exec, kill, pause, resume, ps, delete, and run, each a separate command.

The test process is a child subreaper (``PR_SET_CHILD_SUBREAPER``), as conmon
and containerd's runc shim are: when ``capsa create`` or ``capsa exec`` exits,
the shim whose PID went to ``--pid-file`` becomes our child, and its exit
status (``waitpid``) is the container's, which is how an engine learns it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import termios
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import pytest
from harness import (
    Capsa,
    ConsoleSocket,
    cmdline,
    is_running,
    leftovers,
    read_until,
    subreaper,
    vm_processes,
    wait_child,
)

pytestmark = pytest.mark.vm

EXIT_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def adopt_orphans() -> Iterator[None]:
    with subreaper():
        yield


def assert_one_clean_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr


def eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def create(
    capsa: Capsa,
    cid: str,
    *flags: str,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> int:
    """`capsa create --pid-file`, as conmon calls it; the shim's PID (now our child)."""
    pid_file = capsa.root.parent / f"{cid}.pid"
    errors = capsa.root.parent / f"{cid}.create-err"
    with open(errors, "wb") as own_stderr:
        proc = capsa.popen(
            "create",
            "--bundle",
            str(capsa.bundle),
            "--pid-file",
            str(pid_file),
            *flags,
            cid,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr if stderr is not None else own_stderr,
        )
        code = proc.wait(timeout=180)
    assert code == 0, errors.read_text() if stderr is None else "create failed (see the container's stderr file)"
    return int(pid_file.read_text())


def start(capsa: Capsa, cid: str) -> None:
    result = capsa("start", cid)
    assert result.code == 0, result.stderr
    assert result.stdout == ""


def delete(capsa: Capsa, cid: str, *flags: str) -> None:
    result = capsa("delete", *flags, cid)
    assert result.code == 0, result.stderr
    assert not (capsa.root / cid).exists()
    gone = capsa("state", cid)
    assert gone.code != 0
    assert "does not exist" in gone.stderr


def file_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in file_text(path):
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in {path.name} within {timeout:.0f} s; it has {file_text(path)[-300:]!r}")
        time.sleep(0.1)


def test_create_start_wait_delete(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sh", "-c", "echo out-$((40+2)); echo err-$((50+3)) >&2; read line; echo got-$line; exit 3"])
    out, err = tmp_path / "out", tmp_path / "err"
    stdin_read, stdin_write = os.pipe()
    with open(out, "wb") as o, open(err, "wb") as e:
        shim = create(capsa, "life", stdin=stdin_read, stdout=o, stderr=e)
    os.close(stdin_read)

    # created: the PID is a live host process (the shim), the process has not run yet.
    assert is_running(shim)
    assert "capsa.shim" in cmdline(shim) or "capsa-shim" in cmdline(shim)
    state = capsa.state("life")
    assert state["status"] == "created"
    assert state["pid"] == shim
    assert state["id"] == "life"
    assert state["bundle"] == str(capsa.bundle)
    host = vm_processes(capsa, "life")
    for name, pid in host.items():
        assert is_running(pid), f"{name} ({pid}) is not running"
    assert "qemu" in cmdline(host["qemu"])
    assert "virtiofsd" in cmdline(host["virtiofsd"])
    time.sleep(2)
    assert file_text(out) == "", "the container ran before start"

    start(capsa, "life")
    wait_for_text(out, "out-42\n")
    assert capsa.status("life") == "running"
    os.write(stdin_write, b"hello\n")
    os.close(stdin_write)

    assert wait_child(shim, EXIT_TIMEOUT) == 3
    assert out.read_text() == "out-42\ngot-hello\n"
    assert err.read_text() == "err-53\n"
    state = capsa.state("life")
    assert state["status"] == "stopped"
    assert state["pid"] == 0

    delete(capsa, "life")
    eventually(lambda: not any(is_running(pid) for pid in host.values()), "the VM's processes to go", 15)
    assert leftovers(capsa.root) == []


def test_exec_in_a_created_container(capsa: Capsa, tmp_path: Path) -> None:
    """runc lets a process into a container that is created but not started; it stays created."""
    capsa.spec(["sh", "-c", "echo started; sleep 600"])
    out = tmp_path / "out"
    with open(out, "wb") as o:
        shim = create(capsa, "ec", stdout=o)
    result = capsa("exec", "ec", "sh", "-c", "echo in-created; cat /proc/1/cmdline | tr '\\0' ' '")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("in-created\n")
    assert "crun" in result.stdout  # PID 1 is still crun's init, waiting to be started
    assert capsa.status("ec") == "created"
    assert file_text(out) == ""
    start(capsa, "ec")
    wait_for_text(out, "started\n")
    delete(capsa, "ec", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137


def test_exec_foreground_detached_and_from_a_process_file(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sleep", "600"])
    shim = create(capsa, "ex")
    start(capsa, "ex")

    foreground = capsa("exec", "ex", "sh", "-c", "read x; echo in-$x; echo oops >&2; exit 5", input="abc\n")
    assert foreground.code == 5, foreground.stderr
    assert foreground.stdout == "in-abc\n"
    assert foreground.stderr == "oops\n"

    pid_file = tmp_path / "exec.pid"
    detached = capsa("exec", "--detach", "--pid-file", str(pid_file), "ex", "sh", "-c", "sleep 2; exit 6")
    assert detached.code == 0, detached.stderr
    exec_shim = int(pid_file.read_text())
    assert exec_shim != shim
    assert is_running(exec_shim)
    assert wait_child(exec_shim, EXIT_TIMEOUT) == 6

    process = {
        "args": ["sh", "-c", "echo $GREETING; pwd; id -u; id -g"],
        "env": ["PATH=/bin", "GREETING=from-a-file"],
        "cwd": "/tmp",
        "user": {"uid": 1000, "gid": 1001},
        "terminal": False,
    }
    process_file = tmp_path / "process.json"
    process_file.write_text(json.dumps(process))
    from_file = capsa("exec", "--process", str(process_file), "ex")
    assert from_file.code == 0, from_file.stderr
    assert from_file.stdout.splitlines() == ["from-a-file", "/tmp", "1000", "1001"]

    flags = capsa(
        "exec",
        "--cwd",
        "/tmp",
        "--env",
        "COLOUR=teal",
        "--user",
        "1000:1002",
        "ex",
        "sh",
        "-c",
        "pwd; echo $COLOUR; id -u; id -g",
    )
    assert flags.code == 0, flags.stderr
    assert flags.stdout.splitlines() == ["/tmp", "teal", "1000", "1002"]

    # The container's own process was never disturbed.
    assert capsa.status("ex") == "running"
    delete(capsa, "ex", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137


def type_and_expect(master: int, line: str, marker: str, timeout: float = 60) -> str:
    os.write(master, line.encode() + b"\n")
    return read_until(master, marker.encode(), timeout).decode(errors="replace")


def resize_and_check(master: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on the master (what an engine does), then `stty size` in the guest until it agrees."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    deadline = time.monotonic() + 60
    while True:
        try:
            type_and_expect(master, "stty size", f"{rows} {cols}", timeout=3)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def test_exec_with_a_terminal_over_the_console_socket(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sleep", "600"])
    create(capsa, "tty")
    start(capsa, "tty")
    console = ConsoleSocket(tmp_path / "console.sock")
    pid_file = tmp_path / "exec.pid"
    try:
        result = capsa(
            "exec", "--tty", "--console-socket", str(console.path), "--detach", "--pid-file", str(pid_file), "tty", "sh"
        )
        assert result.code == 0, result.stderr
        name, master = console.receive()
    finally:
        console.close()
    try:
        assert name == "/dev/ptmx"
        exec_shim = int(pid_file.read_text())
        # One read up to the last marker: bytes past a marker are not kept for the next read.
        assert "tty-30003" in type_and_expect(master, "echo tty-$((30000+3)); tty", "/dev/pts/")
        resize_and_check(master, 33, 111)
        resize_and_check(master, 50, 200)
        os.write(master, b"exit 4\n")
        assert wait_child(exec_shim, EXIT_TIMEOUT) == 4
    finally:
        os.close(master)
    delete(capsa, "tty", "--force")


def test_terminal_container_through_create_console_socket(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sh"], terminal=True)
    console = ConsoleSocket(tmp_path / "console.sock")
    try:
        shim = create(capsa, "term", "--console-socket", str(console.path))
        _, master = console.receive()
    finally:
        console.close()
    try:
        start(capsa, "term")
        type_and_expect(master, "echo con-$((20000+1))", "con-20001")
        resize_and_check(master, 40, 132)
        os.write(master, b"exit 2\n")
        assert wait_child(shim, EXIT_TIMEOUT) == 2
    finally:
        os.close(master)
    assert capsa.status("term") == "stopped"
    delete(capsa, "term")


def test_kill_by_name_and_number(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(
        [
            "sh",
            "-c",
            "trap 'echo got-usr1' USR1; trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.2; done",
        ]
    )
    out = tmp_path / "out"
    with open(out, "wb") as o:
        shim = create(capsa, "kl", stdout=o)
    start(capsa, "kl")
    wait_for_text(out, "ready\n")
    for n, signal_name in enumerate(["USR1", "SIGUSR1", "sigusr1", str(int(signal.SIGUSR1))], start=1):
        result = capsa("kill", "kl", signal_name)
        assert result.code == 0, result.stderr
        eventually(lambda n=n: file_text(out).count("got-usr1") == n, f"USR1 number {n} ({signal_name})")
    assert capsa.status("kl") == "running"
    result = capsa("kill", "kl", "15")
    assert result.code == 0, result.stderr
    assert wait_child(shim, EXIT_TIMEOUT) == 5
    assert file_text(out).endswith("got-term\n")
    assert capsa.status("kl") == "stopped"
    delete(capsa, "kl")


def test_kill_all_and_ps(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sh", "-c", "sleep 600 & sleep 600 & echo ready; wait"])
    out = tmp_path / "out"
    with open(out, "wb") as o:
        shim = create(capsa, "ka", stdout=o)
    start(capsa, "ka")
    wait_for_text(out, "ready\n")
    ps = capsa("ps", "--format", "json", "ka")
    assert ps.code == 0, ps.stderr
    pids = json.loads(ps.stdout)
    assert isinstance(pids, list)
    assert all(isinstance(p, int) for p in pids)
    assert len(pids) == 3  # sh and its two sleeps, as the guest numbers them
    table = capsa("ps", "ka")
    assert table.code == 0, table.stderr
    assert table.stdout.split()[0] == "PID"
    assert sorted(int(p) for p in table.stdout.split()[1:]) == sorted(pids)
    # `events --stats`: one line of runc's JSON, from the container's cgroup in the guest.
    stats = capsa("events", "--stats", "ka")
    assert stats.code == 0, stats.stderr
    assert stats.stdout.endswith("}\n") and stats.stdout.count("\n") == 1, stats.stdout
    event = json.loads(stats.stdout)
    assert (event["type"], event["id"]) == ("stats", "ka")
    assert event["data"]["pids"]["current"] == 3
    assert event["data"]["memory"]["usage"]["usage"] > 0
    assert event["data"]["cpu"]["usage"]["total"] > 0
    # The stream: one event per interval, each on its own line, until the container stops.
    stream_path = tmp_path / "events"
    with open(stream_path, "wb") as stream_out:
        stream = capsa.popen("events", "--interval", "200ms", "ka", stdout=stream_out)
    try:
        eventually(lambda: file_text(stream_path).count("\n") >= 3, "three stats events", 30)
    finally:
        stream.terminate()
        stream.wait(10)
    lines = file_text(stream_path).splitlines()[:3]
    assert [json.loads(line)["type"] for line in lines] == ["stats"] * 3

    result = capsa("kill", "--all", "ka", "KILL")
    assert result.code == 0, result.stderr
    assert wait_child(shim, EXIT_TIMEOUT) == 137
    assert capsa.status("ka") == "stopped"
    delete(capsa, "ka")


def test_pause_stops_the_clock_and_resume_restarts_it(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done"])
    out = tmp_path / "out"
    with open(out, "wb") as o:
        shim = create(capsa, "pz", stdout=o)
    start(capsa, "pz")
    wait_for_text(out, "\n5\n")

    result = capsa("pause", "pz")
    assert result.code == 0, result.stderr
    assert capsa.status("pz") == "paused"
    # What was written before the freeze may still be on its way: wait until
    # nothing arrives for a second (a running counter prints ten lines a second).
    before = file_text(out)
    for _ in range(15):
        time.sleep(1)
        before, previous = file_text(out), before
        if before == previous:
            break
    time.sleep(3)
    assert file_text(out) == before, "the counter advanced while paused"
    assert is_running(shim)

    result = capsa("resume", "pz")
    assert result.code == 0, result.stderr
    assert capsa.status("pz") == "running"
    last = int(before.split()[-1])
    wait_for_text(out, f"\n{last + 5}\n")

    # `podman rm -f` of a paused container: delete --force kills it as it is.
    assert capsa("pause", "pz").code == 0
    delete(capsa, "pz", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137


def test_run_detached_then_delete_force(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sleep", "600"])
    pid_file = tmp_path / "run.pid"
    result = capsa.run("rd", "--detach", "--pid-file", str(pid_file))
    assert result.code == 0, result.stderr
    shim = int(pid_file.read_text())
    assert is_running(shim)
    state = capsa.state("rd")
    assert state["status"] == "running"
    assert state["pid"] == shim
    refused = capsa("delete", "rd")
    assert refused.code != 0
    assert_one_clean_line(refused.stderr)
    delete(capsa, "rd", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137
    assert leftovers(capsa.root) == []


def test_run_in_the_foreground_passes_sigterm_to_the_container(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sh", "-c", "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.2; done"])
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = capsa.popen("run", "--bundle", str(capsa.bundle), "rf", stdout=o, stderr=e)
    try:
        wait_for_text(out, "ready\n", timeout=180)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_TIMEOUT) == 9, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.read_text() == "ready\ngot-term\n"
    assert err.read_text() == ""
    # run deletes the container when it exits.
    assert capsa("state", "rf").code != 0
    eventually(lambda: leftovers(capsa.root) == [], "nothing left after run", 15)


def test_a_signal_while_run_creates_is_held_for_the_container(capsa: Capsa, tmp_path: Path) -> None:
    """A SIGTERM that comes while the VM boots must not end `run` (leaving the VM behind): as runc's,
    run holds it and passes it on once the container runs.  Here the container's init has no handler,
    so (PID 1 of its namespace) it ignores it, as under runc, and finishes normally."""
    capsa.spec(["sh", "-c", "sleep 1; echo done"])
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = capsa.popen("run", "--bundle", str(capsa.bundle), "early", stdout=o, stderr=e)
    try:
        time.sleep(0.5)  # Python is up and its handler in place; the VM is far from booted
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_TIMEOUT) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out.read_text(), err.read_text()) == ("done\n", "")
    assert capsa("state", "early").code != 0
    eventually(lambda: leftovers(capsa.root) == [], "nothing left after run", 15)


def test_a_signal_while_exec_starts_reaches_its_process(capsa: Capsa, tmp_path: Path) -> None:
    """The same for `exec`: a SIGTERM before the process runs is delivered once it does (it is no
    init, so it dies of it, or of its trap if that was set first)."""
    capsa.spec(["sleep", "600"])
    shim = create(capsa, "xe")
    start(capsa, "xe")
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = capsa.popen("exec", "xe", "sh", "-c", "trap 'exit 9' TERM; sleep 30", stdout=o, stderr=e)
    try:
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_TIMEOUT) in (9, 143), err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err.read_text() == ""
    assert capsa.status("xe") == "running"
    delete(capsa, "xe", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137


def test_exec_in_the_foreground_passes_sigterm_to_its_process(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sleep", "600"])
    shim = create(capsa, "xf")
    start(capsa, "xf")
    out = tmp_path / "out"
    script = "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.2; done"
    with open(out, "wb") as o:
        proc = capsa.popen("exec", "xf", "sh", "-c", script, stdout=o)
    try:
        wait_for_text(out, "ready\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_TIMEOUT) == 9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.read_text() == "ready\ngot-term\n"
    # Only the exec's process got it.
    assert capsa.status("xf") == "running"
    delete(capsa, "xf", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137


def test_killing_qemu_stops_the_container(capsa: Capsa) -> None:
    capsa.spec(["sleep", "600"])
    shim = create(capsa, "qk")
    start(capsa, "qk")
    host = vm_processes(capsa, "qk")
    assert "qemu" in cmdline(host["qemu"])

    os.kill(host["qemu"], signal.SIGKILL)
    # The process's fate is unknown with its VM gone: the shim says so with 255 (capsa/shim/main.py).
    assert wait_child(shim, EXIT_TIMEOUT) == 255
    state = capsa.state("qk")
    assert state["status"] == "stopped"
    assert state["pid"] == 0
    delete(capsa, "qk")
    eventually(lambda: not any(is_running(pid) for pid in host.values()), "the VM's processes to go", 15)
    assert leftovers(capsa.root) == []


@pytest.mark.slow
def test_ten_containers_created_and_started_concurrently(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["sh", "-c", "echo up; sleep 600"])
    ids = [f"many{n}" for n in range(10)]
    outs = {cid: tmp_path / f"{cid}.out" for cid in ids}

    def create_and_start(cid: str) -> int:
        with open(outs[cid], "wb") as o:
            shim = create(capsa, cid, stdout=o)
        start(capsa, cid)
        return shim

    with ThreadPoolExecutor(len(ids)) as pool:
        shims = dict(zip(ids, pool.map(create_and_start, ids), strict=True))
    for cid in ids:
        wait_for_text(outs[cid], "up\n")
    listed = capsa("list", "--format", "json")
    assert listed.code == 0, listed.stderr
    statuses = {entry["id"]: entry["status"] for entry in json.loads(listed.stdout)}
    assert statuses == dict.fromkeys(ids, "running")
    assert len(set(shims.values())) == len(ids)

    def force_delete(cid: str) -> None:
        delete(capsa, cid, "--force")

    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(force_delete, ids))
    for cid in ids:
        assert wait_child(shims[cid], EXIT_TIMEOUT) == 137
    listed = capsa("list", "--format", "json")
    assert listed.stdout == "null\n"  # runc prints its empty list as Go's nil slice
    eventually(lambda: leftovers(capsa.root) == [], "nothing left", 30)


def test_concurrent_starts_of_one_container_start_it_once(capsa: Capsa, tmp_path: Path) -> None:
    """The container's lock serialises commands: one start wins, the others see it running."""
    capsa.spec(["sh", "-c", "echo started; sleep 600"])
    out = tmp_path / "out"
    with open(out, "wb") as o:
        shim = create(capsa, "once", stdout=o)
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: capsa("start", "once"), range(5)))
    assert sorted(r.code for r in results) == [0, 1, 1, 1, 1], results
    for refused in (r for r in results if r.code != 0):
        assert_one_clean_line(refused.stderr)
        assert "already running" in refused.stderr
    wait_for_text(out, "started\n")
    time.sleep(1)
    assert out.read_text() == "started\n"
    delete(capsa, "once", "--force")
    assert wait_child(shim, EXIT_TIMEOUT) == 137


HOOK = """#!/bin/sh
cat > "$HOOK_DIR/$1.json"
echo "$1" >> "$HOOK_DIR/order"
"""


def hook(script: Path, stage: str, hook_dir: Path) -> dict[str, Any]:
    return {"path": str(script), "args": [str(script), stage], "env": ["PATH=/usr/bin:/bin", f"HOOK_DIR={hook_dir}"]}


def test_hooks_run_in_order_with_the_state_on_stdin(capsa: Capsa, tmp_path: Path) -> None:
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    script = tmp_path / "hook.sh"
    script.write_text(HOOK)
    script.chmod(0o755)
    capsa.spec(["sh", "-c", "read x; echo $x"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    stages = ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"]
    spec["hooks"] = {stage: [hook(script, stage, hook_dir)] for stage in stages}
    (capsa.bundle / "config.json").write_text(json.dumps(spec))

    def order() -> list[str]:
        return file_text(hook_dir / "order").split()

    def hook_state(stage: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((hook_dir / f"{stage}.json").read_text())
        return state

    stdin_read, stdin_write = os.pipe()
    shim = create(capsa, "hk", stdin=stdin_read)
    os.close(stdin_read)
    assert order() == stages[:3]
    start(capsa, "hk")
    assert order() == stages[:5]
    os.close(stdin_write)
    assert wait_child(shim, EXIT_TIMEOUT) == 0
    delete(capsa, "hk")
    assert order() == stages

    # runtime.md "Lifecycle" and runc: creating during create, created before
    # the process starts, running after, stopped at the end.
    expected = {
        "prestart": "creating",
        "createRuntime": "creating",
        "createContainer": "creating",
        "startContainer": "created",
        "poststart": "running",
        "poststop": "stopped",
    }
    for stage, status in expected.items():
        state = hook_state(stage)
        assert state["id"] == "hk", stage
        assert state["bundle"] == str(capsa.bundle), stage
        assert state["status"] == status, stage
        if status != "stopped":
            assert state["pid"] == shim, stage


def test_failing_create_runtime_hook_fails_create_and_leaves_nothing(capsa: Capsa, tmp_path: Path) -> None:
    script = tmp_path / "refuse.sh"
    script.write_text("#!/bin/sh\necho 'no network for you' >&2\nexit 3\n")
    script.chmod(0o755)
    capsa.spec(["sleep", "600"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    spec["hooks"] = {"createRuntime": [{"path": str(script)}]}
    (capsa.bundle / "config.json").write_text(json.dumps(spec))

    result = capsa("create", "--bundle", str(capsa.bundle), "hf")
    assert result.code != 0
    assert_one_clean_line(result.stderr)
    assert "createRuntime" in result.stderr
    assert "no network for you" in result.stderr
    assert not (capsa.root / "hf").exists()
    assert capsa("state", "hf").code != 0
    eventually(lambda: leftovers(capsa.root) == [], "nothing left after a failed create", 15)


def test_podman_like_single_file_binds(capsa: Capsa, tmp_path: Path) -> None:
    """Podman binds /etc/hosts, /etc/resolv.conf and /etc/hostname from its userdata directory."""
    userdata = tmp_path / "userdata"
    userdata.mkdir()
    (userdata / "hosts").write_text("127.0.0.1 localhost\n10.88.0.5 boxed\n")
    (userdata / "resolv.conf").write_text("nameserver 10.88.0.1\n")
    (userdata / "hostname").write_text("boxed\n")
    capsa.spec(["sh", "-c", "cat /etc/hosts /etc/resolv.conf /etc/hostname; hostname"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    spec["hostname"] = "boxed"
    spec["root"]["readonly"] = False
    for name in ("hosts", "resolv.conf", "hostname"):
        spec["mounts"].append(
            {
                "destination": f"/etc/{name}",
                "type": "bind",
                "source": str(userdata / name),
                "options": ["bind", "rprivate"],
            }
        )
    (capsa.bundle / "config.json").write_text(json.dumps(spec))

    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        shim = create(capsa, "pb", stdout=o, stderr=e)
    start(capsa, "pb")
    assert wait_child(shim, EXIT_TIMEOUT) == 0, err.read_text()
    assert out.read_text().splitlines() == [
        "127.0.0.1 localhost",
        "10.88.0.5 boxed",
        "nameserver 10.88.0.1",
        "boxed",
        "boxed",
    ]
    delete(capsa, "pb")
    # The binds lived in the proxy's mount namespace only: the host's files are untouched.
    assert (userdata / "hosts").read_text() == "127.0.0.1 localhost\n10.88.0.5 boxed\n"
    assert leftovers(capsa.root) == []
