"""Starting capsa's helpers: a helper that dies before it is ready is reported with its own words.

Its output file lives in the container's state directory, which a failed
``create`` removes, so the reason must travel in the error itself.
"""

from __future__ import annotations

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
