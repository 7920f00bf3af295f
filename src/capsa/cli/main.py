"""The ``capsa`` command line: runc's global flags, one module per verb.

Engines call an OCI runtime as ``RUNTIME [global flags] VERB [flags] ID``
(runc's contract).  This module parses the global part, hands the rest to the
verb's module, and turns every :class:`~capsa.errors.CapsaError` into one
line on stderr and a non-zero exit status.  A traceback reaches the user only
for a genuine bug, and even then ``--debug`` is needed to see it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from capsa import __version__
from capsa.cli import (
    check,
    create,
    debug_console,
    delete,
    env,
    events,
    features,
    kill,
    pause,
    ps,
    run,
    spec,
    start,
    state,
    update,
    version,
)
from capsa.cli import exec as exec_
from capsa.cli import list as list_
from capsa.cli.context import Context
from capsa.cli.report import report_error, setup_logging
from capsa.errors import CapsaError

VERBS: dict[str, ModuleType] = {
    "create": create,
    "start": start,
    "state": state,
    "kill": kill,
    "delete": delete,
    "exec": exec_,
    "ps": ps,
    "list": list_,
    "pause": pause,
    "resume": pause,
    "update": update,
    "events": events,
    "run": run,
    "spec": spec,
    "env": env,
    "check": check,
    "version": version,
    "features": features,
    "debug-console": debug_console,
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a CapsaError like any other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class UsageError(CapsaError):
    exit_code = 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="capsa", description="Run OCI containers, each in its own lightweight VM.")
    parser.add_argument("--root", default=None, help="state directory (default /run/capsa)")
    parser.add_argument("--log", default=None, help="also write log messages to this file")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--config", default=None, help="configuration file (default /etc/capsa/configuration.toml)")
    parser.add_argument(
        "--systemd-cgroup",
        action="store_true",
        help="cgroupsPath is slice:prefix:name (the host cgroup is made where systemd would put the scope)",
    )
    parser.add_argument("--version", "-v", action="version", version=f"capsa version {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)
    verbs.required = True
    for name, module in VERBS.items():
        module.add_parser(verbs, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log_format = "json" if _flag_value(argv, "--log-format") == "json" else "text"
    # A log line that cannot be written (the --log file on a full disk) is
    # lost, not turned into a traceback on stderr.
    logging.raiseExceptions = False
    logging_ready = False
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.log, args.log_format, args.debug)
        logging_ready = True
        ctx = Context.from_args(args)
        code: int = args.execute(args, ctx)
        return code
    except CapsaError as exc:
        return _fail(str(exc), exc.exit_code, argv, log_format, logging_ready)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `capsa list | head`: the reader left; so do we, quietly, as a Unix tool does.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # Should have been a CapsaError where it happened; still one line (a full disk, a vanished file).
        logging.getLogger("capsa").debug("uncaught OSError", exc_info=True)
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        return _fail(message, 1, argv, log_format, logging_ready)
    except Exception as exc:
        # A bug: one line all the same; --debug shows the traceback.
        logging.getLogger("capsa").debug("internal error", exc_info=True)
        message = " ".join(f"internal error: {type(exc).__name__}: {exc}".split())
        return _fail(message, 1, argv, log_format, logging_ready)


def _fail(message: str, code: int, argv: list[str], log_format: str, logging_ready: bool) -> int:
    """Report ``message`` as the one error line (and in the log); return the exit status ``code``."""
    if not logging_ready:
        # A usage error (say, a flag an engine passes that we lack) comes
        # before the log is set up; containerd reads the error from the log.
        with contextlib.suppress(CapsaError):
            setup_logging(_flag_value(argv, "--log"), log_format, False)
    report_error(message, log_format)
    return code


def _flag_value(argv: list[str], flag: str) -> str | None:
    """A global flag's value, read before parsing so that parse errors use it."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
