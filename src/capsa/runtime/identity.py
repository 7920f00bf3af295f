"""One host uid and gid per sandbox, from the range in ``[security]``.

A sandbox's QEMU runs as its own uid and gid (the same number for both), so
a process that escapes one VMM cannot signal, ptrace or read the files of
another sandbox's.  No ``/etc/passwd`` entry is needed: the kernel takes any
number.

The allocations live in ``/run/capsa-ids/`` (root only, 0700): one file per
uid in use, named by the number, holding the owner (the process that runs
the sandbox: a capsa-proxy or a containerd-shim-capsa-v2) as its PID and
start time (runtime/pids.py), and the sandbox ID for people reading it.
An flock on ``/run/capsa-ids/lock`` makes allocating and freeing atomic, so
concurrent creates never take one number twice.  An allocation whose owner
is gone (a SIGKILLed proxy never frees its own) is stale and is reclaimed
by the next allocation that needs it, but never while any process still runs
under that uid: a leftover QEMU of a dead sandbox keeps its number out of
circulation until it is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capsa.config import SecurityConfig
from capsa.errors import CapsaError
from capsa.runtime import pids

DEFAULT_ALLOCATIONS = Path("/run/capsa-ids")


@dataclass(frozen=True)
class SandboxIdentity:
    """The uid and gid a sandbox's unprivileged host processes run as."""

    uid: int
    gid: int


class IdentityError(CapsaError):
    """No uid and gid could be allocated for a sandbox."""


class IdentityAllocator:
    def __init__(self, security: SecurityConfig, directory: Path = DEFAULT_ALLOCATIONS) -> None:
        self.base = security.sandbox_id_base
        self.count = security.sandbox_id_count
        self.directory = directory

    def allocate(self, sandbox_id: str, owner_pid: int | None = None) -> SandboxIdentity:
        """Take a free uid for ``sandbox_id``, owned by ``owner_pid`` (default: this process)."""
        owner = os.getpid() if owner_pid is None else owner_pid
        started = pids.start_time(owner)
        if started is None:
            raise IdentityError(f"cannot allocate a sandbox uid: owner process {owner} is gone")
        record = json.dumps({"pid": owner, "start": started, "sandbox": sandbox_id})
        with self._locked():
            taken = self._taken()
            busy: set[int] | None = None
            for uid in range(self.base, self.base + self.count):
                if uid in taken:
                    if self._owner_alive(uid):
                        continue
                    if busy is None:
                        busy = uids_in_use()
                    if uid in busy:
                        continue  # stale, but something still runs as it
                elif busy is not None and uid in busy:
                    continue
                self._write(uid, record)
                return SandboxIdentity(uid, uid)
        raise IdentityError(
            f"no free sandbox uid in {self.base}..{self.base + self.count - 1}: "
            "raise [security] sandbox_id_count or delete stopped containers"
        )

    def release(self, identity: SandboxIdentity, owner_pid: int | None = None) -> None:
        """Free ``identity`` if ``owner_pid`` (default: this process) still holds it."""
        owner = os.getpid() if owner_pid is None else owner_pid
        with self._locked():
            record = self._read(identity.uid)
            if record is not None and record.get("pid") == owner:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / str(identity.uid)).unlink()

    def holders(self) -> dict[int, str]:
        """The uids allocated to live owners, with their sandbox IDs (for ``capsa check``, tests)."""
        with self._locked():
            return {
                uid: str((self._read(uid) or {}).get("sandbox", "")) for uid in self._taken() if self._owner_alive(uid)
            }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise IdentityError(f"cannot use {self.directory} to allocate sandbox uids: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _taken(self) -> set[int]:
        return {int(name) for name in os.listdir(self.directory) if name.isdigit()}

    def _read(self, uid: int) -> dict[str, object] | None:
        try:
            data = json.loads((self.directory / str(uid)).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _owner_alive(self, uid: int) -> bool:
        record = self._read(uid)
        if record is None:
            return False
        pid, start = record.get("pid"), record.get("start")
        return isinstance(pid, int) and isinstance(start, int) and pids.alive(pid, start)

    def _write(self, uid: int, record: str) -> None:
        path = self.directory / str(uid)
        tmp = self.directory / f".{uid}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(record)
            os.replace(tmp, path)
        except OSError as exc:
            raise IdentityError(f"cannot record sandbox uid {uid} in {self.directory}: {exc.strerror}") from exc


def uids_in_use() -> set[int]:
    """Every real, effective, saved or filesystem uid of a process on the host (``/proc/PID/status``)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        found.update(int(v) for v in line.split()[1:])
                        break
        except (OSError, ValueError):
            continue
    return found
