"""guest/buildreport.py: what the guest build scripts tell a person while
they work: progress on a terminal and in a log, and the closing summary.

Like those scripts, which are not part of the capsa package, this puts
guest/ on sys.path to import it. Time is a fake clock: nothing here sleeps.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest"))
import buildreport


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _stages(*, terminal: bool) -> tuple[buildreport.Stages, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    return buildreport.Stages(stream, clock=clock, terminal=terminal), stream, clock


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0.0s"), (0.44, "0.4s"), (52.3, "52.3s"), (59.96, "1m 00s"), (365, "6m 05s"), (3720, "1h 02m")],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert buildreport.format_duration(seconds) == shown


def test_summary_lists_each_step_with_its_time() -> None:
    stages, _stream, clock = _stages(terminal=False)
    with stages.step("configure"):
        clock.now += 3.3
    with stages.step("make"):
        clock.now += 400
    assert stages.summary("kernel 6.1.192-capsa built") == (
        "kernel 6.1.192-capsa built in 6m 43s:\n  configure      3.3s\n  make         6m 40s"
    )


def test_a_step_with_a_detail_announces_itself() -> None:
    stages, stream, clock = _stages(terminal=False)
    clock.now += 1.5
    with stages.step("make", "vmlinux bzImage, -j2"), stages.step("resolve"):
        pass
    assert stream.getvalue() == "[    1.5s] make: vmlinux bzImage, -j2\n"


def _percents(log: str) -> list[int]:
    return [int(line.split(": ")[1].split("%")[0]) for line in log.splitlines()]


def test_a_log_gets_a_line_per_tenth_of_a_step() -> None:
    """Two minutes, 2,000 files: ten lines, not one per file."""
    stages, stream, clock = _stages(terminal=False)
    with stages.progress("make", 2000) as progress:
        for step in range(2000):
            clock.now += 0.0625
            progress.advance(f"CC file{step}.o")
    assert _percents(stream.getvalue()) == list(range(10, 101, 10))
    assert stream.getvalue().splitlines()[0] == "[   12.5s] make: 10% 200/2000 CC file199.o"


def test_a_log_gets_a_line_every_half_minute_of_a_slow_step() -> None:
    """Ten minutes, 2,000 files: a line every 30 s, though a tenth takes a minute."""
    stages, stream, clock = _stages(terminal=False)
    with stages.progress("make", 2000) as progress:
        for step in range(2000):
            clock.now += 0.3
            progress.advance(f"CC file{step}.o")
    assert _percents(stream.getvalue()) == list(range(5, 101, 5))


def test_a_log_gets_no_more_than_a_line_every_five_seconds() -> None:
    stages, stream, clock = _stages(terminal=False)
    with stages.progress("download") as progress:
        for tenth in range(1, 11):
            clock.now += 1
            progress.update(tenth / 10)
    assert _percents(stream.getvalue()) == [50, 100]


def test_a_log_gets_nothing_from_a_quick_step() -> None:
    stages, stream, clock = _stages(terminal=False)
    with stages.progress("unpack", 21) as progress:
        for _ in range(21):
            clock.now += 0.05
            progress.advance("libc6")
    assert stream.getvalue() == ""


def test_a_log_hears_from_a_stalled_step_every_half_minute() -> None:
    stages, stream, clock = _stages(terminal=False)
    with stages.progress("make") as progress:
        for _ in range(95):
            clock.now += 1
            progress.update(0.42, "LD vmlinux")
    assert stream.getvalue().splitlines() == [
        "[    5.0s] make: 42% LD vmlinux",
        "[   35.0s] make: 42% LD vmlinux",
        "[   65.0s] make: 42% LD vmlinux",
        "[   95.0s] make: 42% LD vmlinux",
    ]


def test_a_terminal_gets_one_line_redrawn_at_most_ten_times_a_second() -> None:
    stages, stream, clock = _stages(terminal=True)
    with stages.progress("make") as progress:
        for step in range(1, 101):
            clock.now += 0.03125  # a line from make every 31 ms
            progress.update(step / 100, f"CC file{step}.o")
        drawn = stream.getvalue()
    assert "\n" not in drawn
    frames = drawn.split("\r")[1:]
    assert len(frames) == 25  # 3.1 s: every fourth line, 125 ms apart
    assert frames[-1] == "[    3.1s] make [########################] 100% CC file100.o\x1b[K"
    assert stream.getvalue().endswith("\r\x1b[K")  # the bar is gone when the step ends


def test_bar_line_fits_the_terminal() -> None:
    line = buildreport.bar_line("make", 0.5, "CC drivers/" + "x" * 200 + ".o", 60)
    assert len(line) == 59
    assert line.startswith("make [############------------]  50% CC drivers/xxx")
    assert buildreport.bar_line("make", 0.999, "", 80) == "make [#######################-]  99%"
