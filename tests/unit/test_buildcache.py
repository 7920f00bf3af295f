"""guest/buildcache.py: the lock, atomic publishing and symlinks shared by the
guest kernel and image build scripts.

Like those scripts, which are not part of the capsa package, this puts
guest/ on sys.path to import it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest"))
import buildcache
import buildreport


class RecordingStages(buildreport.Stages):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def say(self, message: str) -> None:
        self.lines.append(message)


def test_layout_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CAPSA_GUEST_DIR", str(tmp_path / "guest"))
    layout = buildcache.Layout.from_environment("kernel")
    assert layout.cache == tmp_path / "cache" / "kernel"
    assert layout.guest == tmp_path / "guest"
    assert layout.lock == tmp_path / "cache" / "kernel" / ".lock"


def test_layout_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPSA_CACHE_DIR", raising=False)
    monkeypatch.delenv("CAPSA_GUEST_DIR", raising=False)
    layout = buildcache.Layout.from_environment("image")
    assert layout.cache == Path("/var/cache/capsa/image")
    assert layout.guest == Path("/var/lib/capsa/guest")


def test_locked_makes_a_second_holder_wait(tmp_path: Path) -> None:
    lock = tmp_path / "cache" / ".lock"
    first, second = RecordingStages(), RecordingStages()
    entered = threading.Event()

    def contend() -> None:
        with buildcache.locked(lock, second):
            entered.set()

    with buildcache.locked(lock, first):
        thread = threading.Thread(target=contend)
        thread.start()
        assert not entered.wait(0.3)
    thread.join(5)
    assert entered.is_set()
    assert first.lines == []
    assert second.lines == [f"waiting for another build holding {lock}"]


def test_publish_renames_the_staged_tree_into_place(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "abc"
    with buildcache.staging_dir(final) as scratch:
        assert scratch.parent == final.parent and scratch.name.startswith(".tmp-abc-")
        (scratch / "sub").mkdir()
        (scratch / "sub" / "file").write_text("one")
        buildcache.publish(scratch, final)
    assert (final / "sub" / "file").read_text() == "one"
    assert final.stat().st_mode & 0o777 == 0o755
    assert os.listdir(final.parent) == ["abc"]


def test_publish_replaces_an_old_build_whole(tmp_path: Path) -> None:
    final = tmp_path / "abc"
    final.mkdir()
    (final / "stale").write_text("old")
    with buildcache.staging_dir(final) as scratch:
        (scratch / "new").write_text("new")
        buildcache.publish(scratch, final, fsync=[scratch / "new"])
    assert sorted(os.listdir(final)) == ["new"]
    assert os.listdir(tmp_path) == ["abc"]


def test_failed_staging_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "abc"
    with pytest.raises(RuntimeError), buildcache.staging_dir(final) as scratch:
        (scratch / "half").write_text("written")
        raise RuntimeError("build failed")
    assert os.listdir(tmp_path) == []


def test_point_symlink_replaces_a_link(tmp_path: Path) -> None:
    link = tmp_path / "guest" / "vmlinux"
    buildcache.point_symlink(link, tmp_path / "one")
    assert os.readlink(link) == str(tmp_path / "one")
    buildcache.point_symlink(link, tmp_path / "two")
    assert os.readlink(link) == str(tmp_path / "two")
    assert os.listdir(link.parent) == ["vmlinux"]


def test_write_atomically(tmp_path: Path) -> None:
    path = tmp_path / "segment"
    buildcache.write_atomically(path, b"one")
    buildcache.write_atomically(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["segment"]


def test_run_returns_stdout_and_raises_with_stderr() -> None:
    assert buildcache.run(["cat"], stdin=b"data") == b"data"
    with pytest.raises(buildcache.BuildError, match=r"exited with 3\nbroken"):
        buildcache.run(["sh", "-c", "echo broken >&2; exit 3"])
    with pytest.raises(buildcache.BuildError, match="not found"):
        buildcache.run(["/nonexistent/capsa-tool"])


def test_run_lines_hands_over_each_line_and_raises_with_the_last() -> None:
    seen: list[str] = []
    buildcache.run_lines(["sh", "-c", "echo one; echo two >&2"], seen.append)
    assert seen == ["one\n", "two\n"]
    with pytest.raises(buildcache.BuildError, match=r"exited with 2\nlast words"):
        buildcache.run_lines(["sh", "-c", "echo last words; exit 2"], seen.append)


def test_run_watched_raises_with_the_output() -> None:
    buildcache.run_watched(["true"], lambda: None)
    with pytest.raises(buildcache.BuildError, match=r"exited with 4\nno space"):
        buildcache.run_watched(["sh", "-c", "echo no space; exit 4"], lambda: None)


def test_tree_bytes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"y" * 5)
    assert buildcache.tree_bytes(tmp_path) == 15
    assert buildcache.tree_bytes(tmp_path / "gone") == 0
