"""Bad input to every verb: runc's kind of one-line error, a non-zero exit, and nothing changed.

Engines show the runtime's stderr to their users and classify failures by
its words (containerd's runc shim matches ``does not exist``, ``container
not running``; conmon's ``state`` needs ``does not exist``), and containerd
reads the error from the last ``"level":"error"`` line of the
``--log-format json`` log.  Most of these fail before any VM boots and need
none; the wrong-state checks need a real container and are marked vm.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa, Result, leftovers, subreaper, wait_child

UNKNOWN = "nosuch"

# Each verb that names a container, with ID standing for it.
VERBS_WITH_ID: list[list[str]] = [
    ["start", "ID"],
    ["state", "ID"],
    ["kill", "ID"],
    ["kill", "ID", "9"],
    ["kill", "--all", "ID", "KILL"],
    ["delete", "ID"],
    ["exec", "ID", "true"],
    ["exec", "--detach", "ID", "true"],
    ["ps", "ID"],
    ["ps", "--format", "json", "ID"],
    ["pause", "ID"],
    ["resume", "ID"],
    ["events", "ID"],
    ["events", "--stats", "ID"],
    ["update", "--memory", "64M", "ID"],
    ["update", "--cpu-quota", "50000", "ID"],
]


def with_id(verb: list[str], container_id: str) -> list[str]:
    return [container_id if arg == "ID" else arg for arg in verb]


def assert_refused(result: Result, *words: str, code: int | None = None) -> None:
    """One line on stderr naming the problem, no traceback, a non-zero exit."""
    assert result.code != 0, f"accepted: {result}"
    if code is not None:
        assert result.code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("capsa: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def assert_no_container(capsa: Capsa, container_id: str) -> None:
    assert not (capsa.root / container_id).exists()
    assert leftovers(capsa.root) == []


def last_error(log: Path) -> str:
    """What containerd's runc shim reports: the msg of the log's last "level":"error" line."""
    errors = [entry for entry in map(json.loads, log.read_text().splitlines()) if entry.get("level") == "error"]
    assert errors, log.read_text()
    return str(errors[-1]["msg"])


@pytest.mark.parametrize("verb", VERBS_WITH_ID, ids=" ".join)
def test_unknown_container(capsa: Capsa, verb: list[str]) -> None:
    result = capsa(*with_id(verb, UNKNOWN))
    assert_refused(result, "does not exist", UNKNOWN)
    assert result.stdout == ""
    assert not capsa.root.exists() or list(capsa.root.iterdir()) == []


def test_delete_force_of_an_unknown_container_succeeds_as_runc(capsa: Capsa) -> None:
    """runc's `delete --force` of a container that is not there is a success: the engine's cleanup is idempotent."""
    result = capsa("delete", "--force", UNKNOWN)
    assert result.code == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("bad_id", ["a/b", "..", "../etc", "x/../y", "with space", "é", "a:b"])
@pytest.mark.parametrize(
    "verb", [["create", "--bundle", "BUNDLE", "ID"], ["run", "--bundle", "BUNDLE", "ID"], *VERBS_WITH_ID], ids=" ".join
)
def test_bad_container_ids(capsa: Capsa, verb: list[str], bad_id: str) -> None:
    capsa.spec(["true"])
    args = [str(capsa.bundle) if arg == "BUNDLE" else arg for arg in with_id(verb, bad_id)]
    result = capsa(*args)
    assert_refused(result, "invalid container id")
    assert leftovers(capsa.root) == []


def _write_spec(capsa: Capsa, what: str) -> None:
    config = capsa.bundle / "config.json"
    capsa.spec(["true"])
    spec: dict[str, Any] = json.loads(config.read_text())
    if what == "not-json":
        config.write_text("{ this is not json")
        return
    if what == "not-an-object":
        config.write_text("[1, 2]")
        return
    if what == "no-config":
        config.unlink()
        return
    if what == "no-process":
        del spec["process"]
    elif what == "empty-args":
        spec["process"]["args"] = []
    elif what == "no-such-executable":
        spec["process"]["args"] = ["nosuch-binary"]
    elif what == "no-root":
        del spec["root"]
    elif what == "terminal-without-console-socket":
        spec["process"]["terminal"] = True
    elif what == "relative-hook":
        spec["hooks"] = {"createRuntime": [{"path": "relative/hook"}]}
    elif what == "host-network":
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    config.write_text(json.dumps(spec))


@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("not-json", ["not valid JSON"]),
        ("not-an-object", ["config.json"]),
        ("no-config", ["config.json"]),
        ("no-process", ["process"]),
        ("empty-args", ["args"]),
        ("no-such-executable", ["executable file not found"]),
        ("no-root", ["root"]),
        ("terminal-without-console-socket", ["console socket"]),
        ("relative-hook", ["hooks.createRuntime", "absolute"]),
        ("host-network", ["network"]),
    ],
)
def test_create_refuses_a_bad_bundle_and_leaves_nothing(capsa: Capsa, what: str, words: list[str]) -> None:
    _write_spec(capsa, what)
    result = capsa("create", "--bundle", str(capsa.bundle), "bad")
    assert_refused(result, *words)
    assert_no_container(capsa, "bad")


def test_create_with_a_missing_bundle(capsa: Capsa) -> None:
    result = capsa("create", "--bundle", str(capsa.bundle / "nope"), "bad")
    assert_refused(result, "no such directory")
    assert_no_container(capsa, "bad")


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--console-socket", "/tmp/nosuch.sock"], ["process.terminal is false"]),
        (["--preserve-fds", "2"], ["--preserve-fds"]),
        (["--preserve-fds", "two"], ["--preserve-fds"]),
        (["--no-such-flag"], ["--no-such-flag"]),
        (["--pid-file", "/nonexistent/dir/pid"], ["--pid-file", "no such directory"]),
    ],
)
def test_create_refuses_bad_flags(capsa: Capsa, flags: list[str], words: list[str]) -> None:
    capsa.spec(["true"])
    result = capsa("create", "--bundle", str(capsa.bundle), *flags, "bad")
    assert_refused(result, *words)
    assert_no_container(capsa, "bad")


@pytest.mark.parametrize("name", ["BOGUS", "SIGBOGUS", "99", "0x9", "-9", "RTMIN+99", ""])
def test_kill_with_an_unknown_signal(capsa: Capsa, name: str) -> None:
    result = capsa("kill", UNKNOWN, name)
    assert_refused(result, "signal")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{ not json", ["not valid JSON"]),
        ('["sh"]', ["expected a JSON object"]),
        ("{}", ["args"]),
        ('{"args": []}', ["args"]),
        ('{"args": ["sh", 1]}', ["args"]),
        ('{"args": ["sh"], "cwd": "relative"}', ["cwd"]),
        ('{"args": ["sh"], "env": "A=B"}', ["env"]),
        (None, ["no such file"]),
    ],
)
def test_exec_with_a_malformed_process_file(
    capsa: Capsa, tmp_path: Path, content: str | None, words: list[str]
) -> None:
    process = tmp_path / "process.json"
    if content is not None:
        process.write_text(content)
    result = capsa("exec", "--process", str(process), UNKNOWN)
    assert_refused(result, "--process", *words)


@pytest.mark.parametrize(
    ("content", "words"),
    [("{ not json", ["not valid JSON"]), (None, ["No such file"])],
)
def test_update_with_a_malformed_resources_file(
    capsa: Capsa, tmp_path: Path, content: str | None, words: list[str]
) -> None:
    resources = tmp_path / "resources.json"
    if content is not None:
        resources.write_text(content)
    result = capsa("update", "--resources", str(resources), UNKNOWN)
    assert_refused(result, "--resources", *words)


@pytest.mark.parametrize(
    "args",
    [
        ["start"],
        ["frobnicate", "x"],
        ["state", "a", "b"],
        ["kill"],
        ["list", "--format", "xml"],
        ["--log-format", "yaml", "list"],
    ],
    ids=" ".join,
)
def test_usage_errors(capsa: Capsa, args: list[str]) -> None:
    assert_refused(capsa(*args), code=2)


@pytest.mark.parametrize(
    "args",
    [["state", UNKNOWN], ["kill", UNKNOWN, "BOGUS"], ["start"], ["create", "--bundle", "/nonexistent", "x"]],
    ids=" ".join,
)
def test_json_log_holds_the_error_for_containerd(capsa: Capsa, tmp_path: Path, args: list[str]) -> None:
    log = tmp_path / "log.json"
    result = capsa("--log", str(log), "--log-format", "json", *args)
    assert result.code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = json.loads(lines[0])
    assert line["level"] == "error"
    assert last_error(log) == line["msg"]
    assert "Traceback" not in log.read_text()


# --- containers in the wrong state: these boot a VM ---------------------------------------------


@pytest.fixture
def adopt_orphans() -> Iterator[None]:
    with subreaper():
        yield


def create(capsa: Capsa, cid: str, tmp_path: Path) -> int:
    pid_file = tmp_path / f"{cid}.pid"
    result = capsa("create", "--bundle", str(capsa.bundle), "--pid-file", str(pid_file), cid)
    assert result.code == 0, result.stderr
    return int(pid_file.read_text())


def refused_and_unchanged(capsa: Capsa, cid: str, args: list[str], *words: str) -> None:
    before = capsa.state(cid)
    assert_refused(capsa(*args), *words)
    assert capsa.state(cid) == before


@pytest.mark.vm
@pytest.mark.slow
def test_wrong_states_change_nothing(capsa: Capsa, tmp_path: Path, adopt_orphans: None) -> None:
    capsa.spec(["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"])
    shim = create(capsa, "ws", tmp_path)

    # created
    assert capsa.status("ws") == "created"
    refused_and_unchanged(capsa, "ws", ["pause", "ws"], "not running")
    refused_and_unchanged(capsa, "ws", ["resume", "ws"], "not paused")
    refused_and_unchanged(capsa, "ws", ["create", "--bundle", str(capsa.bundle), "ws"], "already exists")

    # running
    assert capsa("start", "ws").code == 0
    assert capsa.status("ws") == "running"
    refused_and_unchanged(capsa, "ws", ["start", "ws"], "already running")
    refused_and_unchanged(capsa, "ws", ["resume", "ws"], "not paused")
    refused_and_unchanged(capsa, "ws", ["delete", "ws"], "not stopped")
    refused_and_unchanged(capsa, "ws", ["kill", "ws", "BOGUS"], "unknown signal")
    refused_and_unchanged(capsa, "ws", ["run", "--bundle", str(capsa.bundle), "ws"], "already exists")
    refused_and_unchanged(capsa, "ws", ["exec", "ws", "nosuch-binary"])
    bad_process = tmp_path / "process.json"
    bad_process.write_text('{"args": "sh"}')
    refused_and_unchanged(capsa, "ws", ["exec", "--process", str(bad_process), "ws"], "--process", "args")
    refused_and_unchanged(capsa, "ws", ["exec", "--tty", "--detach", "ws", "sh"], "console")
    refused_and_unchanged(capsa, "ws", ["exec", "--detach", "--pid-file", "/nonexistent/p", "ws", "true"], "--pid-file")
    log = tmp_path / "log.json"
    before = capsa.state("ws")
    json_refusal = capsa("--log", str(log), "--log-format", "json", "start", "ws")
    assert json_refusal.code != 0
    assert "already running" in last_error(log)
    assert capsa.state("ws") == before

    # paused
    assert capsa("pause", "ws").code == 0
    assert capsa.status("ws") == "paused"
    refused_and_unchanged(capsa, "ws", ["pause", "ws"], "not running")
    refused_and_unchanged(capsa, "ws", ["exec", "ws", "true"], "paused")
    refused_and_unchanged(capsa, "ws", ["start", "ws"])
    refused_and_unchanged(capsa, "ws", ["delete", "ws"], "not stopped")
    assert capsa("resume", "ws").code == 0
    assert capsa.status("ws") == "running"

    # stopped
    assert capsa("kill", "ws", "TERM").code == 0
    assert wait_child(shim, 60) == 0
    assert capsa.status("ws") == "stopped"
    refused_and_unchanged(capsa, "ws", ["start", "ws"], "stopped")
    refused_and_unchanged(capsa, "ws", ["exec", "ws", "true"], "stopped")
    refused_and_unchanged(capsa, "ws", ["kill", "ws", "KILL"], "container not running")
    refused_and_unchanged(capsa, "ws", ["pause", "ws"], "not running")
    refused_and_unchanged(capsa, "ws", ["resume", "ws"], "not paused")
    refused_and_unchanged(capsa, "ws", ["ps", "ws"], "stopped")
    refused_and_unchanged(capsa, "ws", ["update", "--memory", "256M", "ws"])

    assert capsa("delete", "ws").code == 0
    assert_no_container(capsa, "ws")


@pytest.mark.vm
def test_an_id_that_begins_with_a_dash_is_valid_as_in_runc(capsa: Capsa, tmp_path: Path) -> None:
    """runc's ID rule (letters, digits, '_', '+', '-', '.') allows "-rf"; `--` ends the flags before it."""
    capsa.spec(["true"])
    result = capsa("create", "--bundle", str(capsa.bundle), "--", "-rf")
    try:
        assert result.code == 0, result.stderr
        assert capsa("state", "--", "-rf").code == 0
    finally:
        capsa("delete", "--force", "--", "-rf")
    assert_no_container(capsa, "-rf")


@pytest.mark.vm
def test_create_that_fails_inside_the_guest_leaves_nothing(capsa: Capsa) -> None:
    """The host's checks pass (the file exists), crun in the booted VM refuses it: the VM goes too."""
    (capsa.bundle / "rootfs" / "bin" / "notexec").write_text("plain text\n")
    capsa.spec(["/bin/notexec"])
    result = capsa("create", "--bundle", str(capsa.bundle), "guestfail")
    assert_refused(result, "Permission denied")
    assert_no_container(capsa, "guestfail")


@pytest.mark.parametrize(
    "args",
    [["list"], ["state", "x"], ["create", "--bundle", "BUNDLE", "x"], ["delete", "x"], ["start", "x"], ["pause", "x"]],
    ids=" ".join,
)
def test_a_state_root_that_is_a_file(capsa: Capsa, tmp_path: Path, args: list[str]) -> None:
    capsa.spec(["true"])
    root = tmp_path / "not-a-directory"
    root.write_text("")
    result = capsa("--root", str(root), *[str(capsa.bundle) if a == "BUNDLE" else a for a in args])
    assert_refused(result)
    assert str(root) in result.stderr or "does not exist" in result.stderr
    assert root.read_text() == ""
