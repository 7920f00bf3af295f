"""The host's runtime counters: sandbox starts, their failures by reason, template use, start times.

Every process that starts a sandbox (``capsa-proxy`` for the runc CLI, the
shim v2 for a pod) adds its outcome to one small JSON document,
:data:`COUNTERS_FILE`, under an flock; ``capsa-monitor`` reads it on each
refresh and serves the figures (capsa_runtime_*).  The document only grows
by a key per new label value, never per sandbox, so it stays a few hundred
bytes.  Counting must never cost a sandbox its start: a file that cannot be
written is logged and skipped.

The document::

    {"starts": {"template/hit": 12, "cold/": 1},          # boot/template result
     "failures": {"vm": 1},                               # by reason
     "start_seconds": {"template": {"buckets": [...], "sum": 9.1, "count": 12}}}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.dirs import ensure_dir
from capsa.errors import (
    AgentError,
    BundleError,
    CapsaError,
    GuestImageError,
    HypervisorError,
    InvalidArgument,
    StorageError,
)
from capsa.runtime.admission import AdmissionError

log = logging.getLogger("capsa.counters")

COUNTERS_DIR = Path("/run/capsa-stats")
COUNTERS_FILE = COUNTERS_DIR / "counters.json"
#: Upper bounds (seconds) of the start-time histogram's buckets; the last is +Inf.
START_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)


def failure_reason(exc: BaseException) -> str:
    """The reason label of a failed start: what failed, not its words (which vary per sandbox)."""
    if isinstance(exc, AdmissionError):
        return "host-memory"
    if isinstance(exc, InvalidArgument | BundleError):
        return "invalid"
    if isinstance(exc, GuestImageError):
        return "guest-files"
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, HypervisorError):
        return "vm"
    if isinstance(exc, AgentError):
        return "agent"
    if isinstance(exc, CapsaError | OSError):
        return "host"
    return "interrupted"


def template_result(timings: dict[str, float], made: bool) -> str:
    """How a start used its template: ``hit``, ``made`` (it made one), ``failed`` (booted cold after), or ``""``."""
    if "template_failed" in timings:
        return "failed"
    if "template_restored" in timings:
        return "made" if made else "hit"
    return ""


@dataclass
class Counters:
    """The document, as read; :meth:`add_start` and :meth:`add_failure` change it."""

    starts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    start_seconds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any) -> Counters:
        """From the JSON document; anything malformed reads as nothing counted."""
        if not isinstance(data, dict):
            return cls()
        counters = cls()
        for name, target in (("starts", counters.starts), ("failures", counters.failures)):
            values = data.get(name)
            if isinstance(values, dict):
                target.update({str(k): v for k, v in values.items() if isinstance(v, int) and v >= 0})
        histograms = data.get("start_seconds")
        if isinstance(histograms, dict):
            for boot, histogram in histograms.items():
                if _valid_histogram(histogram):
                    counters.start_seconds[str(boot)] = histogram
        return counters

    def add_start(self, boot: str, template: str, seconds: float) -> None:
        key = f"{boot}/{template}"
        self.starts[key] = self.starts.get(key, 0) + 1
        histogram = self.start_seconds.setdefault(
            boot, {"buckets": [0] * (len(START_BUCKETS) + 1), "sum": 0.0, "count": 0}
        )
        index = next((i for i, bound in enumerate(START_BUCKETS) if seconds <= bound), len(START_BUCKETS))
        histogram["buckets"][index] += 1
        histogram["sum"] += seconds
        histogram["count"] += 1

    def add_failure(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def document(self) -> dict[str, Any]:
        return {"starts": self.starts, "failures": self.failures, "start_seconds": self.start_seconds}


def _valid_histogram(histogram: Any) -> bool:
    if not isinstance(histogram, dict):
        return False
    buckets = histogram.get("buckets")
    return (
        isinstance(buckets, list)
        and len(buckets) == len(START_BUCKETS) + 1
        and all(isinstance(b, int) for b in buckets)
        and isinstance(histogram.get("sum"), int | float)
        and isinstance(histogram.get("count"), int)
    )


def read(path: Path = COUNTERS_FILE) -> Counters:
    """The counters as they are now (nothing counted when there is no file yet)."""
    try:
        return Counters.parse(json.loads(path.read_text()))
    except (OSError, ValueError):
        return Counters()


@contextlib.contextmanager
def _updating(path: Path) -> Iterator[Counters]:
    ensure_dir(path.parent, 0o700)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        counters = read(path)
        yield counters
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(counters.document()))
        os.chmod(partial, 0o600)
        partial.replace(path)
    finally:
        os.close(fd)


def record_start(boot: str, template: str, seconds: float, path: Path = COUNTERS_FILE) -> None:
    """Count one sandbox started (``boot`` cold or template, its :func:`template_result`)."""
    try:
        with _updating(path) as counters:
            counters.add_start(boot, template, seconds)
    except OSError as exc:
        log.warning("cannot count the sandbox's start in %s: %s", path, exc.strerror)


def record_failure(exc: BaseException, path: Path = COUNTERS_FILE) -> None:
    """Count one sandbox that did not start, by :func:`failure_reason`."""
    try:
        with _updating(path) as counters:
            counters.add_failure(failure_reason(exc))
    except OSError as err:
        log.warning("cannot count the sandbox's failure in %s: %s", path, err.strerror)
