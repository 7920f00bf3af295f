"""``capsa delete [--force] ID``: stop the container's VM and forget it.

A stopped or created container is deleted as is; a running or paused one
only with ``--force`` (its processes get SIGKILL first).  As runc,
``--force`` of a container that does not exist succeeds.  ``poststop``
hooks run on the host afterwards.
"""

from __future__ import annotations

import argparse
from typing import Any

from capsa.cli.context import Context
from capsa.errors import ContainerNotFound
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="delete a container and its VM")
    p.add_argument("id", metavar="ID")
    p.add_argument("--force", "-f", action="store_true", help="kill a running container first")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    try:
        lifecycle.delete(ctx.runtime, args.id, force=args.force)
    except ContainerNotFound:
        # runc: deleting a container that is already gone is no error with
        # --force, so that an engine's cleanup can be repeated.
        if not args.force:
            raise
    return 0
