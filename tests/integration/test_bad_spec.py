"""The bad specs of issue 16 through ``python -m capsa``: one line naming the field, a non-zero exit, nothing left.

Each was accepted, or died in a traceback, or reached crun in the guest
for its vague "error loading config.json": now the runtime-spec's schema
(runtime/schema) refuses it before the ID is claimed, so no VM boots and
no state directory, socket directory or process remains.  The wider
corpus is tests/unit/test_spec_schema.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa, leftovers, socket_dirs
from test_bad_input import UNKNOWN, assert_refused

from capsa.cli.spec import default_spec

Spec = dict[str, Any]
DEEP = 100_000

ISSUE_CORPUS: list[tuple[str, Callable[[Spec], object], list[str]]] = [
    ("uid-root", lambda s: s["process"]["user"].update(uid="root"), ["process.user.uid:", '"root"']),
    ("uid-minus-1", lambda s: s["process"]["user"].update(uid=-1), ["process.user.uid:", "-1"]),
    ("uid-2**70", lambda s: s["process"]["user"].update(uid=2**70), ["process.user.uid:", str(2**70)]),
    ("uid-1.5", lambda s: s["process"]["user"].update(uid=1.5), ["process.user.uid:", "1.5"]),
    ("capabilities-ALL", lambda s: s["process"].update(capabilities="ALL"), ["process.capabilities:", '"ALL"']),
    (
        "bounding-CAP_NOPE",
        lambda s: s["process"]["capabilities"].update(bounding=["CAP_NOPE"]),
        ["process.capabilities.bounding[0]:", 'unknown capability "CAP_NOPE"'],
    ),
    ("mount-without-destination", lambda s: s["mounts"][0].pop("destination"), ["mounts[0].destination: missing"]),
    ("integer-annotation", lambda s: s.update(annotations={"a": 1}), ["annotations.a:", "expected a string"]),
    (
        "namespace-bogus",
        lambda s: s["linux"]["namespaces"].append({"type": "bogus"}),
        ["linux.namespaces[6].type:", '"bogus"'],
    ),
]


def write(capsa: Capsa, content: str) -> None:
    (capsa.bundle / "config.json").write_text(content)


def assert_nothing_left(capsa: Capsa, container_id: str) -> None:
    assert not (capsa.root / container_id).exists()
    assert leftovers(capsa.root) == []
    assert socket_dirs(capsa.root) == set()


@pytest.mark.parametrize("verb", ["create", "run"])
@pytest.mark.parametrize(("what", "change", "words"), ISSUE_CORPUS, ids=[c[0] for c in ISSUE_CORPUS])
def test_a_bad_spec_is_one_line_naming_the_field(
    capsa: Capsa, verb: str, what: str, change: Callable[[Spec], object], words: list[str]
) -> None:
    spec = default_spec(["true"], terminal=False)
    change(spec)
    write(capsa, json.dumps(spec))
    result = capsa(verb, "--bundle", str(capsa.bundle), "bad")
    assert_refused(result, "config.json: ", *words)
    assert_nothing_left(capsa, "bad")


@pytest.mark.parametrize(
    "content",
    ["[" * DEEP + "]" * DEEP, '{"ociVersion": "1.0.2", "process": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}"],
    ids=["arrays", "objects-in-process"],
)
def test_a_config_nested_100000_deep_is_one_line(capsa: Capsa, content: str) -> None:
    write(capsa, content)
    result = capsa("create", "--bundle", str(capsa.bundle), "deep")
    assert_refused(result, "config.json: nested too deeply")
    assert_nothing_left(capsa, "deep")


def test_a_process_file_nested_100000_deep_is_one_line(capsa: Capsa, tmp_path: Path) -> None:
    process = tmp_path / "process.json"
    process.write_text('{"args": ["sh"], "env": ' + "[" * DEEP + "]" * DEEP + "}")
    result = capsa("exec", "--process", str(process), UNKNOWN)
    assert_refused(result, "--process", "nested too deeply")
