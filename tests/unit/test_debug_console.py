"""``capsa debug-console`` on the host: its gates, the command and the shell's way into the guest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from capsa.agent.policy import Enforcer, parse
from capsa.cli import main as cli_main
from capsa.config import Config, RuntimeConfig, load_config, parse_config
from capsa.errors import ConfigError
from capsa.protocols import agent_pb2 as pb
from capsa.runtime import debug_console
from capsa.runtime.ids import validate_id
from capsa.runtime.mounts import GUEST_SHARE_DIR

REPO = Path(__file__).resolve().parents[2]


def test_off_by_default_and_a_boolean_in_the_configuration() -> None:
    assert Config().runtime.debug_console is False
    assert load_config(str(REPO / "config" / "configuration.toml")).runtime.debug_console is False
    assert parse_config({"runtime": {"debug_console": True}}).runtime.debug_console is True
    with pytest.raises(ConfigError, match="debug_console"):
        parse_config({"runtime": {"debug_console": "yes"}})


def test_root_only_and_only_when_the_configuration_allows_it() -> None:
    allowed = RuntimeConfig(debug_console=True)
    debug_console.check_allowed(allowed, 0)
    with pytest.raises(debug_console.DebugConsoleRefused, match="only root"):
        debug_console.check_allowed(allowed, 1000)
    with pytest.raises(debug_console.DebugConsoleRefused, match=r"\[runtime\] debug_console = false"):
        debug_console.check_allowed(RuntimeConfig(), 0)


def test_the_refusals_are_one_line_and_touch_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    off = tmp_path / "off.toml"
    off.write_text("[runtime]\ndebug_console = false\n")
    on = tmp_path / "on.toml"
    on.write_text("[runtime]\ndebug_console = true\n")
    base = ["--root", str(root)]

    assert cli_main.main([*base, "--config", str(off), "debug-console", "c1", "uname", "-r"]) == 1
    assert capsys.readouterr().err == (
        "capsa: debug-console: the configuration does not allow it ([runtime] debug_console = false)\n"
    )
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli_main.main([*base, "--config", str(on), "debug-console", "c1"]) == 1
    assert capsys.readouterr().err == "capsa: debug-console: only root may open a debug console\n"
    monkeypatch.undo()
    assert cli_main.main([*base, "--config", str(on), "debug-console", "c1"]) != 0
    assert capsys.readouterr().err.count("\n") == 1  # no such container: one line too
    assert not root.exists()


def test_the_shell_reaches_the_guest_read_only_under_a_name_no_container_can_have() -> None:
    bind = debug_console.tools_bind()
    assert bind.source == Path("/bin/busybox")
    assert bind.readonly and not bind.directory and not bind.recursive
    assert bind.propagation == "rprivate"  # nothing the host mounts later follows it in
    first = bind.target.split("/")[0]
    with pytest.raises(Exception, match="invalid container id"):
        validate_id(first)
    assert f"{GUEST_SHARE_DIR}/{bind.target}" == debug_console.GUEST_BUSYBOX


def test_the_command_line_the_guest_runs() -> None:
    busybox = debug_console.GUEST_BUSYBOX
    assert debug_console.console_argv([]) == [busybox, "sh"]
    argv = debug_console.console_argv(["cat", "/proc/1/cmdline"])
    assert argv == [busybox, "sh", "-c", 'exec "$@"', "sh", "cat", "/proc/1/cmdline"]
    assert debug_console.console_env(False, "xterm") == [f"PS1={debug_console.PROMPT}"]
    assert debug_console.console_env(True, "xterm")[-1] == "TERM=xterm"
    assert debug_console.console_env(True, None)[-1] == "TERM=vt100"


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed")
def test_the_shell_runs_applets_without_links_and_passes_the_status_on(tmp_path: Path) -> None:
    # What the guest does, on the host: a copy of busybox under another name,
    # an environment with no PATH to any applet.
    busybox = tmp_path / "busybox"
    shutil.copy("/bin/busybox", busybox)
    argv = [str(busybox), *debug_console.console_argv(["sh", "-c", "echo $((6 * 7)) | cat; exit 3"])[1:]]
    done = subprocess.run(argv, env={"PATH": str(tmp_path / "none")}, capture_output=True, timeout=30)
    assert (done.returncode, done.stdout) == (3, b"42\n")


def test_a_policy_can_deny_it_or_allow_only_some_commands() -> None:
    policy = parse(
        """
        version = 1
        [[rule]]
        name = "only-ps"
        rpc = ["DebugConsole"]
        action = "allow"
        when = { args = ["* sh -c exec \\"$@\\" sh ps*"], terminal = false }
        [[rule]]
        name = "no-debug-console"
        rpc = "DebugConsole"
        action = "deny"
        """
    )
    enforcer = Enforcer(policy)

    def request(*command: str, terminal: bool = False) -> pb.DebugConsoleRequest:
        argv = debug_console.console_argv(list(command))
        return pb.DebugConsoleRequest(exec_id="d", args=argv, env=["A=b"], terminal=terminal)

    assert enforcer.check("DebugConsole", request("ps", "-ef")) is None
    refused = enforcer.check("DebugConsole", request("cat", "/etc/shadow"))
    assert refused == 'DebugConsole refused by the agent policy (rule "no-debug-console")'
    assert enforcer.check("DebugConsole", request("ps", terminal=True)) == refused
    assert enforcer.denials == {"no-debug-console": 2}
