"""What a killed VM leaves in the engine's network namespace, and :func:`capsa.network.attach.sweep`.

No VM: the test makes the mirror itself with :mod:`capsa.network.tc`, as
the proxy does, then deletes the tap as QEMU's death would.  Needs root
(network namespaces of the test's own, torn down however it ends).
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterator

import pytest

from capsa.network import netns, tc
from capsa.network.attach import sweep

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def ingress_qdiscs(name: str) -> list[str]:
    out = subprocess.run(["tc", "-n", name, "qdisc", "show"], check=True, capture_output=True, text=True).stdout
    return sorted(line.split(" dev ")[1].split()[0] for line in out.splitlines() if "ingress" in line)


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"capsa-sweep-{os.getpid() % 10000}-{random.randrange(1 << 16):04x}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ip("-n", name, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
        ip("-n", name, "tuntap", "add", "tap0_capsa", "mode", "tap")
        for link in ("eth0", "eth1", "other0", "other1", "tap0_capsa"):
            ip("-n", name, "link", "set", link, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_namespace(name: str, work: Callable[[], None]) -> None:
    fd = netns.open_netns(f"/run/netns/{name}")
    try:
        netns.run_in_netns(fd, work, "set up the test")
    finally:
        os.close(fd)


def test_sweep_removes_the_mirror_of_a_dead_tap_and_keeps_the_rest(namespace: str) -> None:
    def set_up() -> None:
        made: list[tc.IngressQdisc] = []
        with netns.iproute() as ipr:
            tc.apply(ipr, tc.mirror_plan("eth0", "tap0_capsa"), made)
            # Somebody else's mirror between two links that both live: not ours to touch.
            tc.apply(ipr, tc.mirror_plan("other0", "other1"), made)

    in_namespace(namespace, set_up)
    ip("-n", namespace, "link", "add", "mvtap3_capsa", "link", "eth1", "type", "macvtap", "mode", "passthru")
    assert ingress_qdiscs(namespace) == ["eth0", "other0", "other1", "tap0_capsa"]
    # QEMU's death: the tap goes, the veth's filter now redirects to nowhere.
    ip("-n", namespace, "link", "del", "tap0_capsa")

    assert sweep(f"/run/netns/{namespace}") == []

    assert ingress_qdiscs(namespace) == ["other0", "other1"]
    links = ip("-n", namespace, "-o", "link")
    assert "_capsa" not in links
    assert "eth0" in links and "eth1" in links
    # A second sweep finds nothing to do.
    assert sweep(f"/run/netns/{namespace}") == []


def test_sweep_of_a_namespace_that_is_gone_does_nothing() -> None:
    assert sweep("/run/netns/capsa-no-such-namespace") == []


def test_an_empty_namespace_is_read_without_pyroute2() -> None:
    """A new namespace (only lo) has nothing to mirror: the proxy must not pay pyroute2's import for it."""
    import sys

    name = f"capsa-empty-{os.getpid() % 10000}-{random.randrange(1 << 16):04x}"
    ip("netns", "add", name)
    try:
        script = (
            "import os, sys\n"
            "from capsa.network import netns\n"
            f"fd = netns.open_netns('/run/netns/{name}')\n"
            "print(netns.run_in_netns(fd, netns.read_links_addresses_routes, 'read'), 'pyroute2' in sys.modules)\n"
        )
        empty = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
        assert empty == "([], [], []) False\n"
        ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        found = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
        assert "name='eth0'" in found and found.endswith(" True\n")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
