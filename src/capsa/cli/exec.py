"""``capsa exec``: run another process in a container.

``capsa exec [--process FILE | ARGS...] [--tty] [--console-socket S]
[--detach] [--pid-file F] [--cwd DIR] [--env K=V]... [--user UID[:GID]] ID``,
as runc.  Without ``--process`` the new process starts from the
container's own ``process`` (environment, user, capabilities...) with the
given arguments and flags over it, as runc does.  In the foreground the
exit status is the process's.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from capsa.cli.context import Context
from capsa.errors import InvalidArgument
from capsa.runtime import execs, lifecycle
from capsa.runtime.bundle import check_process_fields, parse_json_object
from capsa.runtime.schema import check_process


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="run a new process in a running container")
    p.add_argument("id", metavar="ID")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.add_argument("--process", "-p", default=None, help="the process as an OCI process JSON file")
    p.add_argument("--tty", "-t", action="store_true", help="allocate a pseudo-TTY")
    p.add_argument("--console-socket", default=None, help="unix socket that receives the pty master")
    p.add_argument("--detach", "-d", action="store_true", help="return once the process runs")
    p.add_argument("--pid-file", default=None, help="write the PID standing for the process here")
    p.add_argument("--cwd", default=None, help="working directory in the container")
    p.add_argument("--env", "-e", action="append", default=[], help="set an environment variable")
    p.add_argument("--user", "-u", default=None, help="UID[:GID] to run as")
    p.add_argument("--additional-gids", "-g", action="append", default=[], help="additional group IDs")
    p.add_argument("--no-new-privs", action="store_true", help="set no_new_privileges")
    p.add_argument("--cap", "-c", action="append", default=[], help="add a capability")
    p.add_argument("--apparmor", default=None, help="accepted for runc compatibility")
    p.add_argument("--process-label", default=None, help="accepted for runc compatibility")
    p.add_argument("--preserve-fds", type=int, default=0, help="must be 0: not across a VM")
    p.add_argument("--ignore-paused", action="store_true", help="accepted for runc compatibility")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    if args.preserve_fds:
        raise InvalidArgument("--preserve-fds: file descriptors cannot be passed into a container in a VM")
    # From the first moment, as runc: a signal while the process is read,
    # checked and started goes to it once it runs.
    with execs.SignalRelay() as relay:
        request = execs.ExecRequest(
            container_id=args.id,
            process=_process(args, ctx),
            detach=args.detach,
            pid_file=Path(args.pid_file).absolute() if args.pid_file else None,
            console_socket=args.console_socket,
        )
        shim = execs.start_exec(ctx.runtime, request)
        if args.detach:
            relay.to(shim.pid)
            return 0
        return execs.wait_foreground(shim, relay)


def _process(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    if args.process:
        return load_process(Path(args.process))
    command = [a for a in args.command if a != "--"] if args.command else []
    if not command:
        raise InvalidArgument("exec: give a command, or --process FILE")
    base = copy.deepcopy(lifecycle.container_spec(ctx.runtime, args.id).get("process") or {})
    process = build_process(base, command, args)
    # What the flags put there (--user 4294967296, --cap CAP_NOPE, --cwd tmp) is checked as a --process file is.
    check_process(process, "exec: ", InvalidArgument)
    check_process_fields(process, "exec: ", InvalidArgument)
    return process


def build_process(base: dict[str, Any], command: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """runc's exec: the container's process, with the command and flags over it."""
    process = dict(base)
    process["args"] = command
    process["terminal"] = bool(args.tty)
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = [*process.get("env", []), *args.env]
    if args.user:
        uid, _, gid = args.user.partition(":")
        try:
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise InvalidArgument(f"--user {args.user!r}: expected UID[:GID] as numbers") from None
    if args.additional_gids:
        user = process.setdefault("user", {"uid": 0, "gid": 0})
        try:
            user["additionalGids"] = [int(g) for g in args.additional_gids]
        except ValueError:
            raise InvalidArgument("--additional-gids: expected numbers") from None
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    if args.cap:
        caps = process.setdefault("capabilities", {})
        for kind in ("bounding", "effective", "permitted"):
            caps[kind] = sorted({*caps.get(kind, []), *args.cap})
    process.pop("consoleSize", None)
    return process


def load_process(path: Path) -> dict[str, Any]:
    """The OCI process of ``--process``: checked as config.json's ``process`` is (runtime/schema)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(f"--process {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"--process {path}: cannot read: {exc}") from exc
    prefix = f"--process {path}: "
    process = parse_json_object(text, prefix, InvalidArgument)
    check_process(process, prefix, InvalidArgument)
    check_process_fields(process, prefix, InvalidArgument)
    return process
