"""``capsa kill [--all] ID [SIGNAL]``: signal a container's process (default SIGTERM).

SIGNAL is a number or a name with or without ``SIG`` (runc's rules,
:mod:`capsa.cli.signals`).  ``--all`` signals every process of the
container.
"""

from __future__ import annotations

import argparse
from typing import Any

from capsa.cli.context import Context
from capsa.cli.signals import parse_signal
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="send a signal to a container's process")
    p.add_argument("id", metavar="ID")
    p.add_argument("signal", nargs="?", default="SIGTERM", metavar="SIGNAL")
    p.add_argument("--all", "-a", action="store_true", help="signal every process of the container")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    signum = parse_signal(args.signal)
    lifecycle.kill(ctx.runtime, args.id, signum, all_processes=args.all)
    return 0
