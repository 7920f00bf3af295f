"""A host change to a bind volume is seen by the container at once: not torn, not late.

Bind volumes have a virtio-fs share of their own, served by a virtiofsd with
``-o timeout=0`` (``[shared_fs] virtiofs_volume_timeout``): the guest keeps
no entries or attributes from it, so an append the host makes is read in
full and a deletion is seen by the very next lookup.  With the rootfs's
``cache=auto`` (1 s of metadata) the container read the appended file cut
to its old length and still found the deleted one (docs/performance.md,
bench/fsmeta.py).

The container reads the files first (so the guest has them cached), then
blocks on stdin; the host changes them and writes a line; the container
reads again within milliseconds, all in one ``capsa exec``, so the check
does not depend on how long an exec takes to start under TCG.  A shared
writable mapping (SQLite's WAL index, LMDB) on the volume still works.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import Capsa, read_until, subreaper
from test_lifecycle import create, delete, start

SCRIPT = """
cat /data/grow; [ -e /data/gone ] && echo gone-present; cat /etc/hosts; echo ready
read go
cat /data/grow; [ -e /data/gone ] && echo gone-present || echo gone-absent; cat /etc/hosts
[ ! -x /bin/mmapcheck ] || /bin/mmapcheck /data/mapped
echo done
"""

# The smallest MAP_SHARED writer (bench/fsmeta.py has the same check): FUSE
# refuses the mapping with ENODEV on a file opened for direct I/O.
MMAP_CHECK = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096) != 0) { printf("mmap %s\n", strerror(errno)); return 1; }
    char *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { printf("mmap %s\n", strerror(errno)); return 1; }
    memcpy(map, "guest-mmap", 10);
    msync(map, 4096, MS_SYNC);
    printf("mmap ok\n");
    return 0;
}
"""


def build_mmap_check(rootfs: Path, work: Path) -> bool:
    gcc = shutil.which("gcc")
    if gcc is None:
        return False
    source = work / "mmapcheck.c"
    source.write_text(MMAP_CHECK)
    built = subprocess.run(
        [gcc, "-static", "-O2", "-o", str(rootfs / "bin" / "mmapcheck"), str(source)], capture_output=True
    )
    return built.returncode == 0


@pytest.mark.vm
@pytest.mark.slow
def test_host_append_and_delete_are_seen_at_once(capsa: Capsa, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "grow").write_text("host-old\n")
    (volume / "gone").write_text("soon gone\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.7 db\n")
    mmap_checked = build_mmap_check(capsa.bundle / "rootfs", tmp_path)

    capsa.spec(["sleep", "600"])
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"] += [
        {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "rw", "rprivate"]},
        # A single-file bind, as an engine's /etc/hosts, which it rewrites in place.
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["bind", "rprivate"]},
    ]
    config.write_text(json.dumps(spec))
    with subreaper():
        shim = create(capsa, "fresh")
        try:
            start(capsa, "fresh")
            exec_proc = subprocess.Popen(
                capsa.argv("exec", "fresh", "sh", "-c", SCRIPT),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=capsa.bundle,
            )
            try:
                assert exec_proc.stdin is not None and exec_proc.stdout is not None
                before = read_until(exec_proc.stdout.fileno(), b"ready\n", timeout=120)
                assert before == b"host-old\ngone-present\n10.0.0.7 db\nready\n"

                with (volume / "grow").open("a") as grow:
                    grow.write("host-appended\n")
                (volume / "gone").unlink()
                with hosts.open("a") as hosts_file:
                    hosts_file.write("10.0.0.8 cache\n")
                rest, errors = exec_proc.communicate(b"go\n", timeout=120)
            finally:
                if exec_proc.poll() is None:
                    exec_proc.kill()
                    exec_proc.wait()
            assert exec_proc.returncode == 0, errors.decode(errors="replace")
            lines = rest.decode().splitlines()
            assert lines[:4] == ["host-old", "host-appended", "gone-absent", "10.0.0.7 db"]
            assert lines[4] == "10.0.0.8 cache"
            if mmap_checked:
                assert lines[5] == "mmap ok"
                assert (volume / "mapped").read_bytes()[:10] == b"guest-mmap"
            assert lines[-1] == "done"
        finally:
            capsa("kill", "fresh", "KILL")
            with contextlib.suppress(ChildProcessError, TimeoutError):
                os.waitpid(shim, 0)
            delete(capsa, "fresh", "--force")
