"""The agent policy: loading a document, deciding on requests, and enforcing it in a real agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_agent_service import Agent, agent, call, create, empty, expect_error, run, wait

from capsa.agent.policy import ALLOW_ALL, METHODS, Enforcer, PolicyError, container_view, load_image_policy, parse
from capsa.protocols import agent_pb2 as pb
from capsa.proxy.proxy import POLICY_ANNOTATION, annotated_policy
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import Code

__all__ = ["agent"]  # the fixture, used by name

POLICIES = Path(__file__).parents[2] / "config" / "policies"


def container_request(process: dict[str, Any], **spec: Any) -> pb.CreateContainerRequest:
    document = {"ociVersion": "1.0.2", "process": process, "root": {"path": "rootfs"}, **spec}
    return pb.CreateContainerRequest(container_id="c1", oci_spec_json=json.dumps(document).encode())


def exec_request(*args: str) -> pb.ExecProcessRequest:
    process = {"args": list(args), "cwd": "/", "user": {"uid": 0, "gid": 0}}
    return pb.ExecProcessRequest(container_id="c1", exec_id="e1", process_json=json.dumps(process).encode())


# --- loading ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ("version = 2", "version: expected 1"),
        ("version = 1\ndefault = 'maybe'", "default: expected"),
        ("version = 1\nextra = 1", "extra: unknown key"),
        ("version = 1\n[[rule]]\nname='x'\nrpc=['Exec']\naction='deny'", "Exec: no such method"),
        ("version = 1\n[[rule]]\nname='x'\nrpc=['ExecProcess']\naction='block'", '"x".action'),
        ("version = 1\n[[rule]]\nrpc=['ExecProcess']\naction='deny'", "rule[0].name"),
        (
            "version = 1\n[[rule]]\nname='x'\nrpc=['StartContainer']\naction='deny'\nwhen={args='sh'}",
            "StartContainer has no field 'args'",
        ),
        (
            "version = 1\n[[rule]]\nname='x'\nrpc=['CreateContainer']\naction='deny'\nwhen={readonly_rootfs='yes'}",
            "expected true or false",
        ),
        (
            "version = 1\n[[rule]]\nname='x'\nrpc=['CreateContainer']\naction='deny'\nwhen={uid='root'}",
            "expected an integer",
        ),
        (
            "version = 1\n[[rule]]\nname='x'\nrpc='*'\naction='deny'\n[[rule]]\nname='x'\nrpc='*'\naction='allow'",
            "two rules have this name",
        ),
        ("version = [", "not valid TOML"),
    ],
)
def test_a_faulty_document_is_refused_with_its_place(document: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint.replace("[", r"\[").replace("(", r"\(")):
        parse(document)


def test_the_shipped_examples_load() -> None:
    for path in POLICIES.glob("*.toml"):
        assert parse(path.read_bytes()).rules, path


def test_an_image_without_a_policy_allows_everything_and_a_broken_one_refuses_everything(tmp_path: Path) -> None:
    assert load_image_policy(str(tmp_path / "none.toml")) is ALLOW_ALL
    broken = tmp_path / "policy.toml"
    broken.write_text("version = 7\n")
    enforcer = Enforcer(load_image_policy(str(broken)))
    assert enforcer.check("Check", pb.CheckRequest()) == "Check refused by the agent policy (its default)"


# --- deciding ---------------------------------------------------------------------


def test_first_applying_rule_decides_and_the_default_covers_the_rest() -> None:
    policy = parse(
        """
        version = 1
        default = "deny"
        [[rule]]
        name = "sleep-only"
        rpc = ["CreateContainer", "ExecProcess"]
        action = "allow"
        when = { args = ["sleep *", "/bin/sleep *"] }
        [[rule]]
        name = "the-rest"
        rpc = "*"
        action = "allow"
        """
    )
    enforcer = Enforcer(policy)
    assert enforcer.check("ExecProcess", exec_request("sleep", "5")) is None
    assert enforcer.check("ExecProcess", exec_request("/bin/sh", "-c", "sleep 5")) is None  # falls to the-rest
    assert enforcer.denials == {}
    strict = Enforcer(parse('version = 1\ndefault = "deny"\n' + _allow_sleep()))
    assert strict.check("ExecProcess", exec_request("sleep", "5")) is None
    refusal = strict.check("ExecProcess", exec_request("/bin/sh"))
    assert refusal == "ExecProcess refused by the agent policy (its default)"
    assert strict.check("StartContainer", pb.StartContainerRequest(container_id="c1")) is not None
    assert strict.denials == {"default": 2}
    assert strict.denied == 2


def _allow_sleep() -> str:
    return '[[rule]]\nname = "sleep"\nrpc = ["ExecProcess"]\naction = "allow"\nwhen = { args = "sleep *" }\n'


def test_a_list_field_is_an_allow_list_of_every_element() -> None:
    policy = parse(
        """
        version = 1
        [[rule]]
        name = "few-caps"
        rpc = ["CreateContainer"]
        action = "allow"
        when = { capabilities = ["CAP_CHOWN", "CAP_KILL"] }
        [[rule]]
        name = "too-many-caps"
        rpc = ["CreateContainer"]
        action = "deny"
        """
    )
    enforcer = Enforcer(policy)
    few = {"args": ["true"], "capabilities": {"bounding": ["CAP_KILL"]}}
    many = {"args": ["true"], "capabilities": {"bounding": ["CAP_KILL", "CAP_SYS_ADMIN"]}}
    assert enforcer.check("CreateContainer", container_request(few)) is None
    refusal = enforcer.check("CreateContainer", container_request(many))
    assert refusal == 'CreateContainer refused by the agent policy (rule "too-many-caps")'


def test_read_only_example_takes_read_only_containers_and_refuses_writable_ones() -> None:
    enforcer = Enforcer(parse((POLICIES / "read-only.toml").read_bytes()))
    hosts = {"destination": "/etc/hosts", "type": "bind", "source": "/run/x/hosts", "options": ["rbind"]}
    data_ro = {"destination": "/data", "type": "bind", "source": "/run/x/data", "options": ["rbind", "ro"]}
    data_rw = {"destination": "/data", "type": "bind", "source": "/run/x/data", "options": ["rbind"]}
    process = {"args": ["sh"]}
    read_only = container_request(process, root={"path": "rootfs", "readonly": True}, mounts=[hosts, data_ro])
    assert enforcer.check("CreateContainer", read_only) is None
    writable_volume = container_request(process, root={"path": "rootfs", "readonly": True}, mounts=[data_rw])
    writable_root = container_request(process, mounts=[hosts])
    for request in (writable_volume, writable_root):
        refusal = enforcer.check("CreateContainer", request)
        assert refusal == 'CreateContainer refused by the agent policy (rule "writable-container")'
    assert enforcer.check("ExecProcess", exec_request("sh")) is not None
    assert enforcer.check("SetPolicy", pb.SetPolicyRequest(policy=b"version = 1")) is not None


def test_the_container_view_reads_the_spec_a_host_sends() -> None:
    spec = {
        "process": {"args": ["nginx", "-g", "daemon off;"], "env": ["A=1"], "user": {"uid": 101, "gid": 101}},
        "root": {"path": "rootfs", "readonly": True},
        "annotations": {"io.kubernetes.cri.image-name": "docker.io/library/nginx:1.25"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }
    view = container_view("web", spec)
    assert view["args"] == "nginx -g daemon off;"
    assert (view["uid"], view["gid"], view["readonly_rootfs"]) == (101, 101, True)
    assert view["image"] == "docker.io/library/nginx:1.25"
    assert view["bind_sources"] == [] and view["mount_destinations"] == ["/proc"]
    assert view["namespaces"] == ["pid", "mount"]
    # A spec that does not parse has no fields: only unconditional rules match it.
    empty_view = Enforcer(parse("version = 1\n" + _allow_sleep().replace("ExecProcess", "CreateContainer")))
    garbage = pb.CreateContainerRequest(container_id="c1", oci_spec_json=b"[" * 100_000)
    assert empty_view.check("CreateContainer", garbage) is None  # the allow rule's condition fails; default allow


def test_every_agent_method_can_be_named() -> None:
    service = pb.DESCRIPTOR.services_by_name["AgentService"]
    assert set(METHODS) == {method.name for method in service.methods}


def test_port_forwarding_can_be_limited_to_some_ports() -> None:
    """The example of docs/agent-policy.md: OpenTcpStream (the loopback relay's dial) by port."""
    enforcer = Enforcer(
        parse(
            """
            version = 1
            [[rule]]
            name = "forward-http-only"
            rpc = ["OpenTcpStream"]
            action = "allow"
            when = { port = [80, 8080] }
            [[rule]]
            name = "no-port-forward"
            rpc = ["OpenTcpStream"]
            action = "deny"
            """
        )
    )
    assert enforcer.check("OpenTcpStream", pb.OpenTcpStreamRequest(port=8080)) is None
    refusal = enforcer.check("OpenTcpStream", pb.OpenTcpStreamRequest(port=22))
    assert refusal == 'OpenTcpStream refused by the agent policy (rule "no-port-forward")'
    assert enforcer.check("ReadTcpStream", pb.ReadTcpStreamRequest(stream_id=1, len=10)) is None
    with pytest.raises(PolicyError, match="ReadTcpStream has no field 'port'"):
        parse('version = 1\n[[rule]]\nname = "r"\nrpc = ["ReadTcpStream"]\naction = "deny"\nwhen = { port = 22 }\n')


def test_the_annotation_carries_base64() -> None:
    assert annotated_policy({}) is None
    assert annotated_policy({POLICY_ANNOTATION: "dmVyc2lvbiA9IDE="}) == b"version = 1"
    with pytest.raises(Exception, match=f"annotation {POLICY_ANNOTATION}: not base64"):
        annotated_policy({POLICY_ANNOTATION: "not base64!"})


# --- enforcing, in a real agent over ttrpc -----------------------------------------


def test_a_real_agent_refuses_what_its_policy_denies_and_keeps_a_final_policy(agent: Agent) -> None:
    no_exec = (POLICIES / "no-exec.toml").read_bytes()

    async def scenario(client: Client) -> tuple[str, str, str, pb.GuestDetailsResponse]:
        bad = await expect_error(
            Code.INVALID_ARGUMENT, empty(client, "SetPolicy", pb.SetPolicyRequest(policy=b"version = 9"))
        )
        await empty(client, "SetPolicy", pb.SetPolicyRequest(policy=no_exec))
        await create(client, agent, "policed", "/bin/sh", "-c", "sleep 30")
        await empty(client, "StartContainer", pb.StartContainerRequest(container_id="policed"))
        process = {"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/usr/bin:/bin"]}
        request = pb.ExecProcessRequest(container_id="policed", exec_id="e1", process_json=json.dumps(process).encode())
        refused = await expect_error(Code.PERMISSION_DENIED, empty(client, "ExecProcess", request))
        replaced = await expect_error(
            Code.PERMISSION_DENIED, empty(client, "SetPolicy", pb.SetPolicyRequest(policy=b"version = 1"))
        )
        details = await call(client, "GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)
        await empty(client, "SignalProcess", pb.SignalProcessRequest(container_id="policed", signal=9))
        await wait(client, "policed")
        await empty(client, "RemoveContainer", pb.RemoveContainerRequest(container_id="policed"))
        return bad, refused, replaced, details

    bad, refused, replaced, details = run(agent, scenario)
    assert "agent policy: version: expected 1" in bad
    assert refused == 'ExecProcess refused by the agent policy (rule "no-exec")'
    assert replaced == 'SetPolicy refused by the agent policy (rule "policy-is-final")'
    assert details.policy_denials == 2
    assert details.policy_digest == parse(no_exec).digest
    assert 'refused by the agent policy (rule "no-exec")' in agent.log.read_text()


def test_a_host_agent_cannot_renew_itself_and_reports_its_hash_probe(agent: Agent) -> None:
    async def scenario(client: Client) -> tuple[str, pb.GuestDetailsResponse]:
        refused = await expect_error(
            Code.FAILED_PRECONDITION, empty(client, "RenewAgent", pb.RenewAgentRequest(entropy=b"x" * 32))
        )
        details = await call(client, "GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)
        return refused, details

    refused, details = run(agent, scenario)
    assert "cannot renew itself" in refused
    assert details.agent_hash_probe != 0 and details.agent_renewals == 0
