"""UpdateInterface / UpdateRoutes planning (capsa.agent.network): messages and snapshots in, netlink changes out."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import pytest

from capsa.agent import netlink, network
from capsa.agent.network import (
    Address,
    AddressChange,
    Command,
    Link,
    LinkChange,
    Route,
    RouteChange,
)
from capsa.errors import InvalidArgument
from capsa.protocols import agent_pb2 as pb

MAC = "02:42:0a:58:00:05"
LO = Link(1, "lo", "00:00:00:00:00:00", 65536, True)


def iface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(text)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def message(**fields: object) -> pb.Interface:
    defaults: dict[str, object] = {
        "hw_addr": MAC.upper(),
        "name": "eth0",
        "mtu": 1450,
        "addresses": [
            pb.IPAddress(address="10.88.0.5", prefix_length=16),
            pb.IPAddress(address="fd00:88::5", prefix_length=64),
        ],
    }
    defaults.update(fields)
    return pb.Interface(**defaults)  # type: ignore[arg-type]


# --- the Interface message --------------------------------------------------------


def test_an_interface_message_is_checked_and_normalized() -> None:
    request = network.interface_request(message())
    assert request.mac == MAC
    assert request.name == "eth0"
    assert request.mtu == 1450
    assert request.addresses == (iface("10.88.0.5/16"), iface("fd00:88::5/64"))


def test_an_address_may_carry_its_prefix_and_duplicates_collapse() -> None:
    request = network.interface_request(
        message(addresses=[pb.IPAddress(address="10.0.0.2/24"), pb.IPAddress(address="10.0.0.2", prefix_length=24)])
    )
    assert request.addresses == (iface("10.0.0.2/24"),)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"hw_addr": "02:42:0a:58:00"}, "not an Ethernet MAC"),
        ({"hw_addr": "", "device": ""}, "neither hw_addr nor device"),
        ({"name": "a-name-that-is-too-long"}, "not a valid link name"),
        ({"name": "eth/0"}, "not a valid link name"),
        ({"name": "lo"}, "loopback"),
        ({"mtu": 40}, "outside 68..65535"),
        ({"addresses": [pb.IPAddress(address="10.0.0.300", prefix_length=24)]}, "10.0.0.300"),
        ({"addresses": [pb.IPAddress(address="10.0.0.3")]}, "no prefix length"),
        ({"addresses": [pb.IPAddress(address="10.0.0.3", prefix_length=33)]}, "prefix length 33"),
    ],
)
def test_bad_interface_messages_are_refused_naming_the_field(fields: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        network.interface_request(message(**fields))


def test_the_link_is_found_by_mac_else_by_device_name() -> None:
    links = [LO, Link(2, "eth0", "02:00:00:00:00:01", 1500, False), Link(3, "eth1", MAC, 1500, False)]
    assert network.find_link(links, network.interface_request(message())) == links[2]
    by_name = network.interface_request(message(hw_addr="", device="eth0"))
    assert network.find_link(links, by_name) == links[1]
    assert network.find_link(links[:2], network.interface_request(message())) is None


# --- planning UpdateInterface ----------------------------------------------------------


def test_a_fresh_nic_is_renamed_sized_set_up_and_addressed_keeping_its_link_local() -> None:
    nic = Link(2, "eth1", MAC, 1500, False)
    current = [Address(2, iface("fe80::42:aff:fe58:5/64"))]
    plan = network.plan_interface(network.interface_request(message()), nic, [LO, nic], current)
    assert plan == [
        LinkChange(2, name="eth0"),
        LinkChange(2, mtu=1450),
        LinkChange(2, up=True),
        AddressChange(Command.ADD, 2, iface("10.88.0.5/16")),
        AddressChange(Command.ADD, 2, iface("fd00:88::5/64"), nodad=True),
    ]


def test_renaming_a_running_link_takes_it_down_first_and_a_holder_of_the_name_moves_aside() -> None:
    nic = Link(3, "eth1", MAC, 1450, True)
    holder = Link(2, "eth0", "02:00:00:00:00:01", 1500, True)
    plan = network.plan_interface(network.interface_request(message(addresses=[])), nic, [LO, holder, nic], [])
    assert plan == [
        LinkChange(2, up=False),
        LinkChange(2, name="capsa2"),
        LinkChange(2, up=True),
        LinkChange(3, up=False),
        LinkChange(3, name="eth0"),
        LinkChange(3, up=True),
    ]


def test_addresses_not_asked_for_go_before_new_ones_and_a_configured_link_is_left_alone() -> None:
    nic = Link(2, "eth0", MAC, 1450, True)
    current = [
        Address(2, iface("10.88.0.5/24")),  # same IP, other prefix: another address
        Address(2, iface("fd00:88::5/64")),
        Address(2, iface("fe80::1/64")),
    ]
    plan = network.plan_interface(network.interface_request(message()), nic, [LO, nic], current)
    assert plan == [
        AddressChange(Command.DELETE, 2, iface("10.88.0.5/24")),
        AddressChange(Command.ADD, 2, iface("10.88.0.5/16")),
    ]
    done = [Address(2, iface("10.88.0.5/16")), *current[1:]]
    assert network.plan_interface(network.interface_request(message()), nic, [LO, nic], done) == []


def test_no_name_and_no_mtu_keep_the_links_own() -> None:
    nic = Link(2, "ens3", MAC, 9000, True)
    plan = network.plan_interface(network.interface_request(message(name="", mtu=0, addresses=[])), nic, [nic], [])
    assert plan == []


def test_the_reply_describes_the_link_as_it_now_is() -> None:
    nic = Link(2, "eth0", MAC, 1450, True)
    addresses = [Address(2, iface("10.88.0.5/16")), Address(3, iface("10.0.0.9/8")), Address(2, iface("fe80::1/64"))]
    reply = network.interface_message(nic, addresses)
    assert reply == pb.Interface(
        device="eth0",
        name="eth0",
        mtu=1450,
        hw_addr=MAC,
        addresses=[
            pb.IPAddress(address="10.88.0.5", prefix_length=16),
            pb.IPAddress(address="fe80::1", prefix_length=64),
        ],
    )


# --- the Route message --------------------------------------------------------------

ETH0 = Link(2, "eth0", MAC, 1500, True)
LINKS = [LO, ETH0]


@pytest.mark.parametrize(
    ("fields", "route"),
    [
        ({"dest": "default", "gateway": "10.88.0.1"}, Route(net("0.0.0.0/0"), ip("10.88.0.1"), 2)),
        ({"dest": "", "gateway": "fd00::1"}, Route(net("::/0"), ip("fd00::1"), 2)),
        ({"dest": "::/0", "gateway": "fe80::1"}, Route(net("::/0"), ip("fe80::1"), 2)),
        ({"dest": "default"}, Route(net("0.0.0.0/0"), None, 2, scope=network.RT_SCOPE_LINK)),
        (
            {"dest": "10.88.0.0/16", "source": "10.88.0.5", "scope": 253},
            Route(net("10.88.0.0/16"), None, 2, ip("10.88.0.5"), network.RT_SCOPE_LINK),
        ),
        ({"dest": "10.88.0.0/16"}, Route(net("10.88.0.0/16"), None, 2, scope=network.RT_SCOPE_LINK)),
        ({"dest": "10.1.2.3"}, Route(net("10.1.2.3/32"), None, 2, scope=network.RT_SCOPE_LINK)),
        ({"dest": "fd00:88::/64", "scope": 253}, Route(net("fd00:88::/64"), None, 2)),
        ({"dest": "192.168.0.0/16", "gateway": "10.88.0.1"}, Route(net("192.168.0.0/16"), ip("10.88.0.1"), 2)),
    ],
)
def test_route_messages_become_routes(fields: dict[str, object], route: Route) -> None:
    assert network.route_request(pb.Route(device="eth0", **fields), LINKS) == route  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"dest": "10.88.0.5/16"}, "host bits set"),
        ({"dest": "10.88.0.0/16", "gateway": "fd00::1"}, "gateway fd00::1 is not an IPv4 address"),
        ({"dest": "default", "gateway": "10.0.0.1", "source": "fd00::5"}, "source fd00::5 is not an IPv4"),
        ({"dest": "default", "gateway": "nope"}, "gateway 'nope' is not an IP address"),
        ({"dest": "default", "gateway": "10.0.0.1", "device": ""}, "no device"),
        ({"dest": "default", "gateway": "10.0.0.1", "device": "eth9"}, "no link 'eth9'"),
        ({"dest": "127.0.0.0/8", "device": "lo"}, "lo"),
        ({"dest": "10.0.0.0/8", "scope": 256}, "scope 256"),
    ],
)
def test_bad_route_messages_are_refused(fields: dict[str, object], words: str) -> None:
    route = pb.Route(**{"device": "eth0", **fields})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=words):
        network.route_request(route, LINKS)


# --- planning UpdateRoutes ----------------------------------------------------------

# What the kernel makes for the addresses (proto kernel).
CONNECTED = Route(net("10.88.0.0/16"), None, 2, ip("10.88.0.5"), network.RT_SCOPE_LINK, kernel=True)
V6_CONNECTED = Route(net("fd00:88::/64"), None, 2, kernel=True)
V6_LINK_LOCAL = Route(net("fe80::/64"), None, 2, kernel=True)
DEFAULT = Route(net("0.0.0.0/0"), ip("10.88.0.1"), 2)
V6_DEFAULT = Route(net("::/0"), ip("fd00:88::1"), 2)


def wanted(*routes: pb.Route) -> list[Route]:
    return [network.route_request(route, LINKS) for route in routes]


def test_on_link_routes_go_in_before_gateway_routes_and_default_routes_last() -> None:
    routes = wanted(
        pb.Route(dest="default", gateway="10.88.0.1", device="eth0"),
        pb.Route(dest="192.168.0.0/16", gateway="10.88.0.1", device="eth0"),
        pb.Route(dest="10.88.0.0/16", device="eth0"),
        pb.Route(dest="::/0", gateway="fd00:88::1", device="eth0"),
        pb.Route(dest="fd00:88::/64", device="eth0"),
    )
    plan = network.plan_routes(routes, [], loopback=1)
    assert [(c.command, str(c.route.dest)) for c in plan] == [
        (Command.ADD, "10.88.0.0/16"),
        (Command.ADD, "fd00:88::/64"),
        (Command.ADD, "192.168.0.0/16"),
        (Command.ADD, "0.0.0.0/0"),
        (Command.ADD, "::/0"),
    ]


def test_the_kernels_routes_satisfy_what_is_asked_and_a_repeat_changes_nothing() -> None:
    current = [CONNECTED, V6_CONNECTED, V6_LINK_LOCAL]
    routes = wanted(
        pb.Route(dest="10.88.0.0/16", device="eth0", scope=253),
        pb.Route(dest="default", gateway="10.88.0.1", device="eth0"),
        pb.Route(dest="fd00:88::/64", device="eth0"),
        pb.Route(dest="fe80::/64", device="eth0"),  # a host copying its namespace's table lists it
    )
    assert network.plan_routes(routes, current, loopback=1) == [RouteChange(Command.ADD, DEFAULT)]
    assert network.plan_routes(routes, [*current, DEFAULT], loopback=1) == []


def test_routes_not_asked_for_go_after_the_new_ones_except_lo_and_the_kernels() -> None:
    lo_route = Route(net("127.0.0.0/8"), None, 1, scope=network.RT_SCOPE_HOST)
    old_default = Route(net("0.0.0.0/0"), ip("10.88.0.254"), 2)
    old_on_link = Route(net("10.200.0.0/16"), None, 2, scope=network.RT_SCOPE_LINK)
    current = [CONNECTED, V6_CONNECTED, V6_LINK_LOCAL, old_on_link, old_default, lo_route, V6_DEFAULT]
    routes = wanted(pb.Route(dest="default", gateway="10.88.0.1", device="eth0"))
    assert network.plan_routes(routes, current, loopback=1) == [
        RouteChange(Command.ADD, DEFAULT),
        RouteChange(Command.DELETE, old_default),
        RouteChange(Command.DELETE, V6_DEFAULT),
        RouteChange(Command.DELETE, old_on_link),
    ]
    # An empty list removes every route the agent manages, gateways first;
    # the prefix routes of the addresses stay.
    assert network.plan_routes([], current, loopback=1) == [
        RouteChange(Command.DELETE, old_default),
        RouteChange(Command.DELETE, V6_DEFAULT),
        RouteChange(Command.DELETE, old_on_link),
    ]
    assert [network.reported(r, 1) for r in current] == [True, True, False, True, True, False, True]
    assert [network.managed(r, 1) for r in current] == [False, False, False, True, True, False, True]


def test_a_route_with_another_source_or_scope_is_replaced_before_the_additions_even_the_kernels() -> None:
    current = [CONNECTED, DEFAULT]
    routes = wanted(
        pb.Route(dest="10.88.0.0/16", device="eth0", source="10.88.0.6"),
        pb.Route(dest="default", gateway="10.88.0.1", device="eth0"),
    )
    new_connected = Route(net("10.88.0.0/16"), None, 2, ip("10.88.0.6"), network.RT_SCOPE_LINK)
    assert network.plan_routes(routes, current, loopback=1) == [
        RouteChange(Command.DELETE, CONNECTED),
        RouteChange(Command.ADD, new_connected),
    ]


def test_route_replies_write_default_routes_as_networks() -> None:
    names = {1: "lo", 2: "eth0"}
    assert network.route_message(DEFAULT, names) == pb.Route(dest="0.0.0.0/0", gateway="10.88.0.1", device="eth0")
    assert network.route_message(CONNECTED, names) == pb.Route(
        dest="10.88.0.0/16", device="eth0", source="10.88.0.5", scope=253
    )
    assert network.route_message(V6_DEFAULT, names).dest == "::/0"
    # What the agent replies, it accepts back unchanged.
    for route in (DEFAULT, CONNECTED, V6_DEFAULT, V6_CONNECTED):
        assert network.route_request(network.route_message(route, names), LINKS) == route


def test_descriptions_read_like_iproute2() -> None:
    names = {2: "eth0"}
    assert CONNECTED.describe(names) == "10.88.0.0/16 dev eth0 src 10.88.0.5"
    assert DEFAULT.describe(names) == "default via 10.88.0.1 dev eth0"
    change = RouteChange(Command.ADD, DEFAULT)
    assert netlink._describe(change, names) == "adding route default via 10.88.0.1 dev eth0"
    assert netlink._describe(LinkChange(2, name="eth1", up=False), names) == "renaming eth0 to eth1, setting eth0 down"


# --- the pyroute2 shell's import ---------------------------------------------------------


def test_placeholders_stand_in_only_for_missing_modules_and_leave_afterwards() -> None:
    with netlink._placeholders(["json", "capsa_no_such_module", "capsa_no_such_module.sub"]):
        import json

        placeholder = sys.modules["capsa_no_such_module"]
        assert json.dumps([]) == "[]"  # a real module is not replaced
        assert placeholder.sub is sys.modules["capsa_no_such_module.sub"]  # `from x import sub` works
        with pytest.raises(AttributeError, match="not in the capsa guest image"):
            _ = placeholder.create_default_context
    assert "capsa_no_such_module" not in sys.modules
    assert "capsa_no_such_module.sub" not in sys.modules


def test_the_agents_start_imports_no_network_code_nor_the_hosts_modules() -> None:
    # Startup is on the critical path of every sandbox (under TCG each
    # module costs guest time): pyroute2 and the planning code wait for the
    # first UpdateInterface/UpdateRoutes, and the host's runtime modules
    # (pathlib, hashlib, urllib behind them) stay out.
    code = "import sys, json, capsa.agent.main; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout)
    unwanted = ("pyroute2", "capsa.agent.network", "capsa.agent.netlink", "capsa.runtime.mounts", "ipaddress")
    assert [name for name in loaded if name.startswith(unwanted)] == []
