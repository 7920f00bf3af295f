"""A pod's containers that mount one host directory see each other's writes, and the host's at once.

Under capsa the pod's VM serves every host bind from its volume share (a
virtiofsd of its own with ``-o timeout=0``, docs/architecture.md): both
containers' binds of the directory go through it, so a write of one is
read by the other, and an append or a deletion the host makes is what the
next read in either container sees.  Under runc both bind the host
directory itself; the same assertions hold, which proves the harness.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cri import api_pb2 as cri
from cri.harness import ShimContainerd

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

SLEEP = ["sleep", "3600"]


def test_a_pods_containers_share_a_host_directory(k: ShimContainerd, handler: str, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "gone").write_text("soon gone\n")
    mount = cri.Mount(container_path="/v", host_path=str(volume))
    with k.pod(f"vol-{handler}", handler) as (pod_id, pod):
        ids = [k.create_container(pod_id, pod, name, SLEEP, mounts=[mount]) for name in ("writer", "reader")]
        for cid in ids:
            k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        writer, reader = ids

        k.sh(writer, "echo one > /v/note")
        assert k.sh(reader, "cat /v/note; ls /v") == "one\ngone\nnote\n"
        k.sh(reader, "echo two >> /v/note")
        assert k.sh(writer, "cat /v/note") == "one\ntwo\n"
        assert (volume / "note").read_text() == "one\ntwo\n"

        with (volume / "note").open("a") as note:
            note.write("three-from-the-host\n")
        (volume / "gone").unlink()
        assert k.sh(writer, "cat /v/note; ls /v") == "one\ntwo\nthree-from-the-host\nnote\n"
        assert k.sh(reader, "cat /v/note; ls /v") == "one\ntwo\nthree-from-the-host\nnote\n"
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
