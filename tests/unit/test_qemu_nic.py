"""The QMP arguments of a hot-plugged NIC; pure."""

from __future__ import annotations

from capsa.hypervisor.qemu import nic_arguments


def test_nic_arguments() -> None:
    netdev, device = nic_arguments("nic0-tap", "3a:5b:00:11:22:33", 1450, 0, "hotplug1", vhost=False)
    assert netdev == {"type": "tap", "id": "netdev0", "fd": "nic0-tap", "vhost": False}
    assert device == {
        "driver": "virtio-net-pci",
        "id": "nic0",
        "netdev": "netdev0",
        "mac": "3a:5b:00:11:22:33",
        "host_mtu": 1450,
        "bus": "hotplug1",
        "romfile": "",
    }
