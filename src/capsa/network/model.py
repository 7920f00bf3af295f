"""What the engine's network namespace holds, and what the guest is told of it; pure.

An engine (Podman's and Docker's bridge, a CNI plugin) hands the runtime a
network namespace with a veth already configured: a MAC, an MTU, addresses
and routes.  A container in a VM must look exactly like that on the
network, so the guest NIC gets the same MAC, MTU, addresses and routes
(DESIGN.md decision 7; Kata's "tcfilter" model).

:mod:`capsa.network.netns` reads the namespace into the plain records
below (:class:`LinkInfo`, :class:`AddressInfo`, :class:`RouteInfo`, mirrors
of rtnetlink's ``ifinfomsg``/``ifaddrmsg``/``rtmsg`` fields, rtnetlink(7));
:func:`select_endpoints` and :func:`select_routes` decide what the guest
needs, and :func:`interface_message` / :func:`routes_message` say it in
the agent's words (``agent.proto`` ``Interface``, ``Route``).

What is left out, and why:

* ``lo``, links that are not Ethernet (``ARPHRD_ETHER``), links without a
  MAC, our own taps and macvtaps, and links without a single usable
  address: the kernel's base tunnel devices (``gretap0``...) and links an
  engine left unconfigured are not endpoints (Kata skips the same).
* IPv6 link-local addresses (``fe80::/10``): the guest kernel derives the
  same one from the same MAC (EUI-64) when the link comes up.
* Routes the kernel makes by itself (``proto kernel``): the prefix route
  of each address, and in IPv6 ``fe80::/64`` and the multicast route.  The
  guest kernel makes the same ones when the agent adds the addresses.
* Routes outside the main table, routes that are not unicast, multipath
  routes, and routes through devices that are not endpoints: the agent's
  ``Route`` cannot express them; they are logged by the caller.

The route format the agent receives (``agent.proto`` ``Route``):
``dest`` is always a CIDR (``10.88.0.0/16``; the default route is
``0.0.0.0/0`` or ``::/0``, never empty, so the family is always known),
``gateway`` and ``source`` are plain addresses or ``""``, ``device`` is the
guest interface name (the veth's, e.g. ``eth0``), ``scope`` is the
rtnetlink ``RT_SCOPE_*`` number (0 universe, 253 link).  Routes come in an
order the guest can apply one by one: routes without a gateway (on-link)
before routes through a gateway, so each gateway is reachable when its
route is added.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from capsa.protocols import agent_pb2 as pb

# linux/if_arp.h, linux/rtnetlink.h, linux/socket.h
ARPHRD_ETHER = 1
AF_INET = 2
AF_INET6 = 10
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253

#: Link kinds (``IFLA_INFO_KIND``) that capsa itself puts into a namespace.
OWN_KINDS = ("tun", "macvtap")


@dataclass(frozen=True)
class LinkInfo:
    """One link of the namespace (``RTM_GETLINK``)."""

    index: int
    name: str
    mac: str
    mtu: int
    kind: str = ""  # IFLA_INFO_KIND: "veth", "macvlan", "tun", ... ("" when none)
    link_type: int = ARPHRD_ETHER  # ifi_type


@dataclass(frozen=True)
class AddressInfo:
    """One address of a link (``RTM_GETADDR``)."""

    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteInfo:
    """One route (``RTM_GETROUTE``); ``dst`` is ``""`` for the default route."""

    family: int
    dst: str
    dst_len: int
    oif: int
    gateway: str = ""
    prefsrc: str = ""
    scope: int = RT_SCOPE_UNIVERSE
    proto: int = 3  # RTPROT_BOOT, what `ip route add` makes
    type: int = RTN_UNICAST
    table: int = RT_TABLE_MAIN
    multipath: bool = False


@dataclass(frozen=True)
class Endpoint:
    """A link the guest gets a NIC for: the veth as the guest must mirror it."""

    index: int
    name: str
    mac: str
    mtu: int
    addresses: tuple[tuple[str, int], ...]  # (address, prefix length), v4 and v6

    @property
    def ipv4(self) -> tuple[tuple[str, int], ...]:
        return tuple(a for a in self.addresses if ipaddress.ip_address(a[0]).version == 4)

    @property
    def ipv6(self) -> tuple[tuple[str, int], ...]:
        return tuple(a for a in self.addresses if ipaddress.ip_address(a[0]).version == 6)


@dataclass(frozen=True)
class Route:
    """A route as the guest must have it (see the module docstring for the format)."""

    dest: str
    device: str
    gateway: str = ""
    source: str = ""
    scope: int = RT_SCOPE_UNIVERSE


def _usable_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.version == 6 and ip.is_link_local)


def select_endpoints(links: list[LinkInfo], addresses: list[AddressInfo]) -> tuple[Endpoint, ...]:
    """The links that become guest NICs, in index order, with their usable addresses."""
    by_link: dict[int, list[tuple[str, int]]] = {}
    for addr in addresses:
        if _usable_address(addr.address):
            by_link.setdefault(addr.index, []).append((addr.address, addr.prefixlen))
    endpoints = []
    for link in sorted(links, key=lambda item: item.index):
        if link.name == "lo" or link.link_type != ARPHRD_ETHER or not link.mac or link.kind in OWN_KINDS:
            continue
        found = by_link.get(link.index)
        if not found:
            continue
        endpoints.append(Endpoint(link.index, link.name, link.mac.lower(), link.mtu, tuple(found)))
    return tuple(endpoints)


def _dest(route: RouteInfo) -> str:
    if not route.dst:
        return "0.0.0.0/0" if route.family == AF_INET else "::/0"
    return f"{route.dst}/{route.dst_len}"


def route_skip_reason(route: RouteInfo, devices: dict[int, str]) -> str | None:
    """Why ``route`` is not given to the guest (None: it is); see the module docstring."""
    if route.table != RT_TABLE_MAIN:
        return f"in table {route.table}"
    if route.type != RTN_UNICAST:
        return f"of type {route.type}"
    if route.proto == RTPROT_KERNEL:
        return "made by the kernel"
    if route.multipath:
        return "multipath"
    if route.oif not in devices:
        return "not through an endpoint"
    if route.family == AF_INET6 and route.dst and ipaddress.ip_address(route.dst).is_link_local:
        return "link-local"
    return None


def select_routes(routes: list[RouteInfo], endpoints: tuple[Endpoint, ...]) -> tuple[Route, ...]:
    """The routes the guest gets, on-link ones first (the namespace's own order otherwise)."""
    devices = {endpoint.index: endpoint.name for endpoint in endpoints}
    chosen = [
        Route(
            dest=_dest(route),
            device=devices[route.oif],
            gateway=route.gateway,
            source=route.prefsrc,
            scope=route.scope,
        )
        for route in routes
        if route_skip_reason(route, devices) is None
    ]
    # sorted() is stable: within each group the namespace's order stays.
    return tuple(sorted(chosen, key=lambda route: bool(route.gateway)))


def interface_message(endpoint: Endpoint) -> pb.Interface:
    """The agent's ``Interface`` for ``endpoint``: the guest finds its NIC by ``hw_addr``
    (the NIC was plugged with the veth's MAC) and names it like the veth."""
    return pb.Interface(
        device=endpoint.name,
        name=endpoint.name,
        addresses=[pb.IPAddress(address=address, prefix_length=prefix) for address, prefix in endpoint.addresses],
        mtu=endpoint.mtu,
        hw_addr=endpoint.mac,
    )


def routes_message(routes: tuple[Route, ...]) -> pb.Routes:
    return pb.Routes(
        routes=[
            pb.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope) for r in routes
        ]
    )
