"""``capsa update``'s command line: runc's flags and --resources FILE|- into one OCI linux.resources."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest

from capsa.cli import update
from capsa.errors import InvalidArgument

MiB = 1 << 20


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    update.add_parser(parser.add_subparsers(), "update")
    return parser.parse_args(["update", *argv])


def resources(*argv: str, stdin: bytes = b"") -> dict[str, Any]:
    return update.resources_from_args(parse(*argv), io.BytesIO(stdin))


def test_runc_flags() -> None:
    assert resources("--memory", "512m", "--cpu-quota", "50000", "--cpu-period=100000", "--pids-limit", "64", "c1") == {
        "memory": {"limit": 512 * MiB},
        "cpu": {"quota": 50000, "period": 100000},
        "pids": {"limit": 64},
    }
    assert resources("c1") == {}


def test_resources_from_stdin_as_containerd_sends_them() -> None:
    body = {"memory": {"limit": 256 * MiB}, "cpu": {"shares": 1024, "cpus": "0"}, "pids": {"limit": 10}}
    assert resources("--resources", "-", "c1", stdin=json.dumps(body).encode()) == body


def test_resources_from_a_file_as_conmon_names_it(tmp_path: Path) -> None:
    path = tmp_path / "resources.json"
    path.write_text(json.dumps({"memory": {"limit": 1 << 30, "swap": 2 << 30}}))
    # Flags are laid over the file.
    assert resources(f"--resources={path}", "--memory", "512m", "c1") == {
        "memory": {"limit": 512 * MiB, "swap": 2 << 30}
    }


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (("-r", "-", "c1"), b"{", "standard input: not valid JSON"),
        (("-r", "-", "c1"), b"[]", "JSON object"),
        (("-r", "-", "c1"), b'{"memory": {"limit": "1g"}}', "memory.limit must be an integer"),
        (("-r", "/nonexistent/r.json", "c1"), b"", "/nonexistent/r.json: No such file"),
        (("--memory", "much", "c1"), b"", "--memory"),
        (("--l3-cache-schema", "L3:0=f", "c1"), b"", "Intel RDT"),
    ],
)
def test_bad_input_is_one_clear_error(argv: tuple[str, ...], stdin: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        resources(*argv, stdin=stdin)


def test_obsolete_kernel_memory_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert resources("--kernel-memory", "10m", "c1") == {}
    assert "--kernel-memory is ignored" in caplog.text
