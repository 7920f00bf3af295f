"""``capsa run``: create and start a container, and (unless -d) wait for it.

``capsa [--root DIR] run [--bundle DIR] [--pid-file F] [--console-socket S]
[-d] ID``, as runc.  In the foreground the container's stdio is ours and
its exit status becomes ours (128+N when a signal N killed it); the
container is deleted when it exits.  With ``-d`` it returns once the
container runs, and the container's shim (whose PID goes to
``--pid-file``) stands for it.
"""

from __future__ import annotations

import argparse
from typing import Any

from capsa.cli.context import Context
from capsa.cli.create import add_create_flags, request_from
from capsa.runtime.run import run


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="create and run a container")
    p.add_argument("id", metavar="ID")
    add_create_flags(p)
    p.add_argument("--detach", "-d", action="store_true", help="return once the container runs")
    p.add_argument("--keep", action="store_true", help="accepted for runc compatibility")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    return run(ctx.runtime, request_from(args), detach=args.detach)
