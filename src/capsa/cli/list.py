"""``capsa list [--format table|json] [--quiet]`` (alias ``ls``): every container under --root."""

from __future__ import annotations

import argparse
import json
from typing import Any

from capsa.cli.context import Context
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, aliases=["ls"], help="list containers")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the IDs")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    states = lifecycle.list_states(ctx.runtime)
    if args.quiet:
        for state in states:
            print(state["id"])
    elif args.format == "json":
        # runc encodes its empty list of containers as Go's nil slice: null.
        print(json.dumps(states or None))
    else:
        print(table(states))
    return 0


def table(states: list[dict[str, Any]]) -> str:
    """runc's columns, aligned as its tabwriter does (padding 3)."""
    rows = [["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]]
    rows += [[s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]] for s in states]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "".join(cell.ljust(width + 3) for cell, width in zip(row, widths, strict=False)) + row[-1] for row in rows
    )
