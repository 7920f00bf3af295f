"""``run``: create and start a container, and in the foreground wait for it and delete it.

As runc, ``run`` is ``create`` + ``start`` (+ wait + ``delete``), with the
same processes: the proxy owns the VM, the shim relays the container's
stdio (ours) and exits with its status.  In the foreground the shim is our
child: we pass it the signals we receive (and the terminal's resizes) and
its status becomes ours.  With ``-d`` we return once the container runs.

``CAPSA_TIMINGS=FILE`` makes ``run`` write the monotonic time of each phase
there (for bench/), its own and the proxy's (which the proxy leaves in
``FILE.proxy`` as it exits; the monotonic clock is shared by all processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from capsa.errors import CapsaError
from capsa.runtime import lifecycle
from capsa.runtime.execs import SignalRelay, wait_foreground

TIMINGS_ENV = "CAPSA_TIMINGS"


def run(rt: lifecycle.Runtime, request: lifecycle.CreateRequest, detach: bool) -> int:
    timings = request.timings
    timings["invoked"] = time.monotonic()
    request.foreground = not detach
    # From the first moment: a signal during create or start goes to the container once it runs.
    with SignalRelay() as relay:
        created = lifecycle.create(rt, request)
        timings["container_created"] = time.monotonic()
        try:
            lifecycle.start(rt, request.container_id)
        except BaseException:
            with contextlib.suppress(CapsaError):
                lifecycle.delete(rt, request.container_id, force=True)
            raise
        timings["container_started"] = time.monotonic()
        if detach:
            relay.to(created.shim.pid)
            return 0
        try:
            status = wait_foreground(created.shim, relay)
            timings["container_exited"] = time.monotonic()
        finally:
            lifecycle.delete(rt, request.container_id, force=True)
            timings["deleted"] = time.monotonic()
            write_timings(timings)
    return status


def write_timings(timings: dict[str, float]) -> None:
    target = os.environ.get(TIMINGS_ENV)
    if not target:
        return
    merged = dict(timings)
    proxy_file = Path(f"{target}.proxy")
    with contextlib.suppress(OSError, ValueError):
        merged.update(json.loads(proxy_file.read_text()))
        proxy_file.unlink()
    with contextlib.suppress(OSError), open(target, "w") as f:
        json.dump(merged, f)
