"""Mount propagation through real engines: ``-v SRC:DST:rslave`` sees the host's later mounts, the default does not.

Docker and Podman pass ``rslave`` when a volume asks for it and
``rprivate`` otherwise (the kubelet does the same for HostToContainer and
None).  The volumes live under a shared mount of the test's own (Docker
refuses rslave on a source whose mount is private), and the mounts the
host makes under them once the container runs are undone whatever
happens.  Under runc (``CAPSA_E2E_RUNTIME=runc``) the same test passes.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_engines import Engine

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

NET = ("--network", "none")


@pytest.fixture
def shared_volume(tmp_path: Path) -> Iterator[Path]:
    """A directory that is a shared mount of its own; it and every mount below it are undone at the end."""
    path = tmp_path / "volume"
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True, timeout=30)
        yield path
    finally:
        mounted = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(path) or line.split()[4].startswith(f"{path}/")
        ]
        for target in sorted(mounted, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, timeout=30)


def test_rslave_volumes_see_host_mounts_made_after_start(engine: Engine, shared_volume: Path) -> None:
    slave, private = shared_volume / "slave", shared_volume / "private"
    for volume in (slave, private):
        (volume / "sub").mkdir(parents=True)
    volumes = ("-v", f"{slave}:/slave:rslave", "-v", f"{private}:/private")
    cid = engine("run", "-d", *NET, *volumes, engine.image, "sleep", "600").check().out
    try:
        for volume in (slave, private):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(volume / "sub")], check=True, timeout=30)
            (volume / "sub" / "f").write_text(f"host {volume.name}\n")
        deadline = time.monotonic() + 30
        seen = ""
        while seen != "host slave\n" and time.monotonic() < deadline:
            seen = engine("exec", cid, "sh", "-c", "cat /slave/sub/f 2>/dev/null; true", timeout=60).check().stdout
            time.sleep(0.5)
        assert seen == "host slave\n"
        assert engine("exec", cid, "ls", "-A", "/private/sub", timeout=60).check().out == ""
    finally:
        with contextlib.suppress(AssertionError):
            engine("rm", "--force", cid, timeout=120).check()
