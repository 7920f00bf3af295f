"""The agent policy in real guests: from the configuration and from an annotation, through the runc CLI.

A refusal must reach the user as one line naming the rule, and a create the
policy refuses must leave nothing behind (the ``capsa`` fixture checks).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from harness import Capsa

from capsa.errors import AgentError
from capsa.proxy.launch import ProxyClient
from capsa.proxy.proxy import POLICY_ANNOTATION
from capsa.runtime.state import StateStore

pytestmark = pytest.mark.vm

POLICIES = Path(__file__).parents[2] / "config" / "policies"


def config_with(tmp_path: Path, policy: str) -> str:
    path = tmp_path / "configuration.toml"
    path.write_text(f'[agent]\npolicy = "{POLICIES / policy}"\n')
    return str(path)


def annotate(capsa: Capsa, policy: str, readonly: bool) -> None:
    spec_path = capsa.bundle / "config.json"
    spec = json.loads(spec_path.read_text())
    spec["root"]["readonly"] = readonly
    spec["annotations"] = {POLICY_ANNOTATION: base64.b64encode((POLICIES / policy).read_bytes()).decode()}
    spec_path.write_text(json.dumps(spec))


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def raw_exec(capsa: Capsa, cid: str) -> str:
    """Send ExecProcess to the agent through the proxy's forwarding; the refusal's words."""
    client = await ProxyClient.connect(StateStore(capsa.root).socket_dir(cid), 30)
    try:
        process = {"args": ["/bin/echo", "raw"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
        await client.agent.exec_process(cid, "raw", process)
    except AgentError as exc:
        return str(exc)
    finally:
        await client.aclose()
    raise AssertionError("the agent ran an ExecProcess its policy denies")


def test_the_configured_policy_refuses_exec_naming_its_rule(capsa: Capsa, tmp_path: Path) -> None:
    config = config_with(tmp_path, "no-exec.toml")
    capsa.spec(["sleep", "600"])
    created = capsa("--config", config, "create", "--bundle", str(capsa.bundle), "p1")
    assert created.code == 0, created.stderr
    try:
        assert capsa("start", "p1").code == 0
        refused = capsa("exec", "p1", "echo", "should not run")
        assert refused.code != 0
        assert "should not run" not in refused.stdout
        assert 'ExecProcess refused by the agent policy (rule "no-exec")' in one_line(refused.stderr)
        # The check is the guest's: an ExecProcess sent straight down the
        # agent channel (the proxy forwards it untouched) is refused alike.
        refused_raw = asyncio.run(raw_exec(capsa, "p1"))
        assert refused_raw == 'ExecProcess refused by the agent policy (rule "no-exec")'
        assert capsa.status("p1") == "running"
        # What the policy allows still works: signals, state, delete.
        assert capsa("kill", "p1", "KILL").code == 0
    finally:
        capsa("delete", "--force", "p1")


def test_an_annotated_policy_decides_what_the_sandbox_may_create(capsa: Capsa) -> None:
    capsa.spec(["sleep", "600"])
    annotate(capsa, "read-only.toml", readonly=False)
    refused = capsa("create", "--bundle", str(capsa.bundle), "p2")
    assert refused.code != 0
    assert 'CreateContainer refused by the agent policy (rule "writable-container")' in one_line(refused.stderr)
    assert capsa("state", "p2").code != 0  # nothing left: the fixture checks processes and files

    annotate(capsa, "read-only.toml", readonly=True)
    created = capsa("create", "--bundle", str(capsa.bundle), "p3")
    assert created.code == 0, created.stderr
    try:
        refused_exec = capsa("exec", "p3", "true")
        assert 'rule "no-exec"' in one_line(refused_exec.stderr)
    finally:
        capsa("delete", "--force", "p3")


def test_a_final_configured_policy_cannot_be_replaced_by_an_annotation(capsa: Capsa, tmp_path: Path) -> None:
    config = config_with(tmp_path, "no-exec.toml")
    capsa.spec(["sleep", "600"])
    annotate(capsa, "read-only.toml", readonly=True)
    refused = capsa("--config", config, "create", "--bundle", str(capsa.bundle), "p4")
    assert refused.code != 0
    assert 'SetPolicy refused by the agent policy (rule "policy-is-final")' in one_line(refused.stderr)
