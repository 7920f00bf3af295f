"""OCI hooks run on the host: real shell-script hooks in a temporary directory."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from capsa.errors import BundleError, HookError
from capsa.runtime.hooks import STAGES, parse_hooks, run_hooks, run_hooks_warn, validate_hooks

STATE = {
    "ociVersion": "1.0.2",
    "id": "c1",
    "status": "creating",
    "pid": 4242,
    "bundle": "/nonexistent-bundle",
    "annotations": {"org.example/key": "value"},
}


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def spec_with(stage: str, *hooks: dict[str, Any]) -> dict[str, Any]:
    return {"hooks": {stage: list(hooks)}}


def test_hook_reads_state_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "stdin.json"
    hook = script(tmp_path, "h", f'cat > "{out}"\n')
    run_hooks(spec_with("createRuntime", {"path": hook}), "createRuntime", STATE)
    assert json.loads(out.read_text()) == STATE


def test_args_and_env_are_exact(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    hook = script(tmp_path, "h", f'{{ echo "$1|$2"; env | sort; }} > "{out}"\n')
    spec = spec_with(
        "prestart",
        {"path": hook, "args": [hook, "one", "two words"], "env": ["FOO=bar", "EMPTY="]},
    )
    run_hooks(spec, "prestart", STATE)
    lines = out.read_text().splitlines()
    assert lines[0] == "one|two words"
    # dash adds PWD to what it exports; nothing of our own environment leaks in.
    assert [line for line in lines[1:] if not line.startswith("PWD=")] == ["EMPTY=", "FOO=bar"]


def test_args0_is_argv0(tmp_path: Path) -> None:
    out = tmp_path / "cmdline"
    # /bin/sh itself as the hook: its /proc cmdline is exactly the argv execve got.
    command = f'tr "\\0" "\\n" < /proc/$$/cmdline > "{out}"'
    run_hooks(spec_with("poststart", {"path": "/bin/sh", "args": ["custom-argv0", "-c", command]}), "poststart", STATE)
    assert out.read_text().splitlines() == ["custom-argv0", "-c", command]


def test_missing_args_means_argv_is_path(tmp_path: Path) -> None:
    out = tmp_path / "argc"
    hook = script(tmp_path, "h", f'echo "$#" > "{out}"\n')
    run_hooks(spec_with("poststop", {"path": hook}), "poststop", STATE)
    assert out.read_text().strip() == "0"


def test_hooks_run_in_order_and_stop_at_first_failure(tmp_path: Path) -> None:
    log = tmp_path / "log"
    first = script(tmp_path, "first", f'echo first >> "{log}"\n')
    bad = script(tmp_path, "bad", f'echo bad >> "{log}"\necho "some detail" >&2\necho "the reason" >&2\nexit 3\n')
    never = script(tmp_path, "never", f'echo never >> "{log}"\n')
    spec = spec_with("createContainer", {"path": first}, {"path": bad}, {"path": never})
    with pytest.raises(HookError) as info:
        run_hooks(spec, "createContainer", STATE)
    assert str(info.value) == f"createContainer hook {bad} failed: exit status 3: the reason"
    assert log.read_text().splitlines() == ["first", "bad"]


def test_signal_is_reported(tmp_path: Path) -> None:
    hook = script(tmp_path, "h", "kill -TERM $$\n")
    with pytest.raises(HookError, match=r"startContainer hook .* failed: killed by SIGTERM$"):
        run_hooks(spec_with("startContainer", {"path": hook}), "startContainer", STATE)


def test_timeout_kills_the_hook_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path, "h", f'sleep 60 &\necho $! > "{pidfile}"\necho waiting >&2\nwait\n')
    started = time.monotonic()
    with pytest.raises(HookError) as info:
        run_hooks(spec_with("prestart", {"path": hook, "timeout": 1}), "prestart", STATE)
    assert time.monotonic() - started < 10
    assert str(info.value) == f"prestart hook {hook} failed: timed out after 1s: waiting"
    child = int(pidfile.read_text())
    # The sleep was in the hook's process group: it is gone (or a zombie about to be reaped by init).
    for _ in range(50):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except FileNotFoundError:
            break
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the hook's child survived the timeout")


def test_background_child_holding_stderr_does_not_hang(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path, "h", f'sleep 30 &\necho $! > "{pidfile}"\nexit 0\n')
    started = time.monotonic()
    try:
        run_hooks(spec_with("createRuntime", {"path": hook}), "createRuntime", STATE)
        assert time.monotonic() - started < 10
    finally:
        os.kill(int(pidfile.read_text()), 9)


def test_cannot_execute(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(
        HookError, match=r"^prestart hook .*/missing failed: cannot execute: No such file or directory$"
    ):
        run_hooks(spec_with("prestart", {"path": missing}), "prestart", STATE)
    not_exec = tmp_path / "plain"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(HookError, match="cannot execute: Permission denied"):
        run_hooks(spec_with("prestart", {"path": str(not_exec)}), "prestart", STATE)


def test_cwd_is_the_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    out = tmp_path / "cwd"
    hook = script(tmp_path, "h", f'pwd > "{out}"\n')
    run_hooks(spec_with("createRuntime", {"path": hook}), "createRuntime", {**STATE, "bundle": str(bundle)})
    assert out.read_text().strip() == str(bundle)


def test_warn_variant_logs_and_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "ran"
    bad = script(tmp_path, "bad", "echo oops >&2\nexit 1\n")
    good = script(tmp_path, "good", f'touch "{out}"\n')
    with caplog.at_level(logging.WARNING, logger="capsa.hooks"):
        run_hooks_warn(spec_with("poststop", {"path": bad}, {"path": good}), "poststop", STATE)
    assert out.exists()
    assert [r.getMessage() for r in caplog.records] == [f"poststop hook {bad} failed: exit status 1: oops"]


def test_warn_variant_reports_invalid_entries(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="capsa.hooks"):
        run_hooks_warn(spec_with("poststart", {"path": "relative"}), "poststart", STATE)
    assert "must be absolute" in caplog.text


def test_no_hooks_is_fine() -> None:
    for stage in STAGES:
        run_hooks({}, stage, STATE)
        run_hooks({"hooks": {}}, stage, STATE)


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ([], "hooks must be an object"),
        ({"prestart": {}}, "hooks.prestart must be an array"),
        ({"prestart": ["x"]}, r"hooks.prestart\[0\] must be an object"),
        ({"prestart": [{}]}, r"hooks.prestart\[0\].path is required"),
        ({"createRuntime": [{"path": "bin/hook"}]}, r"hooks.createRuntime\[0\].path must be absolute, not 'bin/hook'"),
        ({"poststop": [{"path": "/h", "args": "x"}]}, r"hooks.poststop\[0\].args must be an array of strings"),
        ({"poststop": [{"path": "/h", "env": ["NOEQUALS"]}]}, "is not NAME=VALUE"),
        ({"poststop": [{"path": "/h", "timeout": 0}]}, "timeout must be a positive number"),
        ({"poststop": [{"path": "/h", "timeout": 1.5}]}, "timeout must be a positive number"),
        ({"poststop": [{"path": "/h", "timeout": True}]}, "timeout must be a positive number"),
    ],
)
def test_invalid_entries(hooks: Any, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        validate_hooks({"hooks": hooks})


def test_parse_hooks_shape() -> None:
    spec = spec_with("prestart", {"path": "/a", "args": ["a", "b"], "env": ["X=1"], "timeout": 5})
    (hook,) = parse_hooks(spec, "prestart")
    assert (hook.path, hook.argv, hook.env, hook.timeout) == ("/a", ["a", "b"], ("X=1",), 5)
    with pytest.raises(ValueError):
        parse_hooks(spec, "preStart")
