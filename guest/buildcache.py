"""Cached, atomically published build artefacts under the capsa cache, and the symlinks into them.

Shared by the guest build scripts (``guest/kernel/build.py``,
``guest/image/build.py``). Each keeps its artefacts in
``$CAPSA_CACHE_DIR/<part>/`` (default ``/var/cache/capsa``), serialises on
``.lock`` there with flock(2), builds into a staging directory beside the
final one and publishes it with one rename(2), then points a symlink in
``$CAPSA_GUEST_DIR`` (default ``/var/lib/capsa/guest``) at it by renaming a
fresh link over the old one. A failed or killed run therefore leaves nothing
half-written where readers look; what it does leave is named ``.tmp-*``,
``.old-*`` or ``.<name>.tmp-<pid>``, for the scripts' cleanup under the lock.

Standard library only, like the scripts (they run before the capsa package
is importable anywhere), so :class:`BuildError` is the base of the scripts'
own exception types rather than part of ``capsa.errors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Self

DEFAULT_CACHE_DIR = Path("/var/cache/capsa")
DEFAULT_GUEST_DIR = Path("/var/lib/capsa/guest")


class BuildError(Exception):
    """A build step failed; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things live; one place so the shell code cannot disagree.

    The scripts subclass it to name their own artefacts under ``cache``.
    """

    cache: Path
    guest: Path

    @classmethod
    def from_environment(cls, part: str) -> Self:
        """``part`` is the script's directory under the cache root."""
        return cls(
            cache=Path(os.environ.get("CAPSA_CACHE_DIR", DEFAULT_CACHE_DIR)) / part,
            guest=Path(os.environ.get("CAPSA_GUEST_DIR", DEFAULT_GUEST_DIR)),
        )

    @property
    def lock(self) -> Path:
        return self.cache / ".lock"


class Stages:
    """One line per stage on stderr, with the time since the run started."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._mark = self._start

    def say(self, message: str) -> None:
        now = time.monotonic()
        print(f"[{now - self._start:7.1f}s] {message}", file=sys.stderr, flush=True)
        self._mark = now

    def lap(self) -> float:
        """Seconds since the last line."""
        return time.monotonic() - self._mark


def run(argv: Sequence[str | Path], *, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    """Run a command; return its stdout, or raise with the end of its stderr
    (or stdout, if it printed nothing on stderr)."""
    try:
        done = subprocess.run([str(arg) for arg in argv], cwd=cwd, input=stdin, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]} not found (install it first)") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[-3000:]
        raise BuildError(f"{' '.join(map(str, argv))} exited with {done.returncode}\n{detail}".rstrip())
    return done.stdout


@contextlib.contextmanager
def locked(path: Path, stages: Stages) -> Iterator[None]:
    """Hold an exclusive flock(2) on ``path``; the kernel drops it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stages.say(f"waiting for another build holding {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A scratch directory beside ``final``; removed unless the caller
    renamed it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(scratch: Path, final: Path, *, fsync: Iterable[Path] | None = None) -> None:
    """Move a finished staging directory to ``final`` in one rename(2).

    What must be on disk before the rename, so that a crash right after it
    cannot leave a published but empty file: by default every file and
    directory of the tree; ``fsync`` instead names just the files that
    matter (the artefacts, not thousands of small files that a crash would
    only make us rebuild because their manifest, written last, is checked).
    """
    if fsync is not None:
        for path in fsync:
            fsync_path(path)
    if final.exists():
        # Only reachable with --force: move the old build aside first, so a
        # reader never sees a mix of two builds.
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    # mkdtemp made it 0700; QEMU may run unprivileged and must read it.
    scratch.chmod(0o755)
    if fsync is None:
        _fsync_tree(scratch)
    scratch.rename(final)
    fsync_path(final.parent)


def fsync_path(path: Path) -> None:
    """fsync(2) a file or directory by name."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file that appears complete or not at all."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def point_symlink(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` atomically (symlink, then rename
    over the old link): readers see the old or the new target, never none."""
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(target)
    os.replace(temporary, link)
