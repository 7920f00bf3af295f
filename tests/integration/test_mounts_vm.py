"""Spec bind mounts reach a container in a VM: host directories and single files, rw and ro.

The bundle carries the mounts an engine adds (a single-file bind over
/etc/hosts, as Podman and Docker do from their own directories) and a
user's volumes (a read-write directory, a read-only file).  `capsa run`
binds their sources into the sandbox's shared directory on the host, and
crun in the guest binds them into the container.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness import Capsa

SCRIPT = """
cat /data/in
echo from-the-container > /data/out
cat /etc/hosts
cat /etc/app.ini
if echo overwritten 2>/dev/null > /etc/app.ini; then echo ro-write-allowed; else echo ro-write-refused; fi
"""


def bind(source: Path, destination: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source), "options": list(options)}


@pytest.mark.vm
@pytest.mark.slow
def test_bind_mounts_reach_the_container(capsa: Capsa, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "in").write_text("from-the-host\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.7 db.example\n")
    app_ini = tmp_path / "app.ini"
    app_ini.write_text("[app]\nmode = ro\n")

    capsa.spec(["sh", "-c", SCRIPT])
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"] += [
        bind(hosts, "/etc/hosts", "bind", "rprivate"),
        bind(volume, "/data", "rbind", "rw", "rprivate"),
        bind(app_ini, "/etc/app.ini", "rbind", "ro", "rprivate"),
    ]
    config.write_text(json.dumps(spec))

    result = capsa.run("mounts")

    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "from-the-host",
        "10.0.0.7 db.example",
        "[app]",
        "mode = ro",
        "ro-write-refused",
    ]
    assert (volume / "out").read_text() == "from-the-container\n"
    assert app_ini.read_text() == "[app]\nmode = ro\n"


def test_a_missing_bind_source_is_one_line(capsa: Capsa, tmp_path: Path) -> None:
    capsa.spec(["true"])
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"].append(bind(tmp_path / "gone", "/data", "rbind"))
    config.write_text(json.dumps(spec))

    result = capsa.run("missing")

    assert result.code != 0
    assert result.stderr.strip().splitlines() == [
        f"capsa: mounts[{len(spec['mounts']) - 1}]: bind source {tmp_path}/gone: no such file or directory"
    ]


@pytest.mark.parametrize(("kind", "label"), [("network", "network"), ("pid", "PID"), ("ipc", "IPC")])
def test_the_hosts_namespaces_are_refused(capsa: Capsa, kind: str, label: str) -> None:
    capsa.spec(["true"])
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != kind]
    config.write_text(json.dumps(spec))

    result = capsa.run("hostns")

    assert result.code != 0
    assert result.stderr.strip() == (
        f"capsa: the host's {label} namespace cannot be shared with a container in a VM "
        f"(use a {label} namespace of its own)"
    )
