"""``capsa events [--stats] [--interval DURATION] ID``: the container's resource usage.

As runc: with ``--stats`` one ``stats`` event is printed and the command
returns; otherwise one every ``--interval`` (a Go duration such as ``5s``
or ``500ms``; default 5s) until the container stops.  Each line is one
JSON event (:mod:`capsa.runtime.events`); the figures are the container's
cgroup inside the guest.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from capsa.cli.context import Context
from capsa.errors import CapsaError, InvalidArgument
from capsa.runtime import events, lifecycle

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="print a container's resource usage as JSON events")
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
    first = True
    while True:
        try:
            stats = lifecycle.stats(ctx.runtime, args.id)
        except CapsaError:
            # An unknown or stopped container is an error, as runc's; one that
            # stops while we watch ends the stream.
            if args.stats or first:
                raise
            return 0
        first = False
        print(events.encode(events.stats_event(args.id, stats)), end="", flush=True)
        if args.stats:
            return 0
        time.sleep(interval)
