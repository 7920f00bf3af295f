"""``capsa state ID``: the OCI state of a container as JSON (runtime.md "State")."""

from __future__ import annotations

import argparse
import json
from typing import Any

from capsa.cli.context import Context
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="print a container's state as JSON")
    p.add_argument("id", metavar="ID")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    print(json.dumps(lifecycle.state_of(ctx.runtime, args.id), indent=2))
    return 0
