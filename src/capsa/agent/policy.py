"""The agent policy: which requests the agent serves, and with which arguments.

The agent checks every request against the policy in force before it acts
on it.  A policy is a TOML document (docs/agent-policy.md has the whole
reference and examples; ``config/policies/`` ships ``no-exec`` and
``read-only``)::

    version = 1
    default = "allow"            # what a request no rule applies to gets

    [[rule]]
    name = "no-exec"             # named in every refusal, the guest's log and the count
    rpc = ["ExecProcess"]        # agent.proto method names, or "*"
    action = "deny"              # "allow" or "deny"

    [[rule]]
    name = "only-sleep"
    rpc = ["CreateContainer"]
    action = "allow"
    when = { args = ["sleep *", "/bin/sleep *"], readonly_rootfs = true }

Rules are taken in order; the first whose ``rpc`` names the request and
whose every ``when`` condition holds decides; when none does, ``default``
does.  A condition names a field of the request's view (:data:`FIELDS`,
per method) and gives

- a string or list of strings, glob patterns (``fnmatch``: ``*`` matches
  any run of characters, ``/`` and spaces included): a text field holds
  when it matches one of them; a list field holds when *every* element
  matches one of them (an allow-list: ``[]`` allows only the empty list);
- ``true`` or ``false``: a flag field holds when it is that;
- an integer or list of integers: a number field holds when it is one.

The document is checked whole when it is loaded: an unknown method, field,
action or type is refused with the place and the reason, so a typo never
becomes a rule that silently matches nothing.

Where the policy comes from: the guest image (``/etc/capsa/policy.toml``;
none there means allow everything, as Kata's default), then the host,
through ``SetPolicy``, from the configuration (``[agent] policy``) and a
sandbox's ``io.capsa.agent.policy`` annotation.  ``SetPolicy`` is a request
like any other: a policy that denies it cannot be replaced from the host.

Rego, which Kata's policies are written in, was the first choice; no
maintained engine for it can be installed for the guest here (the
``regorus`` bindings are not on PyPI for us, OPA is not in Debian 12), and
a Go or Rust engine would add megabytes to every guest.  This format has
the reach the issue asked for (methods, commands, images, mounts, users,
capabilities) in the standard library's ``tomllib`` and ``fnmatch``.

Pure, apart from the guest log line a refusal writes (:class:`Enforcer`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from google.protobuf.message import Message

from capsa.protocols import agent_pb2 as pb

log = logging.getLogger("capsa.agent.policy")

VERSION = 1
#: Where the guest image may carry the policy the agent starts with.
IMAGE_POLICY_PATH = "/etc/capsa/policy.toml"
#: The sandbox annotation that carries a policy (base64 of the TOML text).
ANNOTATION = "io.capsa.agent.policy"
ACTIONS = ("allow", "deny")

#: Every method of capsa.agent.v1.AgentService (agent.proto), and SetPolicy.
METHODS = (
    "Check",
    "GetGuestDetails",
    "CreateSandbox",
    "DestroySandbox",
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "PauseContainer",
    "ResumeContainer",
    "StatsContainer",
    "UpdateContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "ListProcesses",
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
    "UpdateInterface",
    "UpdateRoutes",
    "GetOOMEvent",
    "SetPolicy",
    "RenewAgent",
    "DebugConsole",
    "OpenTcpStream",
    "WriteTcpStream",
    "ReadTcpStream",
    "CloseTcpStream",
)

TEXT, TEXTS, FLAG, NUMBER = "text", "list of texts", "flag", "number"

#: The fields of a process (a container's init or an exec), as the OCI spec's "process".
_PROCESS_FIELDS = {
    "args": TEXT,  # process.args joined by single spaces
    "env": TEXTS,  # "NAME=value"
    "cwd": TEXT,
    "uid": NUMBER,
    "gid": NUMBER,
    "terminal": FLAG,
    "no_new_privileges": FLAG,
    "capabilities": TEXTS,  # the bounding set, e.g. "CAP_NET_RAW"
}

#: The fields each method's view has (methods not listed have none).
FIELDS: Mapping[str, Mapping[str, str]] = {
    "CreateContainer": {
        "container_id": TEXT,
        **_PROCESS_FIELDS,
        "readonly_rootfs": FLAG,
        "image": TEXT,  # the CRI image name annotation, "" elsewhere
        "annotations": TEXTS,  # "key=value"
        "mount_destinations": TEXTS,
        "bind_sources": TEXTS,  # guest paths the container's bind mounts come from
        "writable_binds": TEXTS,  # destinations of bind mounts without "ro"
        "namespaces": TEXTS,  # the types it gets: "pid", "network", ...
    },
    "ExecProcess": {"container_id": TEXT, "exec_id": TEXT, **_PROCESS_FIELDS},
    "SignalProcess": {"container_id": TEXT, "exec_id": TEXT, "signal": NUMBER, "all": FLAG},
    **{
        name: {"container_id": TEXT}
        for name in (
            "StartContainer",
            "RemoveContainer",
            "PauseContainer",
            "ResumeContainer",
            "StatsContainer",
            "UpdateContainer",
            "ListProcesses",
        )
    },
    **{
        name: {"container_id": TEXT, "exec_id": TEXT}
        for name in ("WaitProcess", "WriteStdin", "ReadStdout", "ReadStderr", "CloseStdin", "TtyWinResize")
    },
    # A process in the guest itself (capsa debug-console): args joined as a process's are.
    "DebugConsole": {"exec_id": TEXT, "args": TEXT, "env": TEXTS, "terminal": FLAG},
    # A connection to the guest's loopback (CRI PortForward): the port it dials.
    "OpenTcpStream": {"port": NUMBER},
}

#: The CRI's annotation naming a container's image (containerd and CRI-O set it).
IMAGE_ANNOTATION = "io.kubernetes.cri.image-name"


class PolicyError(ValueError):
    """A policy document that cannot be loaded; the message says where and why."""


@dataclass(frozen=True)
class Condition:
    field: str
    kind: str
    patterns: tuple[str, ...] = ()
    flag: bool = False
    numbers: tuple[int, ...] = ()

    def holds(self, view: Mapping[str, Any]) -> bool:
        value = view.get(self.field)
        if self.kind == FLAG:
            return bool(value) is self.flag
        if self.kind == NUMBER:
            return value in self.numbers
        if self.kind == TEXT:
            return _matches(str(value or ""), self.patterns)
        return all(_matches(item, self.patterns) for item in value or ())


def _matches(text: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(text, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Rule:
    name: str
    methods: frozenset[str]
    allow: bool
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: The rule that decided; None: the policy's default.
    rule: str | None

    def refusal(self, method: str) -> str:
        by = f'rule "{self.rule}"' if self.rule is not None else "its default"
        return f"{method} refused by the agent policy ({by})"


@dataclass(frozen=True)
class Policy:
    default_allow: bool = True
    rules: tuple[Rule, ...] = ()
    #: SHA-256 of the document's text ("" for the built-in allow-everything).
    digest: str = ""
    #: The rules that may apply to each method, in order.
    _by_method: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict, compare=False, repr=False)

    def decide(self, method: str, view: Callable[[], Mapping[str, Any]]) -> Decision:
        """The decision on ``method``; ``view`` makes the request's fields, only if a condition needs them."""
        fields: Mapping[str, Any] | None = None
        for rule in self._by_method.get(method, ()):
            if rule.when:
                if fields is None:
                    fields = view()
                if not all(condition.holds(fields) for condition in rule.when):
                    continue
            return Decision(rule.allow, rule.name)
        return Decision(self.default_allow, None)


ALLOW_ALL = Policy()
DENY_ALL = Policy(default_allow=False, digest="deny-all")


def parse(text: bytes | str) -> Policy:
    """Load a policy document; :class:`PolicyError` names the place of any fault."""
    # Only now: the agent starts with no policy to parse on most images (guest start-up is slow under TCG).
    import hashlib
    import tomllib

    raw = text.encode() if isinstance(text, str) else text
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"not valid TOML: {exc}") from exc
    unknown = set(data) - {"version", "default", "rule"}
    if unknown:
        raise PolicyError(f"{sorted(unknown)[0]}: unknown key (known: version, default, rule)")
    if data.get("version") != VERSION:
        raise PolicyError(f"version: expected {VERSION}, got {data.get('version')!r}")
    default = data.get("default", "allow")
    if default not in ACTIONS:
        raise PolicyError(f'default: expected "allow" or "deny", got {default!r}')
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError("rule: expected an array of tables ([[rule]])")
    rules = tuple(_rule(item, f"rule[{n}]") for n, item in enumerate(raw_rules))
    names = [rule.name for rule in rules]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise PolicyError(f'rule "{duplicate}": two rules have this name; each refusal must name one')
    by_method = {method: tuple(rule for rule in rules if method in rule.methods) for method in METHODS}
    return Policy(
        default_allow=default == "allow",
        rules=rules,
        digest=hashlib.sha256(raw).hexdigest(),
        _by_method={method: found for method, found in by_method.items() if found},
    )


def _rule(item: Any, where: str) -> Rule:
    if not isinstance(item, dict):
        raise PolicyError(f"{where}: expected a table")
    unknown = set(item) - {"name", "rpc", "action", "when"}
    if unknown:
        raise PolicyError(f"{where}.{sorted(unknown)[0]}: unknown key (known: name, rpc, action, when)")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}.name: expected a non-empty string")
    where = f'rule "{name}"'
    action = item.get("action")
    if action not in ACTIONS:
        raise PolicyError(f'{where}.action: expected "allow" or "deny", got {action!r}')
    methods = _methods(item.get("rpc"), where)
    when = item.get("when", {})
    if not isinstance(when, dict):
        raise PolicyError(f"{where}.when: expected a table of conditions")
    conditions = tuple(_condition(key, value, methods, f"{where}.when.{key}") for key, value in when.items())
    return Rule(name=name, methods=methods, allow=action == "allow", when=conditions)


def _methods(value: Any, where: str) -> frozenset[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PolicyError(f'{where}.rpc: expected a method name, a list of them, or "*"')
    if "*" in names:
        return frozenset(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise PolicyError(f"{where}.rpc: {unknown[0]}: no such method (agent.proto names them)")
    return frozenset(names)


def _condition(key: str, value: Any, methods: frozenset[str], where: str) -> Condition:
    lacking = sorted(method for method in methods if key not in FIELDS.get(method, {}))
    if lacking:
        raise PolicyError(f"{where}: {lacking[0]} has no field {key!r}")
    kind = FIELDS[next(iter(methods))][key]
    if kind == FLAG:
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: expected true or false")
        return Condition(key, kind, flag=value)
    if kind == NUMBER:
        numbers = [value] if isinstance(value, int) else value
        if not isinstance(numbers, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise PolicyError(f"{where}: expected an integer or a list of integers")
        return Condition(key, kind, numbers=tuple(numbers))
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise PolicyError(f"{where}: expected a glob pattern or a list of them")
    return Condition(key, kind, patterns=tuple(patterns))


# --- the views: a request's fields, as the rules see them -----------------------


def process_view(process: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an OCI "process" object (a container's init, or an exec)."""
    user = _mapping(process.get("user"))
    capabilities = _mapping(process.get("capabilities"))
    return {
        "args": " ".join(str(arg) for arg in process.get("args") or ()),
        "env": [str(item) for item in process.get("env") or ()],
        "cwd": str(process.get("cwd", "")),
        "uid": user.get("uid", 0),
        "gid": user.get("gid", 0),
        "terminal": bool(process.get("terminal", False)),
        "no_new_privileges": bool(process.get("noNewPrivileges", False)),
        "capabilities": [str(cap) for cap in capabilities.get("bounding") or ()],
    }


def container_view(container_id: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a CreateContainer request, from its OCI spec."""
    mounts = [_mapping(m) for m in spec.get("mounts") or ()]
    binds = [m for m in mounts if m.get("type") == "bind" or {"bind", "rbind"} & set(_options(m))]
    annotations = _mapping(spec.get("annotations"))
    linux = _mapping(spec.get("linux"))
    return {
        "container_id": container_id,
        **process_view(_mapping(spec.get("process"))),
        "readonly_rootfs": bool(_mapping(spec.get("root")).get("readonly", False)),
        "image": str(annotations.get(IMAGE_ANNOTATION, "")),
        "annotations": [f"{key}={value}" for key, value in annotations.items()],
        "mount_destinations": [str(m.get("destination", "")) for m in mounts],
        "bind_sources": [str(m.get("source", "")) for m in binds],
        "writable_binds": [str(m.get("destination", "")) for m in binds if "ro" not in _options(m)],
        "namespaces": [str(_mapping(ns).get("type", "")) for ns in linux.get("namespaces") or ()],
    }


def _options(mount: Mapping[str, Any]) -> list[str]:
    options = mount.get("options")
    return [str(option) for option in options] if isinstance(options, list) else []


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(data: bytes) -> Mapping[str, Any]:
    # A request whose JSON does not parse is refused by its handler anyway;
    # the policy sees it as empty, so only rules without conditions match it.
    try:
        return _mapping(json.loads(data))
    except (ValueError, RecursionError):
        return {}


def request_view(method: str, request: Message) -> dict[str, Any]:
    """What the rules for ``method`` see of ``request`` (:data:`FIELDS`)."""
    if isinstance(request, pb.CreateContainerRequest):
        return container_view(request.container_id, _json(request.oci_spec_json))
    if isinstance(request, pb.ExecProcessRequest):
        view = process_view(_json(request.process_json))
        return {"container_id": request.container_id, "exec_id": request.exec_id, **view}
    if isinstance(request, pb.DebugConsoleRequest):
        return {
            "exec_id": request.exec_id,
            "args": " ".join(request.args),
            "env": list(request.env),
            "terminal": request.terminal,
        }
    return {name: getattr(request, name) for name in FIELDS.get(method, {})}


class Enforcer:
    """The policy in force in one agent, and what it refused."""

    def __init__(self, policy: Policy = ALLOW_ALL) -> None:
        self.policy = policy
        #: Refusals by rule name ("default" for the policy's default).
        self.denials: dict[str, int] = {}

    def check(self, method: str, request: Message) -> str | None:
        """None when ``method`` may run; else the refusal, logged and counted."""
        decision = self.policy.decide(method, lambda: request_view(method, request))
        if decision.allowed:
            return None
        rule = decision.rule or "default"
        self.denials[rule] = self.denials.get(rule, 0) + 1
        message = decision.refusal(method)
        log.warning("%s", message)
        return message

    @property
    def denied(self) -> int:
        return sum(self.denials.values())


def load_image_policy(path: str = IMAGE_POLICY_PATH) -> Policy:
    """The policy the guest image carries; allow everything when it has none.

    A policy file that is there but does not load is a broken image: the
    agent then refuses everything (and says why on the console) rather
    than serve with no policy at all.
    """
    try:
        with open(path, "rb") as file:
            text = file.read()
    except FileNotFoundError:
        return ALLOW_ALL
    except OSError as exc:
        log.error("cannot read the image's agent policy %s (%s): refusing every request", path, exc.strerror)
        return DENY_ALL
    try:
        return parse(text)
    except PolicyError as exc:
        log.error("the image's agent policy %s does not load (%s): refusing every request", path, exc)
        return DENY_ALL
