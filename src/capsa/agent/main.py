"""capsa-agent's entry point: PID 1 of the guest, or a plain process on a host.

As PID 1 (the guest's /init calls :func:`main`): mount the API filesystems,
read the kernel command line, reap orphans, serve the agent channel, and
power the VM off after DestroySandbox.  If anything escapes, the traceback
goes to the console first; PID 1 then exits, the kernel panics and QEMU
(``panic=-1 -no-reboot``) exits, which the host sees as the VM dying.

Not as PID 1 (``os.getpid() != 1``): no mounts, no power-off; ``--listen
unix:PATH`` serves the same service on a unix socket so tests can drive it
over a real ttrpc connection.

Startup is on the critical path of every ``capsa run``: only what serving
needs is imported here, and nothing is spawned before the channel is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import TextIO

from capsa.agent import channel
from capsa.agent.options import AgentOptions, from_argv, from_kernel_cmdline
from capsa.agent.policy import Enforcer, load_image_policy
from capsa.agent.reaper import Reaper
from capsa.agent.sandbox import Sandbox
from capsa.agent.service import AgentService, Timing
from capsa.ttrpc.server import Server

log = logging.getLogger("capsa.agent")

# How long the power-off waits for the DestroySandbox reply to leave.
FLUSH_TIMEOUT_SECONDS = 2.0
#: What a renewed agent re-executes (the guest image's /init), and the
#: variable that tells the new process it is one, and how many came before.
INIT_PATH = "/init"
RENEWALS_ENV = "CAPSA_AGENT_RENEWALS"


class _UptimeFormatter(logging.Formatter):
    """Prefix records with CLOCK_BOOTTIME, the clock of the kernel's printk stamps."""

    def format(self, record: logging.LogRecord) -> str:
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
        return f"[{uptime:12.6f}] capsa-agent: {record.levelname.lower()}: {super().format(record)}"


def _configure_logging(stream: TextIO, debug: bool) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_UptimeFormatter("%(message)s"))
    root = logging.getLogger("capsa")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    root.propagate = False


def _process_start_uptime() -> float:
    """Seconds after boot at which this process started (proc(5) stat field 22).

    Right for a process a shell or test forked and exec'd at once; not for
    PID 1, which the kernel started as a thread long before /init.
    """
    with open("/proc/self/stat", encoding="ascii") as file:
        stat = file.read()
    # The command name (field 2) may contain spaces; fields resume after ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


async def serve(
    options: AgentOptions, timing: Timing, policy: Enforcer | None = None, renewals: int | None = None
) -> bool:
    """Serve the agent API until DestroySandbox (False) or RenewAgent (True), or until cancelled.

    ``renewals`` (the guest's: how often this agent was renewed so far)
    lets it renew; None (a host's agent): RenewAgent is refused.
    """
    loop = asyncio.get_running_loop()
    reaper = Reaper(loop)
    reaper.install()
    destroyed = asyncio.Event()
    renew = asyncio.Event()

    def on_renew() -> None:
        renew.set()
        destroyed.set()

    sandbox = Sandbox(options, reaper)
    server = Server()
    service = AgentService(
        sandbox,
        timing,
        destroyed.set,
        policy,
        on_renew=on_renew if renewals is not None else None,
        renewals=renewals or 0,
    )
    service.register(server)
    connections = channel.Connections(server)

    def on_ready() -> None:
        timing.ready = time.clock_gettime(time.CLOCK_BOOTTIME)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "serving %.3f s after /init was exec'd (%.3f s after main() began); the kernel took %.3f s",
                timing.agent_start_seconds,
                timing.ready - timing.started,
                timing.kernel_boot_seconds,
            )

    serving = asyncio.ensure_future(channel.serve(options, connections, on_ready))
    waiting = asyncio.ensure_future(destroyed.wait())
    try:
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # the channel failed: let it escape
            return False
        await connections.flush(FLUSH_TIMEOUT_SECONDS)
        return renew.is_set()
    finally:
        for task in (serving, waiting):
            task.cancel()
        await asyncio.gather(serving, waiting, return_exceptions=True)
        reaper.uninstall()


def _run_guest(started: float) -> None:
    from capsa.agent import init

    timing = Timing(started, lambda: init.init_exec_uptime(init.read_kmsg()))
    console: TextIO = sys.stderr
    renewals = int(os.environ.get(RENEWALS_ENV, "0"))
    try:
        if not renewals:
            init.mount_api_filesystems()
        with contextlib.suppress(OSError):
            console = open("/dev/console", "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        with open("/proc/cmdline", encoding="utf-8") as file:
            options = from_kernel_cmdline(file.read())
        _configure_logging(console, options.debug)
        if not renewals:
            init.bring_up()
        if options.template and not renewals:
            # Saved right after it first serves: what the clones would load on
            # first use is loaded once, here (capsa.hypervisor.template).
            from capsa.agent import netlink

            log.debug("template: network modules preloaded in %.3f s", netlink.preload())
        # The image's policy is in force before the channel opens.
        if asyncio.run(serve(options, timing, Enforcer(load_image_policy()), renewals)):
            _renew(renewals + 1)
        log.debug("sandbox destroyed, powering off")
        init.power_off()
    except BaseException:
        import traceback

        console.write("capsa-agent: fatal error, the VM stops:\n")
        traceback.print_exc(file=console)
        console.flush()
        os.sync()
        raise


def _renew(renewals: int) -> None:
    """Replace this process with a fresh /init (RenewAgent, agent.proto): PID 1 stays PID 1.

    A template clone's agent was restored with the template's hash seed,
    stack canary and PRNG states; a new process draws its own from the
    clone's kernel, which vmgenid and the host's entropy have reseeded.
    What the first process set up (mounts, sysctls, hostname, cgroups) is
    the kernel's and stays; the new one only serves.  Every descriptor the
    agent holds is close-on-exec: the port closes here and opens again in
    the new process.
    """
    log.debug("renewing the agent process (renewal %d)", renewals)
    logging.shutdown()
    os.execve(INIT_PATH, [INIT_PATH], {**os.environ, RENEWALS_ENV: str(renewals)})


def _run_host(started: float, argv: list[str]) -> None:
    from capsa.agent import libc

    options = from_argv(argv)
    _configure_logging(sys.stderr, options.debug)
    timing = Timing(started, _process_start_uptime)
    # crun exits right after create/exec; the processes it leaves must
    # re-parent to the agent, as they do to PID 1 in the guest.
    libc.set_child_subreaper()
    asyncio.run(serve(options, timing))


def main(argv: list[str] | None = None) -> None:
    """The ``capsa-agent`` console script and the guest's /init entry point."""
    started = time.clock_gettime(time.CLOCK_BOOTTIME)
    if os.getpid() == 1:
        _run_guest(started)
    else:
        _run_host(started, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
