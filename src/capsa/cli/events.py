"""``capsa events [--stats] [--interval DURATION] ID``: the container's resource usage and OOM kills.

As runc: with ``--stats`` one ``stats`` event is printed and the command
returns; otherwise one every ``--interval`` (a Go duration such as ``5s``
or ``500ms``; default 5s) and an ``oom`` event whenever the OOM killer takes
a process of the container, until the container stops.  Each line is one
JSON event (:mod:`capsa.runtime.events`); the figures are the container's
cgroup inside the guest.

OOM kills are counted by the guest kernel (the container cgroup's
``memory.events`` ``oom_kill``).  Between two stats events the command
waits in the agent for that count to pass the one it last saw (or for the
container's init to exit), so a kill is printed within the agent's poll
interval (0.5 s), and one that ends the container is printed before the
command returns.  Kills before the command started are not reported, as
with runc.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from capsa.cli.context import Context
from capsa.errors import CapsaError, InvalidArgument
from capsa.runtime import events, lifecycle

#: How long a watcher whose container stopped asks the guest for a kill it has not printed.
LAST_OOM_TIMEOUT = 2.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="print a container's resource usage and OOM kills as JSON events")
    p.add_argument("id", metavar="ID")
    p.add_argument("--stats", action="store_true", help="print one stats event and return")
    p.add_argument("--interval", default="5s", help="time between stats events (default 5s)")
    p.set_defaults(execute=execute)


def parse_duration(text: str) -> float:
    """A Go ``time.ParseDuration`` string (``1m30s``, ``250ms``) in seconds."""
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text) or total <= 0:
        raise InvalidArgument(f"--interval {text!r}: expected a positive duration such as 5s or 500ms")
    return total


def execute(args: argparse.Namespace, ctx: Context) -> int:
    interval = parse_duration(args.interval)
    # An unknown or stopped container is an error, as runc's.
    stats = lifecycle.stats(ctx.runtime, args.id)
    _print(events.stats_event(args.id, stats))
    if args.stats:
        return 0
    seen = stats.oom_kills
    next_stats = time.monotonic() + interval
    while True:
        remaining = next_stats - time.monotonic()
        if remaining > 0:
            try:
                report = lifecycle.wait_oom_kill(ctx.runtime, args.id, seen, remaining)
            except CapsaError:
                return 0  # the VM is gone: so is the container
            if report is None:
                continue
            if report.oom_kills > seen:
                # One event per report, however many kills it covers: runc
                # sends one per change of memory.events, not one per kill.
                _print(events.oom_event(args.id))
                seen = report.oom_kills
            if report.stopped:
                return 0
            continue
        try:
            stats = lifecycle.stats(ctx.runtime, args.id)
        except CapsaError:
            # It stopped while we watched: the stream ends, after the kill
            # that may have stopped it.
            _last_oom(ctx, args.id, seen)
            return 0
        _print(events.stats_event(args.id, stats))
        next_stats = time.monotonic() + interval


def _last_oom(ctx: Context, container_id: str, seen: int) -> None:
    """Print an ``oom`` event if the guest counted a kill after ``seen`` (the container has stopped)."""
    try:
        report = lifecycle.wait_oom_kill(ctx.runtime, container_id, seen, LAST_OOM_TIMEOUT)
    except CapsaError:
        return
    if report is not None and report.oom_kills > seen:
        _print(events.oom_event(container_id))


def _print(event: dict[str, Any]) -> None:
    print(events.encode(event), end="", flush=True)
