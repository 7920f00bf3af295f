"""``capsa run``: create and start a container, and (unless -d) wait for it.

``capsa [--root DIR] run [--bundle DIR] [--pid-file F] [-d] ID``, as runc.
In the foreground the container's stdio is ours and its exit status becomes
ours (128+N when a signal N killed it).  With ``-d`` a child process keeps
the VM and stands for the container (its PID goes to ``--pid-file``), and
``capsa run`` returns once the container runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from capsa.cli.context import Context
from capsa.errors import CapsaError
from capsa.runtime.bundle import load_bundle
from capsa.runtime.ids import validate_id
from capsa.runtime.run import RunRequest, run


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="create and run a container")
    p.add_argument("id", metavar="ID")
    p.add_argument("--bundle", "-b", default=None, help="path to the bundle (default: current directory)")
    p.add_argument("--pid-file", default=None, help="write the PID standing for the container here")
    p.add_argument("--detach", "-d", action="store_true", help="return once the container runs")
    p.add_argument("--console-socket", default=None, help="unix socket to receive the pty master")
    p.add_argument("--no-pivot", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--no-new-keyring", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--preserve-fds", type=int, default=0, help="accepted for runc compatibility")
    p.add_argument("--keep", action="store_true", help="accepted for runc compatibility")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    container_id = validate_id(args.id)
    if args.console_socket:
        raise CapsaError("run --console-socket is not supported yet: use create/start")
    config = ctx.config
    bundle = load_bundle(args.bundle or os.getcwd())
    request = RunRequest(
        container_id=container_id,
        bundle=bundle,
        pid_file=Path(args.pid_file).absolute() if args.pid_file else None,
        debug=ctx.debug or config.runtime.debug,
    )
    if args.detach:
        return _run_detached(ctx, request)
    return run(config, ctx.store, request)


def _run_detached(ctx: Context, request: RunRequest) -> int:
    """Fork a keeper for the VM; return when it says the container runs (or why not)."""
    config = ctx.config  # loaded (and checked) before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the keeper
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

        def started() -> None:
            os.write(write_end, b"\n")

        request.on_started = started
        code = 1
        try:
            code = run(config, ctx.store, request)
        except CapsaError as exc:
            os.write(write_end, f"{exc}\n".encode())
        except BaseException as exc:  # the keeper must never unwind into the caller's code
            os.write(write_end, f"internal error: {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.readline()
    if line == b"\n":
        return 0
    message = line.decode(errors="replace").strip() or "the container exited before it started"
    os.waitpid(pid, 0)
    raise CapsaError(message)
