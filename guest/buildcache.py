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

import collections
import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self

from buildreport import Stages

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


#: How much of a failed command's output its error carries.
TAIL_LINES = 25


def run_lines(
    argv: Sequence[str | Path],
    on_line: Callable[[str], None],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a command with stdout and stderr merged, handing each line (with
    its newline) to ``on_line`` as it comes; raise with the last lines if
    the command fails."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        process = subprocess.Popen(
            [str(arg) for arg in argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]} not found (install it first)") from exc
    with process:
        assert process.stdout is not None
        try:
            for raw in process.stdout:
                line = raw.decode(errors="replace")
                tail.append(line)
                on_line(line)
        except BaseException:
            process.kill()
            raise
    if process.returncode != 0:
        detail = "".join(tail).rstrip()
        raise BuildError(f"{' '.join(map(str, argv))} exited with {process.returncode}\n{detail}".rstrip())


def run_watched(
    argv: Sequence[str | Path], watch: Callable[[], None], *, cwd: Path | None = None, interval: float = 0.5
) -> None:
    """Run a command that says little while it works, calling ``watch``
    every ``interval`` seconds until it exits (to measure what it has
    written so far, say); raise with the end of its output if it fails."""
    with tempfile.TemporaryFile() as output:
        try:
            process = subprocess.Popen(
                [str(arg) for arg in argv], cwd=cwd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        except FileNotFoundError as exc:
            raise BuildError(f"{argv[0]} not found (install it first)") from exc
        try:
            while True:
                try:
                    process.wait(interval)
                    break
                except subprocess.TimeoutExpired:
                    watch()
        except BaseException:
            process.kill()
            process.wait()
            raise
        if process.returncode != 0:
            output.seek(0)
            detail = output.read().decode(errors="replace").strip()[-3000:]
            raise BuildError(f"{' '.join(map(str, argv))} exited with {process.returncode}\n{detail}".rstrip())


def tree_bytes(root: Path) -> int:
    """Bytes in the regular files under ``root`` (0 if it is gone)."""
    total = 0
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


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
