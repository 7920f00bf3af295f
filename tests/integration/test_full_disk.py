"""--root on a full filesystem (a small tmpfs, filled): one line, a non-zero exit, nothing left behind,
and the recorded state what the guest did.

``create`` fails before any VM boots (its first state.json cannot be
written) and needs the guest files only because it checks them before it
claims the ID.  ``start`` needs a real container: with the disk full it must
not start the process in the guest, and the state must still say created.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import Capsa, guest_ready, leftovers, socket_dirs, subreaper, wait_child
from test_bad_input import assert_refused

from capsa.cli.spec import default_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "capsa-full-disk", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(fs: Path) -> Path:
    """Write a file until the filesystem has no room left (ENOSPC); the file, to free it again."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def on_full_disk(capsa: Capsa, fs: Path) -> Capsa:
    """The same bundle, with the state root on ``fs``."""
    root = fs / "root"
    root.mkdir()
    return Capsa(root=root, bundle=capsa.bundle)


@pytest.mark.skipif(guest_ready() is not None, reason="create checks the guest files before the claim")
@pytest.mark.parametrize("verb", ["create", "run"])
def test_a_full_state_root_refuses_create_in_one_line_and_leaves_nothing(
    capsa: Capsa, tmp_path: Path, verb: str
) -> None:
    capsa.spec(["true"])
    with small_tmpfs(tmp_path / "fs", "256k") as fs:
        full = on_full_disk(capsa, fs)
        fill(fs)
        result = full(verb, "--bundle", str(capsa.bundle), "c1")
        assert_refused(result, "c1", "No space left on device")
        assert leftovers(full.root) == []
        assert socket_dirs(full.root) == set()


@pytest.mark.vm
@pytest.mark.slow
def test_start_on_a_full_state_root_starts_nothing_and_the_state_says_created(capsa: Capsa, tmp_path: Path) -> None:
    """The process writes /started into the (writable) rootfs the moment it runs; it must not, until start succeeds."""
    spec = default_spec(["sh", "-c", "echo yes > /started; exec sleep 600"], terminal=False)
    spec["root"]["readonly"] = False
    (capsa.bundle / "config.json").write_text(json.dumps(spec))
    started = capsa.bundle / "rootfs" / "started"
    with small_tmpfs(tmp_path / "fs", "64m") as fs, subreaper():
        full = on_full_disk(capsa, fs)
        pid_file = tmp_path / "c1.pid"
        created = full("create", "--bundle", str(capsa.bundle), "--pid-file", str(pid_file), "c1")
        assert created.code == 0, created.stderr
        shim = int(pid_file.read_text())
        try:
            filler = fill(fs)
            assert_refused(full("start", "c1"), "c1", "No space left on device")
            assert full.status("c1") == "created"
            time.sleep(3)  # were the process started, it would have written /started by now
            assert not started.exists()

            filler.unlink()
            result = full("start", "c1")
            assert result.code == 0, result.stderr
            deadline = time.monotonic() + 60
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert started.read_text() == "yes\n"
            assert full.status("c1") == "running"
        finally:
            full("kill", "c1", "KILL")
            wait_child(shim, 60)
            full("delete", "--force", "c1")
        assert leftovers(full.root) == []
        assert socket_dirs(full.root) == set()
