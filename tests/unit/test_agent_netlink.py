"""The pyroute2 shell (capsa.agent.netlink) against a small in-memory kernel.

FakeKernel stands in for pyroute2's AsyncIPRoute (acceptable ONLY in unit
tests; tests/integration/test_agent_network_vm.py drives the real
pyroute2 against a real guest kernel).  It keeps the rules of rtnetlink
that the agent's order of operations depends on: a running link cannot be
renamed (EBUSY), an address brings its prefix route (proto kernel), a
gateway must be reachable on a link (ENETUNREACH), a route cannot be added
twice (EEXIST) nor deleted when absent (ESRCH).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from capsa.agent.netlink import GuestNetwork
from capsa.agent.network import InterfaceNotFound, NetlinkFailed
from capsa.errors import InvalidArgument
from capsa.protocols import agent_pb2 as pb

MAC = "02:42:0a:58:00:05"


class NetlinkError(Exception):
    """Named like pyroute2's: the shell recognises it by name and ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class FakeLink:
    index: int
    name: str
    mac: str
    mtu: int = 1500
    up: bool = False


@dataclass
class FakeRoute:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str | None
    oif: int
    prefsrc: str | None = None
    scope: int = 0
    proto: int = 4  # RTPROT_STATIC

    def message(self) -> dict[str, Any]:
        return {
            "family": 2 if self.dst.version == 4 else 10,
            "dst_len": self.dst.prefixlen,
            "dst": None if self.dst.prefixlen == 0 else str(self.dst.network_address),
            "gateway": self.gateway,
            "oif": self.oif,
            "prefsrc": self.prefsrc,
            "scope": self.scope,
            "proto": self.proto,
            "type": 1,
            "table": 254,
        }


@dataclass
class FakeKernel:
    links: list[FakeLink] = field(default_factory=lambda: [FakeLink(1, "lo", "00:00:00:00:00:00", 65536, True)])
    addresses: list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]] = field(default_factory=list)
    routes: list[FakeRoute] = field(default_factory=list)
    #: A link that shows up only after this many link dumps (a hot-plug in flight).
    pending: tuple[int, FakeLink] | None = None
    writes: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    closed: int = 0

    # --- what AsyncIPRoute offers ---------------------------------------------

    def __call__(self) -> FakeKernel:
        return self

    def close(self) -> None:
        self.closed += 1

    async def get_links(self) -> AsyncIterator[dict[str, Any]]:
        if self.pending is not None:
            dumps, link = self.pending
            self.pending = (dumps - 1, link) if dumps > 1 else None
            if dumps <= 1:
                self.links.append(link)
        return _each(
            [{"index": link.index, "ifname": link.name, "address": link.mac, "mtu": link.mtu, "flags": int(link.up)}
             for link in self.links]
        )  # fmt: skip

    async def get_addr(self, index: int) -> AsyncIterator[dict[str, Any]]:
        return _each(
            [
                {"index": i, "address": str(a.ip), "prefixlen": a.network.prefixlen}
                for i, a in self.addresses
                if i == index
            ]
        )

    async def get_routes(self, table: int) -> AsyncIterator[dict[str, Any]]:
        assert table == 254
        return _each([route.message() for route in self.routes])

    async def link(self, command: str, **fields: Any) -> None:
        self.writes.append(("link", command, fields))
        link = next(item for item in self.links if item.index == fields["index"])
        if "ifname" in fields:
            if link.up:
                raise NetlinkError(errno.EBUSY)
            if any(item.name == fields["ifname"] for item in self.links):
                raise NetlinkError(errno.EEXIST)
            link.name = fields["ifname"]
        if "mtu" in fields:
            link.mtu = fields["mtu"]
        if "state" in fields:
            link.up = fields["state"] == "up"

    async def addr(self, command: str, **fields: Any) -> None:
        self.writes.append(("addr", command, fields))
        entry = (fields["index"], ipaddress.ip_interface(f"{fields['address']}/{fields['prefixlen']}"))
        prefix = FakeRoute(entry[1].network, None, entry[0], str(entry[1].ip), 253, proto=2)
        if entry[1].version == 6:
            prefix.prefsrc, prefix.scope = None, 0
        if command == "add":
            if entry in self.addresses:
                raise NetlinkError(errno.EEXIST)
            self.addresses.append(entry)
            self.routes.append(prefix)
        else:
            self.addresses.remove(entry)
            self.routes = [r for r in self.routes if r != prefix]

    async def route(self, command: str, **fields: Any) -> None:
        self.writes.append(("route", command, fields))
        dst = ipaddress.ip_network(fields["dst"])
        key = (dst, fields.get("gateway"), fields["oif"])
        found = [r for r in self.routes if (r.dst, r.gateway, r.oif) == key]
        if command == "del":
            if not found:
                raise NetlinkError(errno.ESRCH)
            self.routes.remove(found[0])
            return
        if any(r.dst == dst and r.oif == fields["oif"] for r in self.routes):
            raise NetlinkError(errno.EEXIST)
        gateway = fields.get("gateway")
        if gateway is not None and not any(
            ipaddress.ip_address(gateway) in r.dst and r.gateway is None and r.dst.prefixlen > 0 for r in self.routes
        ):
            raise NetlinkError(errno.ENETUNREACH)
        self.routes.append(
            FakeRoute(dst, gateway, fields["oif"], fields.get("prefsrc"), fields.get("scope", 0), proto=4)
        )


async def _each(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def interface(**fields: Any) -> pb.Interface:
    defaults: dict[str, Any] = {
        "hw_addr": MAC,
        "name": "eth0",
        "mtu": 1450,
        "addresses": [pb.IPAddress(address="10.88.0.5", prefix_length=16)],
    }
    return pb.Interface(**{**defaults, **fields})


def test_a_nic_still_being_plugged_is_waited_for_then_configured() -> None:
    kernel = FakeKernel(pending=(3, FakeLink(3, "eth1", MAC, up=True)))
    # The kernel gave eth0 to another NIC: it moves aside until its own call.
    kernel.links.append(FakeLink(2, "eth0", "02:00:00:00:00:01", up=True))
    reply = asyncio.run(GuestNetwork(link_wait_seconds=5, iproute=kernel).update_interface(interface()))
    assert reply == pb.Interface(
        device="eth0",
        name="eth0",
        mtu=1450,
        hw_addr=MAC,
        addresses=[pb.IPAddress(address="10.88.0.5", prefix_length=16)],
    )
    state = {link.index: (link.name, link.mtu, link.up) for link in kernel.links}
    assert state == {1: ("lo", 65536, True), 2: ("capsa2", 1500, True), 3: ("eth0", 1450, True)}
    assert kernel.closed == 1


def test_a_nic_that_never_appears_is_not_found_naming_the_links_there() -> None:
    kernel = FakeKernel()
    with pytest.raises(InterfaceNotFound, match=r"MAC 02:42:0a:58:00:05 did not appear .* within 0.05 s \(links: lo"):
        asyncio.run(GuestNetwork(link_wait_seconds=0.05, iproute=kernel).update_interface(interface()))
    assert kernel.writes == []
    assert kernel.closed == 1


def test_bad_input_is_refused_before_netlink_is_opened() -> None:
    kernel = FakeKernel()
    with pytest.raises(InvalidArgument):
        asyncio.run(GuestNetwork(iproute=kernel).update_interface(interface(mtu=10)))
    assert kernel.closed == 0


def routes(*items: tuple[str, str]) -> list[pb.Route]:
    return [pb.Route(dest=dest, gateway=gateway, device="eth0") for dest, gateway in items]


def test_routes_are_set_a_repeat_writes_nothing_and_a_refusal_keeps_what_was_there() -> None:
    kernel = FakeKernel(links=[FakeLink(1, "lo", "00:00:00:00:00:00", 65536, True), FakeLink(2, "eth1", MAC)])
    network = GuestNetwork(iproute=kernel)

    async def scenario() -> tuple[list[pb.Route], list[pb.Route], str]:
        await network.update_interface(interface())
        wanted = routes(("default", "10.88.0.1"), ("192.168.0.0/16", "10.88.0.254"))
        first = await network.update_routes(wanted)
        kernel.writes.clear()
        again = await network.update_routes(wanted)
        assert kernel.writes == []
        with pytest.raises(NetlinkFailed) as refused:
            await network.update_routes(routes(("default", "10.88.0.1"), ("10.50.0.0/16", "10.77.0.1")))
        return first, again, str(refused.value)

    first, again, refused = asyncio.run(scenario())
    expected = [
        pb.Route(dest="10.88.0.0/16", device="eth0", source="10.88.0.5", scope=253),
        pb.Route(dest="192.168.0.0/16", gateway="10.88.0.254", device="eth0"),
        pb.Route(dest="0.0.0.0/0", gateway="10.88.0.1", device="eth0"),
    ]
    assert first == again == expected  # in the kernel's order: the default route went in last
    assert refused == "adding route 10.50.0.0/16 via 10.77.0.1 dev eth0: Network is unreachable"
    # The route that was to go after the refused addition is still there.
    assert {str(r.dst) for r in kernel.routes} == {"10.88.0.0/16", "0.0.0.0/0", "192.168.0.0/16"}


def test_an_unknown_device_in_a_route_is_bad_input() -> None:
    kernel = FakeKernel()
    with pytest.raises(InvalidArgument, match="no link 'eth0'"):
        asyncio.run(GuestNetwork(iproute=kernel).update_routes(routes(("default", "10.0.0.1"))))
    assert kernel.writes == []
