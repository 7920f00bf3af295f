"""A CRI pod's containers share its /dev/shm (containerd 1.6 binds the sandbox's shm dir into each).

Under capsa that host tmpfs becomes one guest tmpfs of the same size (64 MiB,
containerd's default), which the agent mounts once for the pod's VM: a file
one container writes in /dev/shm is there for the other, and the host's
shm dir never sees it.  Under runc the two containers bind the host dir
itself; the same assertions about sharing hold, which proves the harness.
"""

from __future__ import annotations

import pytest
from cri import api_pb2 as cri
from cri.harness import ShimContainerd

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

SLEEP = ["sleep", "3600"]
SHM = "grep ' /dev/shm ' /proc/mounts | cut -d' ' -f3; df -k /dev/shm | tail -n 1 | tr -s ' ' | cut -d' ' -f2"


def test_a_pods_containers_share_dev_shm(k: ShimContainerd, handler: str) -> None:
    with k.pod(f"shm-{handler}", handler) as (pod_id, pod):
        ids = [k.create_container(pod_id, pod, name, SLEEP) for name in ("writer", "reader")]
        for cid in ids:
            k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        writer, reader = ids

        assert k.sh(writer, SHM).split() == ["tmpfs", "65536"]
        assert k.sh(reader, SHM).split() == ["tmpfs", "65536"]
        k.sh(writer, "echo from-the-writer > /dev/shm/segment")
        assert k.sh(reader, "cat /dev/shm/segment") == "from-the-writer\n"
        k.sh(reader, "rm /dev/shm/segment")
        assert k.sh(writer, "ls /dev/shm") == ""
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
