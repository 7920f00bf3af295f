"""``capsa debug-console ID [COMMAND [ARG...]]``: a shell in the container's VM, outside the container.

For diagnosis: the guest's own namespaces, where the agent is PID 1 and
every container's processes, mounts and cgroups can be seen.  Root only,
and off unless the configuration allows it (``[runtime] debug_console``,
when the sandbox was created and now); the agent policy may refuse it
(``DebugConsole``).  Without a command, busybox's interactive shell; with
one, the command runs and its exit status is ours.  A terminal when our
stdin is one, else plain pipes, so ``echo 'uname -r' | capsa debug-console
ID`` works too.  How the shell gets into a guest that has none:
:mod:`capsa.runtime.debug_console`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from capsa.cli.context import Context
from capsa.errors import AgentError, CapsaError
from capsa.proxy.launch import ProxyClient
from capsa.runtime import debug_console
from capsa.runtime.ids import validate_id
from capsa.shim.console import raw_terminal
from capsa.shim.relay import ProcessIO, relay


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="run a shell (or a command) in the container's VM, outside the container")
    p.add_argument("id", metavar="ID")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    debug_console.check_allowed(ctx.config.runtime, os.geteuid())
    container_id = validate_id(args.id)
    ctx.store.load(container_id)  # an unknown container is named as such
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    terminal = os.isatty(0)
    socket_dir = ctx.store.socket_dir(container_id)
    return asyncio.run(_session(socket_dir, ctx.config.agent.request_timeout, command, terminal))


async def _session(socket_dir: Path, request_timeout: float, command: list[str], terminal: bool) -> int:
    proxy = await ProxyClient.connect(socket_dir, request_timeout)
    try:
        exec_id = f"debug-{secrets.token_hex(6)}"
        argv = debug_console.console_argv(command)
        env = debug_console.console_env(terminal, os.environ.get("TERM"))
        try:
            await proxy.agent.debug_console(exec_id, argv, env, terminal)
        except AgentError as exc:
            if debug_console.GUEST_BUSYBOX in str(exc):
                raise CapsaError(
                    f"{exc} (was {debug_console.HOST_BUSYBOX}, of busybox-static, on the host"
                    " when the container was created?)"
                ) from exc
            raise
        io = ProcessIO(terminal=terminal, winsize_fd=0 if terminal else None)
        with raw_terminal(0 if terminal else None):
            return await relay(proxy.agent, "", exec_id, io)
    finally:
        with contextlib.suppress(CapsaError, OSError):
            await proxy.aclose()
