"""Host mounts made after a container started reach it for rslave, not for rprivate (issue 3).

What runc shows, and what Kubernetes' ``mountPropagation: HostToContainer``
(kubelet passes ``rslave``), ``docker -v SRC:DST:rslave`` and Podman rely
on: a volume whose source is a shared mount on the host, and a mount the
host makes under it once the container runs.  The chain is the host's
mount, the proxy's slave mount namespace, the bind in the shared dir,
virtiofsd's (or QEMU's 9p server's) view, the guest's virtio-fs submount,
and crun's bind in the guest.  The mounts this test makes on the host are
undone whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Capsa, subreaper
from test_lifecycle import create, delete, start

from capsa.config import load_config


def host_mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def shared_volume(path: Path) -> Iterator[Path]:
    """``path`` made a shared mount of its own (as a systemd host's / is); every mount below it undone at the end."""
    path.mkdir()
    host_mount("--bind", str(path), str(path))
    try:
        host_mount("--make-shared", str(path))
        yield path
    finally:
        # Lazily, deepest first: whatever the test mounted below goes with it.
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(path) or line.split()[4].startswith(f"{path}/")
        ]
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def exec_in(capsa: Capsa, cid: str, script: str) -> str:
    result = capsa("exec", cid, "sh", "-c", script)
    assert result.code == 0, result.stderr
    return result.stdout


@pytest.fixture(params=["virtio-fs", "virtio-9p"])
def shared_fs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The host's configuration with ``shared_fs.kind`` set (9p is served by QEMU, in the proxy's namespace)."""
    kind: str = request.param
    if kind != load_config().shared_fs.kind:
        source = Path(os.environ.get("CAPSA_CONFIG", "/etc/capsa/configuration.toml"))
        text = source.read_text() if source.exists() else ""
        config = tmp_path / "configuration.toml"
        config.write_text(text.replace('kind = "virtio-fs"', f'kind = "{kind}"'))
        monkeypatch.setenv("CAPSA_CONFIG", str(config))
        assert load_config(str(config)).shared_fs.kind == kind
    return kind


@pytest.mark.vm
@pytest.mark.slow
def test_host_mounts_after_start_reach_rslave_not_rprivate(capsa: Capsa, tmp_path: Path, shared_fs: str) -> None:
    with shared_volume(tmp_path / "volume") as volume, subreaper():
        for name in ("slave", "private"):
            (volume / name / "sub").mkdir(parents=True)
        capsa.spec(["sleep", "600"])
        config = capsa.bundle / "config.json"
        spec = json.loads(config.read_text())
        spec["mounts"] += [
            {"destination": "/slave", "type": "bind", "source": str(volume / "slave"), "options": ["rbind", "rslave"]},
            {
                "destination": "/private",
                "type": "bind",
                "source": str(volume / "private"),
                "options": ["rbind", "rprivate"],
            },
        ]
        config.write_text(json.dumps(spec))
        shim = create(capsa, "prop")
        try:
            start(capsa, "prop")
            # Looked up (and cached by the guest) while still empty.
            assert exec_in(capsa, "prop", "ls -a /slave/sub /private/sub") == (
                "/private/sub:\n.\n..\n\n/slave/sub:\n.\n..\n"
            )
            for name in ("slave", "private"):
                host_mount("-t", "tmpfs", "tmpfs", str(volume / name / "sub"))
                (volume / name / "sub" / "f").write_text(f"host {name}\n")

            # Promptly: the very next look from the container sees the host's
            # new mount (the bind-volume share caches no entries), no retry.
            seen = exec_in(capsa, "prop", "cat /slave/sub/f 2>/dev/null; true")
            assert seen == "host slave\n"
            # Written in the container, it lands on the host's new tmpfs.
            exec_in(capsa, "prop", "echo from-the-guest > /slave/sub/g")
            assert (volume / "slave" / "sub" / "g").read_text() == "from-the-guest\n"
            # rprivate: still the empty directory under the host's mount.
            assert exec_in(capsa, "prop", "ls -a /private/sub") == ".\n..\n"
        finally:
            capsa("kill", "prop", "KILL")
            with contextlib.suppress(ChildProcessError, TimeoutError):
                os.waitpid(shim, 0)
            delete(capsa, "prop", "--force")


@pytest.mark.vm
def test_rshared_is_refused_at_create(capsa: Capsa, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    capsa.spec(["true"])
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rshared"]}
    )
    config.write_text(json.dumps(spec))

    result = capsa("create", "--bundle", str(capsa.bundle), "shared")

    assert result.code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("capsa: mount propagation rshared of /vol cannot cross the VM boundary: ")
    assert not (capsa.root / "shared").exists()
