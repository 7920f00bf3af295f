"""`capsa events` reports the guest's OOM kills as runc's ``{"type":"oom","id":ID}``.

A container with a 32 MiB memory limit (enforced by crun's cgroup in the
guest) runs a shell that doubles a string until the OOM killer takes it:
first a child shell, while the container's init lives on, then the init
itself, which exits 137.  Two `capsa events` started before the container
print an ``oom`` line for each, and their stream ends with the container.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Capsa, subreaper, wait_child

pytestmark = pytest.mark.vm

LIMIT = 32 << 20
# busybox sh: x=$x$x doubles a string until the cgroup's limit stops it.
HOG = "x=a; while :; do x=$x$x; done"


@pytest.fixture(autouse=True)
def adopt_orphans() -> Iterator[None]:
    with subreaper():
        yield


def eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def lines(path: Path) -> list[dict[str, object]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def test_oom_kills_in_the_guest_are_oom_events(capsa: Capsa, tmp_path: Path) -> None:
    # The child goes first (the OOM killer takes the largest task), the init
    # later; the pause between them is longer than the agent's poll (0.5 s).
    capsa.spec(["sh", "-c", f"sh -c '{HOG}'; echo child-killed-$?; sleep 3; {HOG}"])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    spec["linux"].setdefault("resources", {})["memory"] = {"limit": LIMIT}
    (capsa.bundle / "config.json").write_text(json.dumps(spec))

    out = tmp_path / "out"
    pid_file = tmp_path / "pid"
    with open(out, "wb") as stdout:
        create = capsa.popen("create", "--bundle", str(capsa.bundle), "--pid-file", str(pid_file), "hog", stdout=stdout)
        assert create.wait(timeout=180) == 0
    shim = int(pid_file.read_text())
    watchers: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for n in range(2):
            path = tmp_path / f"events-{n}"
            with open(path, "wb") as events_out:
                watchers.append((capsa.popen("events", "--interval", "1s", "hog", stdout=events_out), path))
        # Each has made its first stats event: it watches from here on.
        for _, path in watchers:
            eventually(lambda path=path: len(lines(path)) >= 1, "a first stats event")  # type: ignore[misc]
        assert capsa("start", "hog").code == 0

        assert wait_child(shim, 120) == 137  # the init's OOM kill, as the engine sees it
        assert "child-killed-137" in out.read_text()
        for process, path in watchers:
            # The stream ends by itself with the container, after its last oom line.
            assert process.wait(timeout=30) == 0
            printed = lines(path)
            assert all(event["id"] == "hog" for event in printed)
            assert {str(event["type"]) for event in printed} == {"stats", "oom"}
            ooms = [event for event in printed if event["type"] == "oom"]
            # One for the child, one for the init; nothing else in them (runc: no data).
            assert ooms == [{"type": "oom", "id": "hog"}] * 2, printed
            assert printed[-1] == {"type": "oom", "id": "hog"}
    finally:
        for process, _ in watchers:
            if process.poll() is None:
                process.kill()
                process.wait()
        result = capsa("delete", "--force", "hog")
        assert result.code == 0, result.stderr
