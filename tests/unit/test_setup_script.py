"""scripts/setup.sh: the step counter's summary, from its functions.

Sourcing the script defines its functions and runs no step, so these run
as any user, with nothing installed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def _bash(commands: str) -> str:
    done = subprocess.run(
        ["bash", "-c", f'source "{SETUP}"\n{commands}'], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stderr == ""
    return done.stdout


def test_sourcing_runs_nothing() -> None:
    assert _bash("echo sourced") == "sourced\n"


@pytest.mark.parametrize(
    ("microseconds", "shown"),
    [
        (0, "0.0s"),
        (440_000, "0.4s"),
        (52_300_000, "52.3s"),
        (59_960_000, "1m 00s"),
        (365_000_000, "6m 05s"),
        (3_720_000_000, "1h 02m"),
    ],
)
def test_duration_matches_the_guest_builders(microseconds: int, shown: str) -> None:
    assert _bash(f"duration {microseconds}") == shown


def test_summary_lists_each_step_with_its_time() -> None:
    summary = _bash(
        'done_names=("Debian packages" "guest kernel" "guest image")\n'
        "done_us=(300000 425000000 1300000)\n"
        "summary 427000000"
    )
    assert summary == (
        "==> setup done in 7m 07s\n"
        "    Debian packages      0.3s\n"
        "    guest kernel       7m 05s\n"
        "    guest image          1.3s\n"
    )


def test_a_failed_step_is_named() -> None:
    done = subprocess.run(
        [
            "bash",
            "-c",
            f'source "{SETUP}"\ncurrent="[4/6] guest kernel"; current_start=$(( $(now_us) - 3000000 ))\n'
            "report_failure 1; report_failure 0; current=''; report_failure 1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert re.fullmatch(r"setup\.sh: \[4/6\] guest kernel failed after 3\.\ds \(exit 1\)\n", done.stderr)
