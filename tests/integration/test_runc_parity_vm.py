"""The same bundle under runc 1.1 and under capsa: where a VM can behave as runc does, it does.

Each case runs one bundle with the host's runc and with capsa (a real VM)
and compares what a user sees: the exit status, the output, and for a
refusal that both refuse, with capsa's one line naming the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa

pytestmark = pytest.mark.vm

RUNC = shutil.which("runc")


def runc_run(capsa: Capsa, tmp_path: Path, cid: str) -> subprocess.CompletedProcess[str]:
    if RUNC is None:
        pytest.skip("runc is not installed")
    root = tmp_path / "runc-root"
    try:
        return subprocess.run(
            [RUNC, "--root", str(root), "run", "--bundle", str(capsa.bundle), cid],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run([RUNC, "--root", str(root), "delete", "--force", cid], capture_output=True, timeout=30)


def edit_spec(capsa: Capsa, change: Any) -> None:
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    change(spec)
    config.write_text(json.dumps(spec))


def test_kernel_memory_limits_are_ignored_with_a_warning_as_runc_does(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["echo", "ran"])

    def limits(spec: dict[str, Any]) -> None:
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": 256 << 20, "kernel": 64 << 20}

    edit_spec(capsa, limits)
    by_runc = runc_run(capsa, tmp_path, "kmem-runc")
    by_capsa = capsa.run("kmem-capsa")
    assert (by_capsa.code, by_capsa.stdout) == (by_runc.returncode, by_runc.stdout) == (0, "ran\n"), by_capsa.stderr
    assert "memory.kernel ignored" in by_capsa.stderr and "Traceback" not in by_capsa.stderr


def test_a_namespace_path_of_the_wrong_type_is_refused_as_runc_refuses_it(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["echo", "ran"])
    uts = f"/proc/{os.getpid()}/ns/uts"

    def wrong_type(spec: dict[str, Any]) -> None:
        spec["linux"]["namespaces"] = [
            {"type": "ipc", "path": uts} if ns["type"] == "ipc" else ns for ns in spec["linux"]["namespaces"]
        ]

    edit_spec(capsa, wrong_type)
    by_runc = runc_run(capsa, tmp_path, "ns-runc")
    by_capsa = capsa.run("ns-capsa")
    assert by_runc.returncode != 0 and "ran" not in by_runc.stdout
    assert by_capsa.code != 0 and "ran" not in by_capsa.stdout
    refusal = by_capsa.stderr.strip()
    assert refusal.endswith(f"linux.namespaces: ipc namespace path {uts} is a uts namespace"), refusal
    assert len(refusal.splitlines()) == 1
