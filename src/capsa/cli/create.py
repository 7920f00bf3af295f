"""``capsa create``: boot the container's VM and make its process, but do not start it.

``capsa create [--bundle DIR] [--pid-file F] [--console-socket S] [--no-pivot]
[--no-new-keyring] [--preserve-fds N] ID``, as runc.  Returns once the
container is ``created``: its proxy and VM run, and its shim (whose PID goes
to ``--pid-file``) holds the stdio this command was given.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from capsa.cli.context import Context
from capsa.runtime import lifecycle


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="create a container (boot its VM; the process waits for start)")
    p.add_argument("id", metavar="ID")
    add_create_flags(p)
    p.set_defaults(execute=execute)


def add_create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", "-b", default=None, help="path to the bundle (default: current directory)")
    p.add_argument("--pid-file", default=None, help="write the PID standing for the container here")
    p.add_argument("--console-socket", default=None, help="unix socket that receives the pty master")
    p.add_argument("--no-pivot", action="store_true", help="accepted for runc compatibility (the guest decides)")
    p.add_argument("--no-new-keyring", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--preserve-fds", type=int, default=0, help="extra file descriptors (must be 0: not across a VM)")


def request_from(args: argparse.Namespace, foreground: bool = False) -> lifecycle.CreateRequest:
    return lifecycle.CreateRequest(
        container_id=args.id,
        bundle=Path(args.bundle or os.getcwd()),
        pid_file=Path(args.pid_file).absolute() if args.pid_file else None,
        console_socket=args.console_socket,
        preserve_fds=args.preserve_fds,
        foreground=foreground,
    )


def execute(args: argparse.Namespace, ctx: Context) -> int:
    lifecycle.create(ctx.runtime, request_from(args))
    return 0
