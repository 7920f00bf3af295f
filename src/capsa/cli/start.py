"""``capsa start ID``: start the process of a created container (runtime.md "start")."""

from __future__ import annotations

import argparse
from typing import Any

from capsa.cli.context import Context
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="start a created container")
    p.add_argument("id", metavar="ID")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    lifecycle.start(ctx.runtime, args.id)
    return 0
