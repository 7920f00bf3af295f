"""What the guest build scripts tell a person while they work, on stderr.

Shared by ``guest/kernel/build.py`` and ``guest/image/build.py`` (and by
``guest/buildcache.py``, whose lock says when it waits): one line per
stage with the time since the run started (:class:`Stages`); while a long
step runs, how far it is (:class:`Progress`): on a terminal a bar redrawn
in place, elsewhere (a CI log, a pipe) an ordinary line now and then
(:class:`Pace`); and at the end where the time went (:func:`format_summary`).

Standard library only, like the scripts.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

#: Progress on a terminal is redrawn at most this often.
TERMINAL_REDRAW_SECONDS = 0.1
#: Elsewhere (a CI log, a pipe) a progress line is written when another
#: LOG_STEP_PERCENT is done, but no sooner than LOG_MIN_SECONDS after the
#: last one (a quick step writes none), and after LOG_MAX_SECONDS without
#: one in any case, to show the build is alive.
LOG_STEP_PERCENT = 10
LOG_MIN_SECONDS = 5.0
LOG_MAX_SECONDS = 30.0
#: Width of the bar, in characters.
BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``0.4s``, ``52.3s``, ``6m 05s``, ``1h 02m``: as precise as a person
    reading a summary cares."""
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_summary(title: str, timings: Sequence[tuple[str, float]], total: float) -> str:
    """Where a run's time went: a title line, then one line per step."""
    width = max((len(name) for name, _ in timings), default=0)
    lines = [f"{title} in {format_duration(total)}:"]
    lines += [f"  {name:<{width}}  {format_duration(seconds):>8}" for name, seconds in timings]
    return "\n".join(lines)


def percent(fraction: float) -> int:
    """Whole percent, rounded down: 100 only when all is done."""
    return int(fraction * 100 + 1e-9)


def bar_line(task: str, fraction: float, detail: str, columns: int) -> str:
    """The one line a terminal shows while a step runs, cut to fit."""
    filled = min(BAR_WIDTH, int(fraction * BAR_WIDTH))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return f"{task} [{bar}] {percent(fraction):3d}% {detail}".rstrip()[: max(columns - 1, 0)]


class Pace:
    """When the next progress report is due.

    Never sooner than ``min_seconds`` after the last one. With ``step_percent``,
    only when the fraction done has reached another multiple of it, or when
    ``max_seconds`` have passed since the last report; without, every time.
    """

    def __init__(
        self, start: float, *, min_seconds: float, step_percent: int | None = None, max_seconds: float | None = None
    ) -> None:
        self._last = start
        self._min_seconds = min_seconds
        self._step_percent = step_percent
        self._max_seconds = max_seconds
        self._reported_steps = 0

    @classmethod
    def for_terminal(cls, start: float) -> Pace:
        return cls(start, min_seconds=TERMINAL_REDRAW_SECONDS)

    @classmethod
    def for_log(cls, start: float) -> Pace:
        return cls(start, min_seconds=LOG_MIN_SECONDS, step_percent=LOG_STEP_PERCENT, max_seconds=LOG_MAX_SECONDS)

    def due(self, now: float, fraction: float) -> bool:
        waited = now - self._last
        if waited < self._min_seconds:
            return False
        if self._step_percent is not None:
            steps = percent(fraction) // self._step_percent
            stalled = self._max_seconds is not None and waited >= self._max_seconds
            if steps <= self._reported_steps and not stalled:
                return False
            self._reported_steps = max(steps, self._reported_steps)
        self._last = now
        return True


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` can have a line redrawn in place."""
    return stream.isatty() and os.environ.get("TERM", "dumb") != "dumb"


class Stages:
    """What a build script tells a person, on stderr: one line per stage,
    with the time since the run started; progress while a long step runs
    (:meth:`progress`); and a summary of where the time went
    (:meth:`step`, :meth:`summary`).

    ``stream``, ``clock`` and ``terminal`` are there for tests; by default
    stderr, the monotonic clock, and whether stderr is a terminal.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.timings: list[tuple[str, float]] = []
        self._start = clock()
        self._drawn = False

    def elapsed(self) -> float:
        return self.clock() - self._start

    def say(self, message: str) -> None:
        self.clear()
        print(f"[{self.elapsed():7.1f}s] {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, name: str, detail: str | None = None) -> Iterator[None]:
        """Time one step for the summary; say ``name: detail`` as it starts
        if there is a detail (steps that every cached run takes say nothing)."""
        if detail is not None:
            self.say(f"{name}: {detail}" if detail else name)
        started = self.clock()
        yield
        self.timings.append((name, self.clock() - started))

    @contextlib.contextmanager
    def progress(self, task: str, total: int | None = None) -> Iterator[Progress]:
        """Report how far ``task`` is while the block runs; the bar is gone
        when it ends, however it ends."""
        progress = Progress(self, task, total)
        try:
            yield progress
        finally:
            self.clear()

    def summary(self, title: str) -> str:
        return format_summary(title, self.timings, self.elapsed())

    def draw(self, text: str) -> None:
        """Replace the line being drawn (terminal only)."""
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, io.UnsupportedOperation):
            return 80


class Progress:
    """How far one long step is: on a terminal a bar redrawn in place, with
    the percentage and the current item; elsewhere an ordinary line now and
    then (:class:`Pace`), so that a CI log shows the build moving without a
    line per file."""

    def __init__(self, stages: Stages, task: str, total: int | None = None) -> None:
        self._stages = stages
        self._task = task
        self._total = total
        self._done = 0
        start = stages.clock()
        self._pace = Pace.for_terminal(start) if stages.terminal else Pace.for_log(start)

    def advance(self, detail: str = "", count: int = 1) -> None:
        """``count`` more of the ``total`` items are done."""
        if not self._total:
            raise ValueError("advance() needs the total given to progress()")
        self._done += count
        self.update(self._done / self._total, f"{self._done}/{self._total} {detail}".rstrip())

    def update(self, fraction: float, detail: str = "") -> None:
        """``fraction`` (0 to 1) is done; ``detail`` says what is going on."""
        if not self._pace.due(self._stages.clock(), fraction):
            return
        if self._stages.terminal:
            prefix = f"[{self._stages.elapsed():7.1f}s] "
            columns = self._stages.columns() - len(prefix)
            self._stages.draw(prefix + bar_line(self._task, fraction, detail, columns))
        else:
            self._stages.say(f"{self._task}: {percent(fraction)}% {detail}".rstrip())
