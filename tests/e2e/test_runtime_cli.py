"""The runtime's own command line, with no engine: many containers at once, and
bad input to every command (runc's kind of one-line error, a non-zero exit,
nothing changed)."""

from __future__ import annotations

import json
import os
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
    name: str = request.node.name
    return session_dir / ("cli-" + name[:12].strip("_[]"))


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
    cid = "running1"
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
