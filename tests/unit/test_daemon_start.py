"""Starting capsa's helpers: a helper that dies before it is ready is reported with its own words.

Its output file lives in the container's state directory, which a failed
``create`` removes, so the reason must travel in the error itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from capsa.errors import CapsaError
from capsa.runtime import daemon


def test_a_helper_that_exits_early_is_reported_with_its_status_and_last_line(tmp_path: Path) -> None:
    with pytest.raises(CapsaError) as caught:
        daemon.start("capsa.proxy", ["--root", str(tmp_path), "--id", "-rf"], output=tmp_path / "out", timeout=30)
    message = str(caught.value)
    assert message.startswith("capsa-proxy exited with status 2 before it was ready: ")
    assert "--id" in message
    assert "\n" not in message


def test_last_line_skips_trailing_blank_lines_and_shortens(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("first\n" + "x" * 500 + "\n\n")
    assert daemon.last_line(out) == "x" * 300
    assert daemon.last_line(tmp_path / "missing") == ""


HELPER = """
import argparse, os, sys
from capsa.runtime.ready import ReadyPipe, wait_go
parser = argparse.ArgumentParser()
parser.add_argument("--marker")
parser.add_argument("--ready-fd", type=int, default=-1)
parser.add_argument("--go-fd", type=int, default=-1)
args = parser.parse_args()
if not wait_go(args.go_fd):
    sys.exit(0)
open(args.marker, "w").close()
ReadyPipe(args.ready_fd).ok()
"""


@pytest.fixture
def helper_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "held_helper.py").write_text(HELPER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(daemon.__file__).parents[2]}")
    return "held_helper"


def test_a_held_helper_does_nothing_until_released(tmp_path: Path, helper_module: str) -> None:
    marker = tmp_path / "acted"
    pending = daemon.spawn(helper_module, ["--marker", str(marker)], output=tmp_path / "out")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            pending.started.process.wait(timeout=0.5)  # it waits for us, alive
        assert not marker.exists()
    finally:
        started = pending.wait_ready(30)
    assert started.process.wait(timeout=30) == 0
    assert marker.exists()


def test_an_abandoned_helper_exits_without_acting(tmp_path: Path, helper_module: str) -> None:
    marker = tmp_path / "acted"
    pending = daemon.spawn(helper_module, ["--marker", str(marker)], output=tmp_path / "out")
    pending.abandon()
    assert pending.started.process.returncode == 0
    assert not marker.exists()
