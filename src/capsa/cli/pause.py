"""``capsa pause ID`` / ``capsa resume ID``: freeze and thaw a container's processes.

The container's cgroup in the guest is frozen (crun pause); the VM runs on.
"""

from __future__ import annotations

import argparse
from typing import Any

from capsa.cli.context import Context
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help=f"{name} every process of a container")
    p.add_argument("id", metavar="ID")
    p.set_defaults(execute=execute_pause if name == "pause" else execute_resume)


def execute_pause(args: argparse.Namespace, ctx: Context) -> int:
    lifecycle.pause(ctx.runtime, args.id)
    return 0


def execute_resume(args: argparse.Namespace, ctx: Context) -> int:
    lifecycle.resume(ctx.runtime, args.id)
    return 0
