"""The OCI runtime-spec's JSON Schema, and the check of a spec against it.

config.json (and an ``exec --process`` file) is checked on the host against
the runtime-spec's own schema (``config-schema.json`` and the files it
refers to, kept here; README.md says which version and what differs) with
the ``jsonschema`` library, before anything is claimed or started.  The
spec is strict about the types of the fields it knows and open to those it
does not (no ``additionalProperties: false``), so engines that write a newer
spec's fields still pass, while ``"uid": "root"``, a uid of ``2**70`` or an
annotation that is not a string is refused naming the field.

The schema says only that a capability is a string; crun in the guest
looks each name up and, like runc, refuses one it does not know
(config.md "Linux Process": ``capabilities``), so a misspelt name fails
here instead, before a VM boots.

Every refusal is one line: the JSON path of the field, then the problem
(``process.user.uid: expected an integer, got "root"``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from capsa.errors import CapsaError

if TYPE_CHECKING:
    import jsonschema
    from jsonschema.exceptions import ValidationError

#: What crun resolves capability names with, libcap 2.66 (Debian 12), knows
#: every capability of Linux 6.1: 0 (CAP_CHOWN) to 40 (CAP_CHECKPOINT_RESTORE)
#: (capabilities(7); runtime-spec features-linux.md lists the same names).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

#: The schema files, each under its own name: their ``$ref``s name one another so.
SCHEMA_FILES = ("config-schema.json", "config-linux.json", "defs.json", "defs-linux.json")

_CAPABILITY_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_NAMES = {
    "array": "an array",
    "boolean": "a boolean",
    "integer": "an integer",
    "null": "null",
    "number": "a number",
    "object": "an object",
    "string": "a string",
}
_SHOWN_MAX = 60  # characters of a refused value quoted in the message


def check_config(spec: dict[str, Any], prefix: str, error: type[CapsaError]) -> None:
    """config.json against ``config-schema.json``; raise ``error(prefix + "field: problem")`` on the first problem."""
    problem = _first_problem(_validator("config-schema.json"), spec)
    if problem is None:
        process = spec.get("process")
        problem = _unknown_capability(process, "process.") if isinstance(process, dict) else None
    if problem is not None:
        raise error(prefix + problem)


def check_process(process: dict[str, Any], prefix: str, error: type[CapsaError]) -> None:
    """An ``exec --process`` file: the ``process`` of config-schema.json, with its field names as they are in the file.

    The schema requires ``cwd`` (runc's exec does too); capsa's exec has
    always taken a missing one as ``/`` (runtime/bundle.check_process_fields),
    and still does, so it is not required here.
    """
    problem = _first_problem(_validator("config-schema.json#/properties/process"), {"cwd": "/", **process})
    if problem is None:
        problem = _unknown_capability(process, "")
    if problem is not None:
        raise error(prefix + problem)


@cache
def _validator(ref: str) -> jsonschema.Draft4Validator:
    # Imported on first use: only the verbs that read a spec pay for it.
    from jsonschema import Draft4Validator
    from referencing import Registry
    from referencing.jsonschema import DRAFT4

    # The schema declares draft-04 ("$schema" of config-schema.json).
    here = resources.files(__package__)
    registry: Registry[Any] = Registry().with_resources(
        (name, DRAFT4.create_resource(json.loads(here.joinpath(name).read_text(encoding="utf-8"))))
        for name in SCHEMA_FILES
    )
    return Draft4Validator({"$ref": ref}, registry=registry)


def _first_problem(validator: jsonschema.Draft4Validator, instance: Any) -> str | None:
    from jsonschema.exceptions import best_match

    # best_match: the most relevant error, looking inside anyOf/oneOf for the branch that failed.
    error = best_match(validator.iter_errors(instance))
    return None if error is None else describe(error)


def describe(error: ValidationError) -> str:
    """One line for a schema error: the field's JSON path, then what is wrong with its value."""
    where = json_path(error.absolute_path)
    shown = _show(error.instance)
    # Unset only for errors made by hand, never for those a validator yields.
    kind, expected, schema = error.validator, cast(Any, error.validator_value), cast(Any, error.schema)
    if kind == "required":
        names = [name for name in expected if isinstance(error.instance, dict) and name not in error.instance]
        return f"{json_path([*error.absolute_path, names[0] if names else '?'])}: missing"
    if kind == "type":
        wanted = [expected] if isinstance(expected, str) else list(expected)
        return f"{where}: expected {' or '.join(_TYPE_NAMES.get(t, t) for t in wanted)}, got {shown}"
    if kind in ("minimum", "maximum") and isinstance(schema, dict) and {"minimum", "maximum"} <= schema.keys():
        return f"{where}: {shown} is out of range ({schema['minimum']} to {schema['maximum']})"
    if kind == "minimum":
        return f"{where}: {shown} is less than the minimum {expected}"
    if kind == "maximum":
        return f"{where}: {shown} is more than the maximum {expected}"
    if kind == "enum":
        return f"{where}: {shown} is not one of {', '.join(json.dumps(v) for v in expected)}"
    if kind == "pattern":
        return f"{where}: {shown} does not match {expected}"
    if kind == "minItems":
        return f"{where}: needs at least {expected} {'entry' if expected == 1 else 'entries'}"
    return f"{where}: {error.message}"


def json_path(parts: Iterable[str | int]) -> str:
    """``process.user.uid``, ``mounts[2]``, ``annotations["io.kubernetes.pod"]``; the top level is ``(top level)``."""
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"[{json.dumps(part)}]"
    return path or "(top level)"


def _unknown_capability(process: dict[str, Any], prefix: str) -> str | None:
    capabilities = process.get("capabilities")
    if not isinstance(capabilities, dict):
        return None
    known = frozenset(CAPABILITIES)
    for kind in _CAPABILITY_SETS:
        for index, name in enumerate(capabilities.get(kind) or []):
            if name not in known:
                return f"{prefix}capabilities.{kind}[{index}]: unknown capability {_show(name)}"
    return None


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."
