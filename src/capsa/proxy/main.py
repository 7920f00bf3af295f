"""``capsa-proxy``: started by ``capsa create`` (never by hand), one per VM.

``capsa-proxy --root R --id ID [--hostname H] [--netns PATH] [--config F] [--debug] --ready-fd N``

It reports on file descriptor N once: ``ok`` when ``proxy.sock`` and
``shim.sock`` (in the container's socket directory, runtime/state.py;
proxy/service.py and proxy/shims.py serve them) do, or
the one-line reason it could not start (the caller prints it and cleans up).
With ``--netns``, the VM is on that network namespace's network before ``ok``.
Its own log is ``<root>/<id>/proxy.log``.
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

from capsa.cli.report import setup_logging
from capsa.config import load_config
from capsa.errors import CapsaError
from capsa.proxy.launch import SOCKET_NAME
from capsa.proxy.proxy import Proxy
from capsa.proxy.service import build_server
from capsa.proxy.shims import ShimRelays
from capsa.runtime.ready import ReadyPipe, set_process_name
from capsa.runtime.state import StateStore
from capsa.shim.link import SOCKET_NAME as SHIM_SOCKET_NAME
from capsa.storage.shared import enter_mount_namespace

log = logging.getLogger("capsa.proxy")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capsa-proxy")
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--hostname", default="")
    parser.add_argument("--netns", default="")
    parser.add_argument("--config", default=None)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--ready-fd", type=int, default=-1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_process_name("capsa-proxy")
    store = StateStore(Path(args.root))
    run_dir, socket_dir = store.dir(args.id), store.socket_dir(args.id)
    ready = ReadyPipe(args.ready_fd)
    try:
        setup_logging(str(run_dir / "proxy.log"), "text", args.debug)
        config = load_config(args.config)
        # Before any thread exists: unshare(CLONE_NEWNS) refuses a process
        # whose threads share its filesystem context.
        enter_mount_namespace()
    except CapsaError as exc:
        ready.fail(str(exc))
        return 1
    proxy = Proxy(config, args.id, run_dir, args.hostname, args.debug, socket_dir=socket_dir)
    return asyncio.run(_serve(proxy, ready, args.netns))


async def _serve(proxy: Proxy, ready: ReadyPipe, netns: str = "") -> int:
    shims = ShimRelays(proxy, proxy.socket_dir / SHIM_SOCKET_NAME)
    try:
        await proxy.start()
        await _record_guest_boot(proxy)
        if netns:
            await proxy.attach_network(netns)
        await shims.start()
        listener = await build_server(proxy).serve_unix(str(proxy.socket_dir / SOCKET_NAME))
    except (CapsaError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await proxy.stop()
        await shims.close()
        ready.fail(str(exc))
        return 1
    except BaseException:
        await proxy.stop()
        await shims.close()
        ready.fail("the proxy failed to start (see proxy.log)")
        raise
    if not ready.ok():
        # The create that started us died: it recorded nothing that could stop us.
        log.error("the create that started this proxy is gone: stopping")
        listener.close()
        await proxy.stop()
        await shims.close()
        return 1
    try:
        await proxy.run_until_done()
    finally:
        listener.close()
        await proxy.stop()
        # After the stop, which recorded why the VM stopped: the shims learn it with their status.
        await shims.close()
        _write_timings(proxy.sandbox.timings)
    return 0


async def _record_guest_boot(proxy: Proxy) -> None:
    """For CAPSA_TIMINGS after a cold boot: where the guest's boot went, in its own words (GetGuestDetails).

    Asked only when timings are recorded (bench/boot.py): one more round
    trip.  A clone's figures are its template's boot, so they are not asked.
    """
    timings = proxy.sandbox.timings
    if not os.environ.get("CAPSA_TIMINGS") or "template_restored" in timings:
        return
    with contextlib.suppress(CapsaError):
        details = await proxy.agent.guest_details()
        timings["guest_kernel_boot_s"] = details.kernel_boot_seconds
        timings["guest_agent_start_s"] = details.agent_start_seconds


def _write_timings(timings: dict[str, float]) -> None:
    """For `capsa run`'s CAPSA_TIMINGS (runtime/run.py): the sandbox's phases."""
    target = os.environ.get("CAPSA_TIMINGS")
    if target:
        with contextlib.suppress(OSError), open(f"{target}.proxy", "w") as f:
            json.dump(timings, f)
