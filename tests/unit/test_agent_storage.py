"""The agent's side of Storage.subpath: where a share's directory is, and the bind that puts it in place."""

from __future__ import annotations

import pytest

from capsa.agent import libc, storage
from capsa.agent.sandbox import _refuse_subpath
from capsa.errors import InvalidArgument, StorageError
from capsa.protocols import agent_pb2 as pb
from capsa.runtime import mounts
from capsa.runtime.mounts import GUEST_SHARE_DIR


def test_subpath_inside_the_share() -> None:
    assert storage.share_subpath(GUEST_SHARE_DIR, "c1/rootfs") == "/run/capsa/shared/c1/rootfs"
    assert storage.share_subpath("/s", "./c1//rootfs/") == "/s/c1/rootfs"


@pytest.mark.parametrize("subpath", ["", "/etc", "../etc", "c1/../../etc", ".", "./"])
def test_subpath_cannot_leave_the_share(subpath: str) -> None:
    with pytest.raises(InvalidArgument):
        storage.share_subpath("/s", subpath)


def test_bind_request() -> None:
    request = storage.bind_request("/s/c1/rootfs", "/run/capsa/containers/c1/rootfs")
    assert request == storage.MountRequest("/s/c1/rootfs", "/run/capsa/containers/c1/rootfs", "", libc.MS_BIND)


def test_the_share_of_a_subpath_storage_is_mounted_at_its_mount_point() -> None:
    share = pb.Storage(
        driver="virtiofs", source="rootfs", fstype="virtiofs", mount_point=GUEST_SHARE_DIR, subpath="c/rootfs"
    )
    assert storage.mount_request(share) == storage.MountRequest("rootfs", GUEST_SHARE_DIR, "virtiofs")


def test_subpath_only_for_a_rootfs() -> None:
    _refuse_subpath([pb.Storage(driver="local", mount_point="/x")])
    with pytest.raises(InvalidArgument, match="only supported for a container's rootfs"):
        _refuse_subpath([pb.Storage(driver="virtiofs", source="v", mount_point="/x", subpath="a")])


def test_a_failed_bind_names_its_source() -> None:
    # Nothing can be created under /proc, root or not: the mount point fails.
    with pytest.raises(StorageError) as error:
        storage.mount(storage.bind_request("/nonexistent-capsa-src", "/proc/nonexistent-capsa/target"))
    assert str(error.value) == (
        "cannot mount bind of /nonexistent-capsa-src at /proc/nonexistent-capsa/target: No such file or directory"
    )


def test_the_agent_reads_the_block_device_annotation_the_host_writes() -> None:
    # Two definitions on purpose: the agent must not import the host's mounts module (see storage.py).
    assert storage.BLOCK_DEVICE_ANNOTATION == mounts.BLOCK_DEVICE_ANNOTATION
