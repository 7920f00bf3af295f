"""``capsa ps [--format table|json] ID``: the container's processes.

The PIDs are the guest's (the processes live in the VM, not on the host);
``--format json`` prints them as a JSON array, which is what containerd's
runc shim reads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from capsa.cli.context import Context
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="list the processes of a container")
    p.add_argument("id", metavar="ID")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    pids = lifecycle.processes(ctx.runtime, args.id)
    if args.format == "json":
        print(json.dumps(pids))
    else:
        print("PID")
        for pid in pids:
            print(pid)
    return 0
