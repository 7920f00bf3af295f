"""``capsa update [flags] ID``: new resource limits for a running container, as ``runc update``.

The limits are an OCI ``linux.resources`` object (runtime-spec
config-linux.md "Control groups"): from ``--resources FILE``, or ``-`` for
stdin (containerd's runc shim pipes JSON in; conmon names a file), and/or
runc's flags (``--memory 512m``, ``--cpu-quota``, ...;
:func:`capsa.runtime.resources.parse_update_flags`).  runc ignores the flags
when ``--resources`` is given; capsa lays them over the file.

The runtime grows the container's VM to fit (CPU and memory hot-plug) and
applies the limits to the container's cgroup in the guest.  Intel RDT
(``--l3-cache-schema``, ``--mem-bw-schema``) has no meaning inside a VM and
is refused, as runc refuses it on a host without RDT.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import IO, Any

from capsa.cli.context import Context
from capsa.errors import InvalidArgument
from capsa.runtime import lifecycle
from capsa.runtime.resources import check_resources, merge_resources, parse_update_flags

log = logging.getLogger("capsa.cli")

# runc's flags taking a string value, by their argparse destination.
_STRING_FLAGS = (
    "cpu_period",
    "cpu_quota",
    "cpu_burst",
    "cpu_share",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpuset_cpus",
    "cpuset_mems",
    "cpu_idle",
    "memory",
    "memory_reservation",
    "memory_swap",
)


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="update a container's resource limits")
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--resources", "-r", default=None, metavar="FILE", help="an OCI linux.resources JSON file, or - for stdin"
    )
    p.add_argument("--blkio-weight", type=int, default=0, help="block IO weight, 10 to 1000")
    p.add_argument("--cpu-period", help="CPU CFS period (microseconds)")
    p.add_argument("--cpu-quota", help="CPU CFS quota per period (microseconds)")
    p.add_argument("--cpu-burst", help="CPU CFS burst (microseconds)")
    p.add_argument("--cpu-share", help="CPU shares (relative weight)")
    p.add_argument("--cpu-rt-period", help="CPU realtime period (microseconds)")
    p.add_argument("--cpu-rt-runtime", help="CPU realtime runtime per period (microseconds)")
    p.add_argument("--cpuset-cpus", help="CPUs to use (e.g. 0-2,4)")
    p.add_argument("--cpuset-mems", help="memory nodes to use")
    p.add_argument("--cpu-idle", help="1: SCHED_IDLE for the cgroup")
    p.add_argument("--memory", help="memory limit (bytes, or with a unit: 512m, 1g; -1 unlimited)")
    p.add_argument("--memory-reservation", help="memory soft limit")
    p.add_argument("--memory-swap", help="memory plus swap limit (-1 unlimited)")
    p.add_argument("--pids-limit", type=int, default=0, help="most processes the container may have")
    # Obsolete in runc too: accepted, ignored with a warning.
    p.add_argument("--kernel-memory", help=argparse.SUPPRESS)
    p.add_argument("--kernel-memory-tcp", help=argparse.SUPPRESS)
    p.add_argument("--l3-cache-schema", help="Intel RDT L3 cache schema (not available in a VM)")
    p.add_argument("--mem-bw-schema", help="Intel RDT memory bandwidth schema (not available in a VM)")
    p.set_defaults(execute=execute)


def read_resources(source: str, stdin: IO[bytes]) -> dict[str, Any]:
    """The ``linux.resources`` object of ``--resources``: a file, or ``-`` for ``stdin``."""
    where = "standard input" if source == "-" else source
    try:
        if source == "-":
            raw = stdin.read()
        else:
            with open(source, "rb") as file:
                raw = file.read()
    except OSError as exc:
        raise InvalidArgument(f"--resources {where}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidArgument(f"--resources {where}: nested too deeply") from None
    except ValueError as exc:
        raise InvalidArgument(f"--resources {where}: not valid JSON: {exc}") from exc
    try:
        return check_resources(data)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--resources {where}: {exc}") from None


def resources_from_args(args: argparse.Namespace, stdin: IO[bytes]) -> dict[str, Any]:
    """What ``capsa update`` asks for: ``--resources`` with the flags laid over it."""
    for flag in ("l3_cache_schema", "mem_bw_schema"):
        if getattr(args, flag):
            option = "--" + flag.replace("_", "-")
            raise InvalidArgument(f"{option}: Intel RDT is not available to a container in a capsa VM")
    for flag in ("kernel_memory", "kernel_memory_tcp"):
        if getattr(args, flag):
            log.warning("setting --%s is ignored (obsolete, as in runc)", flag.replace("_", "-"))
    flags = parse_update_flags(
        blkio_weight=args.blkio_weight,
        pids_limit=args.pids_limit,
        **{name: getattr(args, name) for name in _STRING_FLAGS},
    )
    base = read_resources(args.resources, stdin) if args.resources else {}
    return merge_resources(base, flags)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    resources = resources_from_args(args, sys.stdin.buffer)
    lifecycle.update(ctx.runtime, args.id, resources)
    return 0
