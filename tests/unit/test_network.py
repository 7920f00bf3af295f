"""The network's pure parts: what the guest is told of the engine's namespace, the tc plan, the QEMU NIC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from capsa.config import Config, load_config, parse_config
from capsa.errors import AgentError, ConfigError, NetworkError
from capsa.network import tc
from capsa.network.attach import NetworkAttachment, _agent_call, device_name
from capsa.network.model import (
    AF_INET,
    AF_INET6,
    RT_SCOPE_LINK,
    RTPROT_KERNEL,
    AddressInfo,
    Endpoint,
    LinkInfo,
    Route,
    RouteInfo,
    interface_message,
    routes_message,
    select_endpoints,
    select_routes,
)
from capsa.network.netns import _ifreq
from capsa.ttrpc.errors import Code, StatusError

REPO = Path(__file__).resolve().parents[2]

# A namespace as Podman's bridge leaves it (plus things that must be left out).
LINKS = [
    LinkInfo(1, "lo", "00:00:00:00:00:00", 65536, "", 772),
    LinkInfo(2, "eth0", "3A:5B:00:11:22:33", 1450, "veth"),
    LinkInfo(3, "gretap0", "00:00:00:00:00:00", 1462, "gretap"),  # a base tunnel device: no address
    LinkInfo(4, "tap0_capsa", "ee:00:00:00:00:01", 1450, "tun"),  # ours, from an earlier attach
    LinkInfo(5, "sit0", "", 1480, "sit", 776),
]
ADDRESSES = [
    AddressInfo(1, "127.0.0.1", 8),
    AddressInfo(1, "::1", 128),
    AddressInfo(2, "10.88.0.5", 16),
    AddressInfo(2, "fd00:88::5", 64),
    AddressInfo(2, "fe80::385b:ff:fe11:2233", 64),
    AddressInfo(4, "10.99.0.1", 24),
]
ROUTES = [
    RouteInfo(AF_INET, "", 0, 2, gateway="10.88.0.1"),
    RouteInfo(AF_INET, "10.88.0.0", 16, 2, prefsrc="10.88.0.5", scope=RT_SCOPE_LINK, proto=RTPROT_KERNEL),
    RouteInfo(AF_INET, "10.88.0.5", 32, 2, scope=254, proto=RTPROT_KERNEL, type=2, table=255),
    RouteInfo(AF_INET, "192.0.2.0", 24, 2, gateway="10.88.0.254"),
    RouteInfo(AF_INET, "198.51.100.0", 24, 2, prefsrc="10.88.0.5", scope=RT_SCOPE_LINK),
    RouteInfo(AF_INET6, "fd00:88::", 64, 2, proto=RTPROT_KERNEL),
    RouteInfo(AF_INET6, "fe80::", 64, 2, proto=RTPROT_KERNEL),
    RouteInfo(AF_INET6, "", 0, 2, gateway="fe80::1"),
    RouteInfo(AF_INET, "203.0.113.0", 24, 0, multipath=True),
    RouteInfo(AF_INET, "10.99.0.0", 24, 4, scope=RT_SCOPE_LINK),  # through our tap: not an endpoint
    RouteInfo(AF_INET, "", 0, 2, gateway="10.88.0.1", table=100),
    RouteInfo(AF_INET, "192.0.2.128", 25, 0, type=6),  # prohibit
]


def test_endpoints_are_the_configured_ethernet_links() -> None:
    (endpoint,) = select_endpoints(LINKS, ADDRESSES)
    assert endpoint == Endpoint(2, "eth0", "3a:5b:00:11:22:33", 1450, (("10.88.0.5", 16), ("fd00:88::5", 64)))
    assert endpoint.ipv4 == (("10.88.0.5", 16),)
    assert endpoint.ipv6 == (("fd00:88::5", 64),)


def test_a_namespace_with_only_loopback_has_no_endpoint() -> None:
    assert select_endpoints(LINKS[:1], ADDRESSES[:2]) == ()
    # An unconfigured veth (no address, or only the kernel's link-local) is not one either.
    assert select_endpoints(LINKS[:2], [AddressInfo(2, "fe80::1", 64)]) == ()


def test_routes_skip_what_the_guest_makes_itself_and_put_on_link_first() -> None:
    routes = select_routes(ROUTES, select_endpoints(LINKS, ADDRESSES))
    assert routes == (
        Route("198.51.100.0/24", "eth0", source="10.88.0.5", scope=RT_SCOPE_LINK),
        Route("0.0.0.0/0", "eth0", gateway="10.88.0.1"),
        Route("192.0.2.0/24", "eth0", gateway="10.88.0.254"),
        Route("::/0", "eth0", gateway="fe80::1"),
    )


def test_agent_messages() -> None:
    (endpoint,) = select_endpoints(LINKS, ADDRESSES)
    interface = interface_message(endpoint)
    assert (interface.device, interface.name, interface.hw_addr, interface.mtu) == (
        "eth0",
        "eth0",
        "3a:5b:00:11:22:33",
        1450,
    )
    assert [(a.address, a.prefix_length) for a in interface.addresses] == [("10.88.0.5", 16), ("fd00:88::5", 64)]
    message = routes_message((Route("0.0.0.0/0", "eth0", gateway="10.88.0.1"),))
    (route,) = message.routes
    fields = (route.dest, route.gateway, route.device, route.source, route.scope)
    assert fields == ("0.0.0.0/0", "10.88.0.1", "eth0", "", 0)


def test_mirror_plan_and_its_teardown() -> None:
    plan = tc.mirror_plan("eth0", "tap0_capsa")
    assert plan == (
        tc.IngressQdisc("eth0"),
        tc.IngressQdisc("tap0_capsa"),
        tc.Redirect("eth0", "tap0_capsa"),
        tc.Redirect("tap0_capsa", "eth0"),
    )
    assert tc.teardown_plan(plan) == (tc.IngressQdisc("tap0_capsa"), tc.IngressQdisc("eth0"))
    match_all = "parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect"
    assert [tc.tc_command(step) for step in plan] == [
        "tc qdisc add dev eth0 ingress",
        "tc qdisc add dev tap0_capsa ingress",
        f"tc filter add dev eth0 {match_all} dev tap0_capsa",
        f"tc filter add dev tap0_capsa {match_all} dev eth0",
    ]
    with pytest.raises(ValueError):
        tc.mirror_plan("eth0", "eth0")


def test_filter_request_matches_everything_and_redirects_to_the_target() -> None:
    request = tc.filter_request(2, 7)
    assert request["parent"] == 0xFFFF0000
    assert request["protocol"] == 0x0003  # ETH_P_ALL
    assert request["keys"] == ["0x0/0x0+0"]
    assert request["action"] == {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": 7}


class _FakeIPRoute:
    """Records tc calls; fails the call numbered ``fail_at`` like the kernel would."""

    def __init__(self, fail_at: int = -1, code: int = 17) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.attempts = 0
        self.fail_at = fail_at
        self.code = code

    def link_lookup(self, ifname: str) -> list[int]:
        return [{"eth0": 2, "tap0_capsa": 7}[ifname]] if ifname in ("eth0", "tap0_capsa") else []

    def tc(self, *args: object, **kwargs: object) -> None:
        from pyroute2 import NetlinkError

        self.attempts += 1
        if self.attempts - 1 == self.fail_at:
            raise NetlinkError(self.code)
        self.calls.append((*args, kwargs))


def test_apply_records_what_it_made_before_a_failure() -> None:
    ipr = _FakeIPRoute(fail_at=1)  # the tap's qdisc exists already
    made: list[tc.IngressQdisc] = []
    with pytest.raises(NetworkError, match=r"`tc qdisc add dev tap0_capsa ingress` failed: the link has one already"):
        tc.apply(ipr, tc.mirror_plan("eth0", "tap0_capsa"), made)
    assert made == [tc.IngressQdisc("eth0")]
    assert tc.remove(ipr, made) == []
    assert ipr.calls[-1] == ("del", "ingress", 2, 0xFFFF0000, {})


def test_apply_sends_the_plan() -> None:
    ipr = _FakeIPRoute()
    made: list[tc.IngressQdisc] = []
    tc.apply(ipr, tc.mirror_plan("eth0", "tap0_capsa"), made)
    assert [call[:3] for call in ipr.calls] == [
        ("add", "ingress", 2),
        ("add", "ingress", 7),
        ("add-filter", "u32", 2),
        ("add-filter", "u32", 7),
    ]
    assert ipr.calls[3][-1]["action"]["ifindex"] == 2  # type: ignore[index]


def test_remove_skips_links_that_are_gone() -> None:
    assert tc.remove(_FakeIPRoute(), [tc.IngressQdisc("tap9_capsa")]) == []


def test_device_names_fit_ifnamsiz() -> None:
    assert device_name("tcfilter", 0) == "tap0_capsa"
    assert device_name("macvtap", 3) == "mvtap3_capsa"
    assert len(device_name("macvtap", 99).encode()) < 16
    assert len(_ifreq("tap0_capsa", 0x5002)) == 40
    with pytest.raises(NetworkError, match="longer than 15"):
        _ifreq("a" * 16, 0)


def test_unknown_model_refused() -> None:
    with pytest.raises(NetworkError, match="unknown network model"):
        NetworkAttachment("/run/netns/x", "bridge")


def test_model_none_attaches_nothing() -> None:
    # No namespace is even opened (the path does not exist).
    asyncio.run(NetworkAttachment("/nonexistent", "none").attach(None, None))  # type: ignore[arg-type]


def test_an_agent_without_networking_is_named() -> None:
    async def unimplemented() -> None:
        try:
            raise StatusError(Code.UNIMPLEMENTED, "UpdateInterface is not implemented by this agent yet")
        except StatusError as exc:
            raise AgentError(exc.message) from exc

    async def refused() -> None:
        raise AgentError("no link with hw_addr 3a:5b:00:11:22:33 appeared")

    with pytest.raises(NetworkError, match=r"UpdateInterface is not implemented\): rebuild the guest image"):
        asyncio.run(_agent_call(unimplemented(), "UpdateInterface", "eth0"))
    with pytest.raises(NetworkError, match="could not configure its network eth0: no link with hw_addr"):
        asyncio.run(_agent_call(refused(), "UpdateInterface", "eth0"))


def test_network_config() -> None:
    assert Config().network.model == "tcfilter"
    assert load_config(str(REPO / "config" / "configuration.toml")).network == Config().network
    assert parse_config({"network": {"model": "macvtap"}}).network.model == "macvtap"
    with pytest.raises(ConfigError, match=r"network\.model: expected one of 'tcfilter', 'macvtap', 'none'"):
        parse_config({"network": {"model": "bridge"}})
    with pytest.raises(ConfigError, match=r"network\.queues: unknown key"):
        parse_config({"network": {"queues": 2}})


def test_a_spec_asking_for_a_new_network_namespace() -> None:
    from capsa.runtime.lifecycle import wants_private_netns

    assert wants_private_netns({"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}})
    assert wants_private_netns({"linux": {"namespaces": [{"type": "network", "path": ""}]}})
    assert not wants_private_netns({"linux": {"namespaces": [{"type": "network", "path": "/run/netns/cni-1"}]}})
    assert not wants_private_netns({"linux": {"namespaces": [{"type": "pid"}]}})  # the host's: refused elsewhere
    assert not wants_private_netns({})


class _Recorder:
    """The hypervisor and agent a refresh talks to: what it asked of them."""

    def __init__(self) -> None:
        self.interfaces: list[str] = []
        self.routes: list[list[str]] = []

        self.unplugged: list[int] = []

    async def plug_nic(self, tap_fd: int, mac: str, mtu: int, slot: int) -> None:
        raise AssertionError("_plug is replaced in these tests")

    async def unplug_nic(self, slot: int) -> None:
        self.unplugged.append(slot)

    async def update_interface(self, interface: object) -> object:
        self.interfaces.append(f"{interface.name} {[a.address for a in interface.addresses]}")  # type: ignore[attr-defined]
        return interface

    async def update_routes(self, routes: object) -> object:
        self.routes.append([r.dest for r in routes.routes])  # type: ignore[attr-defined]
        return routes


class _ScriptedAttachment(NetworkAttachment):
    """A refresh over a namespace given as data; plugging only records."""

    def __init__(self) -> None:
        super().__init__("/run/netns/scripted", "tcfilter")
        self.namespace: tuple[list[LinkInfo], list[AddressInfo], list[RouteInfo]] = ([], [], [])
        self.plugged: list[tuple[str, int]] = []

    async def _in_netns(self, work: object, what: str, fd: int | None = None) -> object:  # type: ignore[override]
        # Reading gives the script; removing a tap's leftovers finds no problem.
        return self.namespace if what == "read its links" else []

    async def _plug(self, hypervisor: object, endpoint: Endpoint) -> None:  # type: ignore[override]
        from capsa.network.attach import _Made

        slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._made.append(_Made(endpoint, device_name(self.model, slot), slot))
        self.plugged.append((endpoint.name, slot))


def test_refresh_follows_the_namespace() -> None:
    attachment, guest = _ScriptedAttachment(), _Recorder()

    def refresh() -> bool:
        return asyncio.run(attachment.refresh(guest, guest))

    eth1 = LinkInfo(6, "eth1", "02:00:00:00:00:06", 1500, "veth")
    attachment.namespace = (LINKS, ADDRESSES, ROUTES)
    assert refresh()
    assert attachment.plugged == [("eth0", 0)]
    assert guest.interfaces == ["eth0 ['10.88.0.5', 'fd00:88::5']"]
    assert guest.routes == [["198.51.100.0/24", "0.0.0.0/0", "192.0.2.0/24", "::/0"]]
    assert not refresh()  # nothing changed: nothing sent
    # An interface appears (CNI chaining): a NIC for it, and only it is configured.
    attachment.namespace = ([*LINKS, eth1], [*ADDRESSES, AddressInfo(6, "10.99.1.2", 24)], ROUTES)
    assert refresh()
    assert attachment.plugged == [("eth0", 0), ("eth1", 1)]
    assert guest.interfaces[-1] == "eth1 ['10.99.1.2']"
    assert len(guest.routes) == 1
    # An address added to eth0: configured again, no new NIC; a route gone: routes sent again.
    attachment.namespace = (
        [*LINKS, eth1],
        [*ADDRESSES, AddressInfo(2, "10.88.0.6", 16), AddressInfo(6, "10.99.1.2", 24)],
        ROUTES[1:],
    )
    assert refresh()
    assert attachment.plugged == [("eth0", 0), ("eth1", 1)]
    assert guest.interfaces[-1] == "eth0 ['10.88.0.5', 'fd00:88::5', '10.88.0.6']"
    assert guest.routes[-1] == ["198.51.100.0/24", "192.0.2.0/24", "::/0"]
    # eth1 leaves (`network disconnect`): its NIC is unplugged; nothing is sent for it.
    attachment.namespace = (LINKS, [*ADDRESSES, AddressInfo(2, "10.88.0.6", 16)], ROUTES[1:])
    sent = len(guest.interfaces)
    assert refresh()
    assert guest.unplugged == [1]
    assert len(guest.interfaces) == sent
    assert [e.name for e in attachment.endpoints] == ["eth0"]
    # It comes back (a new veth, a new ifindex): a new NIC in a new slot.
    eth1_again = LinkInfo(7, "eth1", "02:00:00:00:00:06", 1500, "veth")
    attachment.namespace = ([*LINKS, eth1_again], [*ADDRESSES, AddressInfo(7, "10.99.1.2", 24)], ROUTES[1:])
    assert refresh()
    assert attachment.plugged[-1] == ("eth1", 2)
