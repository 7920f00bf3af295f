"""The proxy's two shares: the rootfs one and the bind-volume one (virtio-fs), or one (9p).

No VM, no root: what the proxy would bind where, and which shares its VM gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa.config import parse_config
from capsa.errors import CapsaError
from capsa.hypervisor import template
from capsa.hypervisor.base import SerialChannel, VirtioFsShare
from capsa.proxy.proxy import Proxy
from capsa.runtime.mounts import SHARE_TAG, VOLUME_SHARE_TAG, HostBind
from capsa.runtime.sandbox import ROOTFS_TAG, VOLUME_TAG, vm_config


def bind(target: str, share: str) -> HostBind:
    return HostBind(Path("/srv"), target, readonly=False, directory=True, recursive=True, share=share)


def test_the_tags_agree() -> None:
    assert (ROOTFS_TAG, VOLUME_TAG) == (SHARE_TAG, VOLUME_SHARE_TAG)


def test_virtio_fs_gets_a_volume_share_next_to_shared(tmp_path: Path) -> None:
    proxy = Proxy(parse_config({}), "c1", tmp_path)
    assert proxy.volumes is not None
    assert proxy.volumes.path == tmp_path / "volumes"
    assert proxy.sandbox.spec.volumes == tmp_path / "volumes"
    rootfs, volumes = bind("c1/rootfs", SHARE_TAG), bind("c1/mounts/3", VOLUME_SHARE_TAG)
    routed = {shared.path.name: own for shared, own in proxy._shared_dirs((rootfs, volumes))}
    assert routed == {"shared": (rootfs,), "volumes": (volumes,)}


def test_9p_has_one_share_for_everything(tmp_path: Path) -> None:
    proxy = Proxy(parse_config({"shared_fs": {"kind": "virtio-9p"}}), "c1", tmp_path)
    assert proxy.volumes is None
    assert proxy.sandbox.spec.volumes is None
    with pytest.raises(CapsaError, match="no share volumes"):
        proxy._shared_dirs((bind("c1/mounts/3", VOLUME_SHARE_TAG),))


def test_a_clone_gets_both_shares_plugged_rootfs_first(tmp_path: Path) -> None:
    proxy = Proxy(parse_config({}), "c1", tmp_path)
    shares = proxy.sandbox._virtiofs_shares()
    assert [(share.tag, share.socket_path.name) for share in shares] == [
        ("rootfs", "vfs.sock"),
        ("volumes", "vol.sock"),
    ]
    # Short names in a short directory (runtime/state.py: /run/capsa-vm/<key>/vm/).
    assert all(len(share.socket_path.name) <= len("agent.sock") for share in shares)
    vm = vm_config(proxy.config, proxy.sandbox.spec, "tcg", SerialChannel(tmp_path / "agent.sock"), shares, False)
    plugged = template.plugged_shares(vm)
    assert plugged == shares
    assert all(isinstance(share, VirtioFsShare) for share in plugged)
    # The template itself has neither: its key does not depend on them.
    assert template.template_vm(vm, tmp_path, tmp_path / "s", tmp_path / "m").shares == ()
