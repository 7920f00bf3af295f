"""Volumes beyond plain binds: block volumes (virtio-blk), /dev/shm, tmpfs sizes, subPath, a shared directory.

Each test boots real VMs (TCG here) through `capsa run` / `capsa create`.
A raw ext4 image file is the block volume (mkfs.ext4 on a file: no loop
device is needed, QEMU opens the file itself), and debugfs reads it back
on the host once the container has gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa, subreaper

# Applets these tests need beyond the harness's rootfs.
EXTRA_APPLETS = ("df", "dd", "cut", "tr", "sync", "tail", "head")


def add_applets(capsa: Capsa) -> None:
    bin_dir = capsa.bundle / "rootfs" / "bin"
    for applet in EXTRA_APPLETS:
        if not (bin_dir / applet).exists():
            os.symlink("busybox", bin_dir / applet)


def set_mounts(capsa: Capsa, *mounts: dict[str, Any]) -> dict[str, Any]:
    config = capsa.bundle / "config.json"
    spec: dict[str, Any] = json.loads(config.read_text())
    spec["mounts"] += list(mounts)
    config.write_text(json.dumps(spec))
    return spec


def ext4_image(path: Path, size_mib: int = 32, files: dict[str, str] | None = None) -> Path:
    """A raw image file with an ext4 filesystem, optionally holding ``files`` (written with debugfs)."""
    with path.open("wb") as image:
        image.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    for name, content in (files or {}).items():
        source = path.parent / f".{name}.src"
        source.write_text(content)
        subprocess.run(["debugfs", "-w", "-R", f"write {source} {name}", str(path)], check=True, capture_output=True)
        source.unlink()
    return path


def read_from_image(image: Path, name: str) -> str:
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], check=True, capture_output=True, text=True)
    return result.stdout


needs_e2fsprogs = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None, reason="needs e2fsprogs"
)


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """A host block device backed by ``image`` (losetup), detached afterwards; skips where loop devices fail."""
    try:
        found = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("losetup is not installed")
    if found.returncode != 0:
        pytest.skip(f"no loop device: {found.stderr.strip()}")
    device = found.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@needs_e2fsprogs
@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize("form", ["ext4-file", "bind-blockdev"])
def test_a_block_volume_is_a_virtio_blk_disk(capsa: Capsa, tmp_path: Path, form: str) -> None:
    """Written in the container, read back on the host after the container is gone.

    ``ext4-file``: a mount of type ext4 whose source is a raw image file.
    ``bind-blockdev``: a bind whose source is a host block device (a loop
    device over the same kind of image), as Kata attaches it.  Either way
    the guest gets a virtio-blk disk, found by its serial, mounted ext4.
    """
    add_applets(capsa)
    image = ext4_image(tmp_path / "disk.img", files={"hello": "from-the-host\n"})
    script = (
        "cat /data/hello; echo from-the-container > /data/out; sync; "
        "grep ' /data ' /proc/self/mounts | cut -d' ' -f1,3,4 | cut -d, -f1"
    )
    capsa.spec(["sh", "-c", script])
    with contextlib.ExitStack() as stack:
        if form == "ext4-file":
            set_mounts(capsa, {"destination": "/data", "type": "ext4", "source": str(image), "options": ["rw"]})
        else:
            device = stack.enter_context(loop_device(image))
            set_mounts(capsa, {"destination": "/data", "type": "bind", "source": device, "options": ["rbind", "rw"]})

        result = capsa.run("blk")

    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "from-the-host", lines
    # The guest's own disk (vda, vdb ...: whichever name the kernel gave it), ext4, read-write.
    source, fstype, mode = lines[1].split()
    assert source.startswith("/dev/vd") and fstype == "ext4" and mode == "rw", lines
    assert read_from_image(image, "out") == "from-the-container\n"


@needs_e2fsprogs
@pytest.mark.vm
@pytest.mark.slow
def test_a_block_device_the_host_has_mounted_is_refused_read_write(capsa: Capsa, tmp_path: Path) -> None:
    """Two kernels mounting one filesystem corrupt it: a rw block volume must be the guest's alone."""
    image = ext4_image(tmp_path / "busy.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    capsa.spec(["true"])
    with loop_device(image) as device:
        subprocess.run(["mount", device, str(mnt)], check=True)
        try:
            set_mounts(capsa, {"destination": "/data", "type": "bind", "source": device, "options": ["rbind", "rw"]})
            result = capsa.run("busy")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)

    assert result.code != 0
    assert result.stderr.strip() == (
        f"capsa: block device {device} is mounted on the host: the VM cannot mount it read-write as well (use ro)"
    )


@pytest.mark.vm
@pytest.mark.slow
def test_a_block_device_in_linux_devices_is_the_containers_raw_disk(capsa: Capsa, tmp_path: Path) -> None:
    """`docker run --device /dev/loopN:/dev/xvdc`: the container writes the raw disk; the host reads the bytes."""
    add_applets(capsa)
    image = tmp_path / "raw.img"
    with image.open("wb") as raw:
        raw.write(b"host-wrote-this\n")
        raw.truncate(8 << 20)
    script = "head -c 16 /dev/xvdc; echo capsa-raw-write | dd of=/dev/xvdc bs=512 seek=1 conv=fsync 2>/dev/null"
    capsa.spec(["sh", "-c", script])
    with loop_device(image) as device:
        rdev = os.stat(device).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        config = capsa.bundle / "config.json"
        spec = json.loads(config.read_text())
        spec["linux"]["devices"] = [
            {"path": "/dev/xvdc", "type": "b", "major": major, "minor": minor, "fileMode": 0o660, "uid": 0, "gid": 0}
        ]
        spec["linux"].setdefault("resources", {}).setdefault("devices", []).append(
            {"allow": True, "type": "b", "major": major, "minor": minor, "access": "rwm"}
        )
        config.write_text(json.dumps(spec))

        result = capsa.run("rawdev")

    assert result.code == 0, result.stderr
    assert result.stdout == "host-wrote-this\n"
    with image.open("rb") as raw:
        raw.seek(512)
        assert raw.read(16) == b"capsa-raw-write\n"


@needs_e2fsprogs
@pytest.mark.vm
@pytest.mark.slow
def test_a_read_only_block_volume_refuses_writes(capsa: Capsa, tmp_path: Path) -> None:
    add_applets(capsa)
    image = ext4_image(tmp_path / "ro.img", files={"hello": "read-only\n"})
    before = image.read_bytes()
    script = (
        "cat /data/hello; "
        "if echo x 2>/dev/null > /data/new; then echo write-allowed; else echo write-refused; fi; "
        "grep ' /data ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1"
    )
    capsa.spec(["sh", "-c", script])
    set_mounts(capsa, {"destination": "/data", "type": "ext4", "source": str(image), "options": ["ro"]})

    result = capsa.run("blkro")

    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == ["read-only", "write-refused", "ro"]
    assert image.read_bytes() == before  # not even the journal was replayed or touched


@pytest.mark.vm
@pytest.mark.slow
def test_a_tmpfs_mount_keeps_its_size(capsa: Capsa) -> None:
    """An emptyDir-style tmpfs of 8 MiB: df shows 8 MiB and a 9 MiB write fails with ENOSPC."""
    add_applets(capsa)
    script = (
        "df -k /scratch | tail -n 1 | tr -s ' ' | cut -d' ' -f2; "
        "if dd if=/dev/zero of=/scratch/big bs=1M count=9 2>/dev/null; then echo fits; else echo full; fi"
    )
    capsa.spec(["sh", "-c", script])
    set_mounts(
        capsa,
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=8m"]},
    )

    result = capsa.run("tmpfs")

    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == ["8192", "full"]


@pytest.mark.vm
@pytest.mark.slow
def test_the_engines_shm_dir_becomes_a_guest_tmpfs_of_its_size(capsa: Capsa, tmp_path: Path) -> None:
    """Podman and Docker bind a host tmpfs (size=--shm-size) at /dev/shm: the guest makes its own, same size."""
    add_applets(capsa)
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=1777", "shm", str(shm)], check=True)
    try:
        (shm / "host-only").write_text("x")
        script = (
            "grep ' /dev/shm ' /proc/self/mounts | cut -d' ' -f3; "
            "df -k /dev/shm | tail -n 1 | tr -s ' ' | cut -d' ' -f2; "
            "ls /dev/shm; echo guest > /dev/shm/seg; cat /dev/shm/seg"
        )
        capsa.spec(["sh", "-c", script])
        config = capsa.bundle / "config.json"
        spec = json.loads(config.read_text())
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
        spec["mounts"].append(
            {
                "destination": "/dev/shm",
                "type": "bind",
                "source": str(shm),
                "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"],
            }
        )
        config.write_text(json.dumps(spec))

        result = capsa.run("shm")

        assert result.code == 0, result.stderr
        # tmpfs (not virtiofs), 16 MiB, and none of the host's files: the guest's own.
        assert result.stdout.splitlines() == ["tmpfs", "16384", "guest"]
        assert sorted(os.listdir(shm)) == ["host-only"]
    finally:
        subprocess.run(["umount", str(shm)], check=True)


@pytest.mark.vm
@pytest.mark.slow
def test_a_subdirectory_of_a_volume_is_mounted_alone(capsa: Capsa, tmp_path: Path) -> None:
    """A Kubernetes subPath: a bind of one subdirectory of a volume; the rest of the volume stays out of reach."""
    volume = tmp_path / "volume"
    (volume / "app" / "conf").mkdir(parents=True)
    (volume / "secret").write_text("not for this container\n")
    (volume / "app" / "conf" / "a.conf").write_text("a=1\n")
    capsa.spec(["sh", "-c", "ls /conf; cat /conf/a.conf; echo b=2 > /conf/b.conf; ls /conf/.. | grep -c secret"])
    set_mounts(
        capsa, {"destination": "/conf", "type": "bind", "source": str(volume / "app" / "conf"), "options": ["rbind"]}
    )

    result = capsa.run("subpath")

    assert result.stdout.splitlines() == ["a.conf", "a=1", "0"], result.stderr
    assert (volume / "app" / "conf" / "b.conf").read_text() == "b=2\n"


@pytest.mark.vm
@pytest.mark.slow
def test_two_containers_share_a_host_directory(capsa: Capsa, tmp_path: Path) -> None:
    """Two capsa containers (two VMs) bind the same host directory: one writes, the other reads it while both run."""
    shared = tmp_path / "shared"
    shared.mkdir()
    writer = "echo hello-from-writer > /v/note; sleep 300"
    reader = (
        "i=0; while [ ! -s /v/note ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; cat /v/note; "
        "echo reply > /v/reply"
    )
    mount = {"destination": "/v", "type": "bind", "source": str(shared), "options": ["rbind", "rw"]}
    with subreaper():
        capsa.spec(["sh", "-c", writer])
        set_mounts(capsa, mount)
        created = capsa("create", "--bundle", str(capsa.bundle), "writer")
        assert created.code == 0, created.stderr
        try:
            assert capsa("start", "writer").code == 0
            capsa.spec(["sh", "-c", reader])
            set_mounts(capsa, mount)

            result = capsa.run("reader")

            assert result.code == 0, result.stderr
            assert result.stdout == "hello-from-writer\n"
            assert (shared / "reply").read_text() == "reply\n"
        finally:
            capsa("delete", "--force", "writer")
            time.sleep(0.2)
