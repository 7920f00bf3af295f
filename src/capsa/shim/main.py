"""``capsa-shim``: the host process that stands for one process in the guest.

``capsa-shim --root R --id ID [--exec-id E --process FILE] [--terminal]
[--console-socket PATH] [--new-netns] --ready-fd N``

Started by ``capsa create`` (the container's init) or ``capsa exec`` (an
extra process), never by hand.  Engines treat the PID in ``--pid-file`` as
the container's process: conmon and containerd's runc shim are child
subreapers, so when ``capsa create`` exits the shim becomes their child,
and its exit status is what they report.  Hence the shim:

- keeps the stdio it inherited from ``capsa create``/``exec`` (the engine's
  pipes), or with ``--console-socket`` makes a host pty, sends its master to
  the engine exactly as runc does and relays through the slave side;
- lives exactly as long as the guest process, exits with its status (the
  exit code, or 128+N for signal N; 255 when the VM itself went away), and
  forwards the signals it receives to it.

With ``--new-netns`` (a spec that wants a network namespace of its own
without naming one) the shim lives in a new, empty network namespace:
engines that configure ``/proc/<container pid>/ns/net`` after ``create``
(Docker) configure that one, not the host's, and ``capsa start`` puts the
VM on whatever they put there (:mod:`capsa.network.attach`).

It reaches the agent through ``proxy.sock``; its log is ``shim.log`` (or
``exec-E.log``) in the container's state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capsa.agent import libc
from capsa.cli.report import setup_logging
from capsa.config import load_config
from capsa.errors import AgentError, AgentGone, CapsaError
from capsa.proxy.launch import ProxyClient, read_stopped
from capsa.runtime.daemon import ReadyPipe, set_process_name, wait_go
from capsa.runtime.state import StateStore
from capsa.shim import console
from capsa.shim.relay import VM_LOST_STATUS, ProcessIO, raw_terminal, relay, write_all

log = logging.getLogger("capsa.shim")

CLONE_NEWNET = 0x40000000
#: How long a shim whose VM went away waits for the proxy to finish stopping it.
PROXY_EXIT_TIMEOUT = 10.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capsa-shim")
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-id", default="")
    parser.add_argument("--process", default=None, help="the exec's OCI process JSON")
    parser.add_argument("--terminal", action="store_true")
    parser.add_argument("--console-socket", default=None)
    parser.add_argument("--new-netns", action="store_true")
    parser.add_argument("--config", default=None)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--go-fd", type=int, default=-1, help="wait for one byte here first (runtime/daemon.py)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_process_name("capsa-shim")
    store = StateStore(Path(args.root))
    run_dir = store.dir(args.id)
    ready = ReadyPipe(args.ready_fd)
    try:
        name = f"exec-{args.exec_id}.log" if args.exec_id else "shim.log"
        setup_logging(str(run_dir / name), "text", args.debug)
        config = load_config(args.config)
        process: dict[str, Any] | None = None
        if args.process:
            process = json.loads(Path(args.process).read_text())
        if args.new_netns:
            # Before any thread: unshare moves only the calling thread.
            libc.unshare(CLONE_NEWNET)
    except (CapsaError, OSError, ValueError) as exc:
        ready.fail(str(exc))
        return 1
    if os.getsid(0) != os.getpid():
        os.setsid()  # no signals from the caller's terminal; a session to own a pty
    if not wait_go(args.go_fd):
        return 0  # the create that started us failed: nothing to stand for
    return asyncio.run(serve(store.socket_dir(args.id), args, config.agent.request_timeout, process, ready, run_dir))


async def serve(
    socket_dir: Path,
    args: argparse.Namespace,
    request_timeout: float,
    process: dict[str, Any] | None,
    ready: ReadyPipe,
    run_dir: Path,
) -> int:
    try:
        proxy = await ProxyClient.connect(socket_dir, request_timeout)
    except CapsaError as exc:
        ready.fail(str(exc))
        return 1
    try:
        try:
            if process is not None:
                await proxy.agent.exec_process(args.id, args.exec_id, process)
            io = _process_io(args)
        except CapsaError as exc:
            ready.fail(str(exc))
            return 1
        ready.ok()
        stopped: str | None = None
        with raw_terminal(io.winsize_fd if io.terminal and not args.console_socket else None):
            try:
                return await relay(proxy.agent, args.id, args.exec_id, io)
            except AgentError as exc:
                log.error("lost the process: %s", exc)
                if isinstance(exc, AgentGone):
                    stopped = await _why_the_vm_stopped(proxy, run_dir)
        if stopped is not None:
            # On the process's stderr, which is what the engine shows with its
            # exit status (its container log; `capsa run`'s own stderr).
            log.error("the container's VM stopped: %s", stopped)
            write_all(io.stderr, f"capsa: the container's VM stopped: {stopped}\n".encode())
        return VM_LOST_STATUS
    finally:
        with contextlib.suppress(CapsaError, OSError):
            await proxy.aclose()


async def _why_the_vm_stopped(proxy: ProxyClient, run_dir: Path) -> str | None:
    """What the proxy recorded once its VM stopped by itself (a guest panic...); None when it was asked to stop.

    The proxy writes it as it stops, after the console's last bytes are in
    (proxy/proxy.py), and exits: its end of our connection closing is the
    sign.  A proxy that does not go within the bound leaves nothing to say.
    """
    if not await proxy.wait_gone(PROXY_EXIT_TIMEOUT):
        return None
    return read_stopped(run_dir)


def _process_io(args: argparse.Namespace) -> ProcessIO:
    if args.console_socket:
        master, slave = console.open_pty()
        try:
            console.send_console(args.console_socket, master)
        finally:
            os.close(master)
        console.take_controlling_terminal(slave)
        return ProcessIO(stdin=slave, stdout=slave, stderr=slave, terminal=True, winsize_fd=slave)
    if args.terminal:
        # `capsa run -t` in the foreground: the caller's terminal is ours.
        return ProcessIO(terminal=True, winsize_fd=0 if os.isatty(0) else None)
    return ProcessIO()
