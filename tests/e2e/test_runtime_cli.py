"""The runtime's own command line, with no engine: many containers at once, and
bad input to every command (runc's kind of one-line error, a non-zero exit,
nothing changed)."""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_support import Result, Runtime, assert_nothing_left, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

CONCURRENT = 10


def make_bundle(runtime: Runtime, bundle: Path, rootfs: Path, args: list[str]) -> Path:
    """A bundle from the runtime's own ``spec``, running ``args`` without a terminal
    in the shared busybox root."""
    bundle.mkdir(parents=True)
    runtime(bundle, "spec", "--bundle", str(bundle), timeout=60).check()
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["root"] = {"path": str(rootfs), "readonly": True}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def status(runtime: Runtime, root: Path, cid: str) -> str:
    return str(json.loads(runtime(root, "state", cid, timeout=60).check().stdout)["status"])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def root(session_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A state root per test, named after it in full: the runtime's sockets do not
    live below it, so its length is no concern of the test's."""
    name: str = request.node.name
    return session_dir / ("cli-" + re.sub(r"[^\w.-]+", "-", name).strip("-"))


def test_ten_concurrent_containers(runtime: Runtime, session_dir: Path, rootfs: Path, root: Path) -> None:
    ids = [f"c{i}" for i in range(CONCURRENT)]
    bundle = make_bundle(runtime, session_dir / "cb", rootfs, ["sleep", "1000"])

    def pidfile(cid: str) -> Path:
        return session_dir / f"{cid}.pid"

    def each(verb: Callable[[str], list[str]]) -> list[Result]:
        """One runtime invocation per container, all at once."""
        with ThreadPoolExecutor(CONCURRENT) as pool:
            return list(pool.map(lambda cid: runtime(root, *verb(cid), timeout=300), ids))

    try:
        created = each(lambda cid: ["create", "--bundle", str(bundle), "--pid-file", str(pidfile(cid)), cid])
        assert [r.code for r in created] == [0] * CONCURRENT, [r.stderr for r in created]
        assert sorted(runtime.listed(root)) == ids
        assert {status(runtime, root, cid) for cid in ids} == {"created"}
        started = each(lambda cid: ["start", cid])
        assert [r.code for r in started] == [0] * CONCURRENT, [r.stderr for r in started]
        assert {status(runtime, root, cid) for cid in ids} == {"running"}
        pids = [int(pidfile(cid).read_text()) for cid in ids]
        assert all(alive(pid) for pid in pids)
        killed = each(lambda cid: ["kill", cid, "KILL"])
        assert [r.code for r in killed] == [0] * CONCURRENT, [r.stderr for r in killed]
        wait_until(lambda: {status(runtime, root, cid) for cid in ids} == {"stopped"}, 120, "all to stop")
        deleted = each(lambda cid: ["delete", cid])
        assert [r.code for r in deleted] == [0] * CONCURRENT, [r.stderr for r in deleted]
        wait_until(lambda: not any(alive(pid) for pid in pids), 30, "every --pid-file process to exit")
    finally:
        for cid in ids:
            runtime(root, "delete", "--force", cid, timeout=120)
    assert_nothing_left(runtime, root, [str(root)])


@pytest.fixture
def running(runtime: Runtime, session_dir: Path, rootfs: Path, root: Path) -> Iterator[str]:
    bundle = make_bundle(runtime, session_dir / "rb", rootfs, ["sleep", "1000"])
    # An ID as Docker and containerd make them (64 hex digits), under a root as long
    # as the test's name makes it: the state directory is longer than a unix socket's path may be.
    cid = secrets.token_hex(32)
    try:
        runtime(root, "create", "--bundle", str(bundle), cid, timeout=300).check()
        runtime(root, "start", cid, timeout=300).check()
        yield cid
    finally:
        runtime(root, "delete", "--force", cid, timeout=120)
        assert_nothing_left(runtime, root, [str(root)])


def one_line_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.code != 0, f"{' '.join(result.argv)} succeeded"
    assert len(lines) == 1, f"{' '.join(result.argv)} printed {len(lines)} lines:\n{result.stderr}"
    return lines[0]


@pytest.mark.parametrize(
    "verb",
    [
        ["state"],
        ["start"],
        ["kill", "{id}", "KILL"],
        ["delete"],
        ["pause"],
        ["resume"],
        ["ps"],
        ["exec", "{id}", "true"],
        ["update", "--memory", "64M"],
    ],
    ids=lambda v: v[0],
)
def test_unknown_container(runtime: Runtime, root: Path, verb: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    argv = [a.format(id="nosuch") for a in verb] if "{id}" in verb else [*verb, "nosuch"]
    before = sorted(os.listdir(root))
    assert "does not exist" in one_line_error(runtime(root, *argv, timeout=60))
    assert sorted(os.listdir(root)) == before


def test_bad_input_to_a_running_container(runtime: Runtime, session_dir: Path, root: Path, running: str) -> None:
    state = json.loads(runtime(root, "state", running, timeout=60).check().stdout)
    bad_process = session_dir / "bad-process.json"
    bad_process.write_text('{"args": ["true"], "cwd": ')
    wrong = [
        ["start", running],
        ["kill", running, "SIGNOSUCH"],
        ["kill", running, "NOSUCH"],
        ["exec", "--process", str(bad_process), running],
        ["exec", "--process", str(session_dir / "no-such-file.json"), running],
        ["create", "--bundle", str(session_dir / "rb"), running],
        ["delete", running],
        ["resume", running],
    ]
    for argv in wrong:
        one_line_error(runtime(root, *argv, timeout=120))
        now = json.loads(runtime(root, "state", running, timeout=60).check().stdout)
        assert (now["status"], now["pid"]) == ("running", state["pid"]), f"{argv} changed the container"
        assert alive(state["pid"])
    assert runtime.listed(root) == [running]


def test_create_refuses_bad_bundles(runtime: Runtime, session_dir: Path, rootfs: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    empty = session_dir / "empty-bundle"
    empty.mkdir()
    good = make_bundle(runtime, session_dir / "gb", rootfs, ["true"])
    for argv in (
        ["create", "--bundle", str(empty), "nobundle"],
        ["create", "--bundle", str(session_dir / "missing"), "missing"],
        ["create", "--bundle", str(good), "../escape"],
    ):
        one_line_error(runtime(root, *argv, timeout=120))
        assert runtime.listed(root) == []
    assert_nothing_left(runtime, root, [str(root)])


def test_errors_in_json_log_as_containerd_reads_them(runtime: Runtime, session_dir: Path, root: Path) -> None:
    """containerd's runc shim passes ``--log FILE --log-format json`` and takes the
    error text from the last ``"level":"error"`` line of FILE; it classifies kill
    failures by the words ``does not exist``."""
    root.mkdir(parents=True, exist_ok=True)
    log = session_dir / "runtime-log.json"
    result = runtime(root, "--log", str(log), "--log-format", "json", "kill", "nosuch", "9", timeout=60)
    assert result.code != 0
    errors = [json.loads(line) for line in log.read_text().splitlines() if '"error"' in line]
    assert errors, f"no error line in {log.read_text()!r}"
    assert errors[-1]["level"] == "error"
    assert "does not exist" in errors[-1]["msg"]
    plain = runtime(root, "--log-format", "json", "state", "nosuch", timeout=60)
    assert "does not exist" in json.loads(one_line_error(plain))["msg"]


def pipe_holders(inode: str) -> list[str]:
    """Processes holding pipe ``inode`` open, to name who keeps an EOF from coming."""
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"pipe:[{inode}]" for fd in fds):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                holders.append(f"{pid}: {cmdline[:160].decode(errors='replace')}")
        except OSError:
            continue
    return holders


def test_create_with_console_socket_lets_go_of_its_stdio(
    runtime: Runtime, session_dir: Path, rootfs: Path, root: Path
) -> None:
    """As containerd's runc shim (go-runc) calls ``create --console-socket`` for a
    terminal: stdout and stderr are a pipe it reads to EOF *before* it takes the
    console's master. Whatever create leaves running must not hold that pipe,
    or ``docker run -t`` never starts."""
    bundle = make_bundle(runtime, session_dir / "tb", rootfs, ["sh", "-c", "tty; exec sleep 1000"])
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = True
    (bundle / "config.json").write_text(json.dumps(config))
    sock_path = session_dir / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    cid = "tty1"
    argv = [str(runtime.wrapper), "--root", str(root), "create", "--bundle", str(bundle)]
    proc = subprocess.Popen(
        [*argv, "--console-socket", str(sock_path), cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    master = -1
    try:
        inode = os.readlink(f"/proc/{proc.pid}/fd/1").split("[")[1].rstrip("]") if proc.poll() is None else "?"
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            state = "still running" if proc.poll() is None else f"exited {proc.returncode}"
            raise AssertionError(f"create ({state}) left its stdout open, held by {pipe_holders(inode)}") from None
        assert proc.returncode == 0, output.decode(errors="replace")
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            _, ancillary, _, _ = conn.recvmsg(256, socket.CMSG_SPACE(4))
        master = struct.unpack("i", ancillary[0][2][:4])[0]
        runtime(root, "start", cid, timeout=120).check()
        seen = b""
        deadline = time.monotonic() + 60
        while b"/dev/pts/0" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert b"/dev/pts/0" in seen, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if master >= 0:
            os.close(master)
        listener.close()
        runtime(root, "delete", "--force", cid, timeout=120)
    assert_nothing_left(runtime, root, [str(root)])
