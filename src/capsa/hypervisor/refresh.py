"""Making a template's next generation in the background: ``python -m capsa.hypervisor.refresh JOB``.

A template serves a bounded number of sandboxes for a bounded time
(hypervisor/template.py).  The sandbox whose checkout finds its generation
at :data:`~capsa.hypervisor.template.REFRESH_AT` of a bound starts this
process (:func:`start`), so that the sandbox that reaches the bound finds
the next generation ready instead of booting one while its user waits.

It is the host's job, not the sandbox's, so it lives apart from it: its own
session, detached from the starting proxy at once (``setsid --fork``: no
proxy, shim or engine waits for it, and none must be kept alive for it), a
clean environment, its own host cgroup (:data:`CGROUP`, where the host's
cgroups are writable: a template VM must not count against a sandbox's
limits), and its own sandbox uid for the template VM (runtime/identity.py).
What it needs comes in a job file the starter writes into the template
store (root's alone): the VM to template, the store and its bounds, the
key and the generation it replaces.  It does nothing when another process
holds the key's lock (making one already) or a newer generation is current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from capsa.config import SecurityConfig
from capsa.errors import CapsaError
from capsa.hypervisor.base import VMConfig
from capsa.hypervisor.jail import Confinement
from capsa.hypervisor.template import TemplateLimits, TemplateStore

log = logging.getLogger("capsa.template")

#: The host cgroup template VMs made in the background run in (from each hierarchy's root).
CGROUP = "/capsa-templates"
SETSID = "/usr/bin/setsid"


@dataclass(frozen=True)
class Job:
    """What a refresher needs: the VM to template and where its generations live."""

    store_root: Path
    limits: TemplateLimits
    key: str
    generation: str
    vm: VMConfig
    security: SecurityConfig
    connect_timeout: float
    request_timeout: float


def start(job: Job) -> None:
    """Hand ``job`` to a detached refresher; never fails the caller (a refresh is an optimisation)."""
    path = job.store_root / f"{job.key}.refresh-{secrets.token_hex(4)}.job"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            pickle.dump(job, file)
        log_fd = os.open(
            job.store_root / f"{job.key}.refresh.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(log_fd, "ab") as out:
            # setsid --fork: the refresher is orphaned at once; we reap setsid itself.
            subprocess.run(
                [SETSID, "--fork", sys.executable, "-m", "capsa.hypervisor.refresh", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                check=True,
                timeout=10,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot start making template %s's next generation in the background: %s", job.key, exc)
        with contextlib.suppress(OSError):
            path.unlink()


def _enter_cgroup() -> None:
    """Into the host cgroup :data:`CGROUP` (in every hierarchy, v1 or v2, as a sandbox's is made); where
    the host has none writable, stay where we are (logged)."""
    from capsa.runtime import hostcgroup

    own = hostcgroup.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    made = hostcgroup.create(CGROUP, hostcgroup.host_hierarchies(), own)
    for directory in made.dirs.values():
        try:
            hostcgroup.write_pid(directory, os.getpid())
        except OSError as exc:
            log.info("the template refresh stays out of %s: %s", directory, exc.strerror)


async def _refresh(job: Job) -> None:
    from capsa.runtime.agent_client import AgentClient
    from capsa.runtime.identity import IdentityAllocator

    async def check_agent(socket_path: Path) -> AgentClient:
        return await AgentClient.serving_serial(socket_path, job.request_timeout, job.connect_timeout)

    store = TemplateStore(job.store_root, job.limits)
    identity = None
    confinement = None
    if job.security.unprivileged_vmm:
        identity = IdentityAllocator(job.security).allocate(f"template:{job.key}")
        confinement = Confinement(identity.uid, identity.gid, jailed=job.security.jail)
    try:

        def make() -> Awaitable[Path]:
            return store.create(job.key, job.vm, check_agent, job.connect_timeout, confinement, for_sandbox=False)

        made = await store.refresh(job.key, job.generation, make)
        if made is not None:
            log.info("VM template %s: %s serves from now on", job.key, made.name)
    finally:
        if identity is not None:
            with contextlib.suppress(CapsaError):
                IdentityAllocator(job.security).release(identity)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if len(args) != 1:
        print("usage: python -m capsa.hypervisor.refresh JOB", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        with path.open("rb") as file:
            job = pickle.load(file)
        path.unlink()
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        log.error("cannot read the refresh job %s: %s", path, exc)
        return 1
    if not isinstance(job, Job):
        log.error("%s is not a refresh job", path)
        return 1
    _enter_cgroup()
    try:
        asyncio.run(_refresh(job))
    except CapsaError as exc:
        log.warning("VM template %s: no new generation now: %s", job.key, exc)
        return 1
    return 0


if __name__ == "__main__":
    # Run as the module proper, not as __main__: the job file names its classes by that module.
    from capsa.hypervisor.refresh import main as refresh_main

    sys.exit(refresh_main())
