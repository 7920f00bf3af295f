"""The guest NIC's configuration as data: what UpdateInterface and UpdateRoutes must change.

The host mirrors the engine's veth into a tap that QEMU gives the guest as a
virtio-net NIC with the veth's MAC (DESIGN.md 7, Kata's ``tcfilter`` model).
The agent then makes the guest link look like the veth: same name, MTU,
addresses and routes.  The semantics are Kata's agent API
(``UpdateInterface``/``UpdateRoutes`` in agent.proto):

- UpdateInterface finds the guest link by ``hw_addr`` (the kernel names NICs
  in probe order, which no host can predict), renames it to ``name``, sets
  ``mtu``, replaces its addresses and sets it up.  The kernel's IPv6
  link-local address (``fe80::/10``, made from the MAC) is kept: neighbour
  discovery needs it, and the veth has the same one.
- UpdateRoutes replaces the main table's routes of every link but ``lo``
  with the given ones.  The routes the kernel made itself (``proto
  kernel``: the prefix route of each address, IPv6 link-local and
  multicast) stay, as in Kata, whose runtime leaves them out of the list
  because the guest kernel makes the same ones from the same addresses; a
  route already there is not touched, so a repeated call changes nothing
  and costs no outage.

Everything here is pure: the message is checked and turned into a plan of
netlink changes (:class:`LinkChange`, :class:`AddressChange`,
:class:`RouteChange`) against a snapshot of the guest's links, addresses and
routes.  :mod:`capsa.agent.netlink` reads the snapshot and carries the plan
out with pyroute2 (rtnetlink(7)).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from capsa.errors import AgentError, InvalidArgument
from capsa.protocols import agent_pb2 as pb

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPIface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# rtnetlink(7) route scopes (<linux/rtnetlink.h> enum rt_scope_t).
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254

LOOPBACK = "lo"
#: IFNAMSIZ (16, with the NUL) in <linux/if.h>.
IFNAMSIZ = 16
#: Kernel routes the agent neither removes nor reports: IPv6 link-local
#: (it keeps the link-local address) and multicast.
_KERNEL_V6 = (ipaddress.IPv6Network("fe80::/10"), ipaddress.IPv6Network("ff00::/8"))
_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class InterfaceNotFound(AgentError):
    """No guest link has the MAC (or name) the host asked for."""


class NetlinkFailed(AgentError):
    """The guest kernel refused a netlink request; the message says which and why."""


# --- what the guest has (a snapshot) ------------------------------------------


@dataclass(frozen=True)
class Link:
    """A guest network link (RTM_NEWLINK): its index never changes, its name may."""

    index: int
    name: str
    mac: str
    mtu: int
    up: bool


@dataclass(frozen=True)
class Address:
    """An address on a link (RTM_NEWADDR)."""

    index: int
    address: IPIface


@dataclass(frozen=True)
class Route:
    """A route of the main table (RTM_NEWROUTE), or one to make."""

    dest: IPNet
    gateway: IPAddr | None
    index: int  # RTA_OIF
    source: IPAddr | None = None  # RTA_PREFSRC
    scope: int = RT_SCOPE_UNIVERSE
    #: rtm_protocol RTPROT_KERNEL: made by the kernel for an address.
    kernel: bool = field(default=False, compare=False)

    @property
    def family(self) -> int:
        return self.dest.version

    @property
    def identity(self) -> tuple[IPNet, IPAddr | None, int]:
        """What makes two routes the same route for UpdateRoutes (metrics aside)."""
        return self.dest, self.gateway, self.index

    def describe(self, names: dict[int, str]) -> str:
        """iproute2's way of writing it, for error messages."""
        dest = "default" if self.dest.prefixlen == 0 else str(self.dest)
        words = [dest]
        if self.gateway is not None:
            words += ["via", str(self.gateway)]
        words += ["dev", names.get(self.index, f"#{self.index}")]
        if self.source is not None:
            words += ["src", str(self.source)]
        return " ".join(words)


# --- what to change (a plan) -----------------------------------------------------


class Command(Enum):
    ADD = "add"
    DELETE = "del"


@dataclass(frozen=True)
class LinkChange:
    """RTM_NEWLINK on an existing link: only the fields that are not None change."""

    index: int
    name: str | None = None
    mtu: int | None = None
    up: bool | None = None


@dataclass(frozen=True)
class AddressChange:
    command: Command
    index: int
    address: IPIface
    #: IFA_F_NODAD: the address is the veth's, which passed duplicate address
    #: detection on its network already; without it an IPv6 address stays
    #: "tentative" (unusable as a source) for a second or more.
    nodad: bool = False


@dataclass(frozen=True)
class RouteChange:
    command: Command
    route: Route


Change = LinkChange | AddressChange | RouteChange


# --- UpdateInterface --------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceRequest:
    """A checked agent.proto Interface."""

    mac: str  # lower case; "" to find the link by ``device`` instead
    device: str
    name: str  # "" keeps the link's name
    mtu: int  # 0 keeps the link's MTU
    addresses: tuple[IPIface, ...]

    def describe(self) -> str:
        return f"the NIC with MAC {self.mac}" if self.mac else f"link {self.device!r}"


def normalize_mac(text: str) -> str:
    """``02:AA:...`` -> ``02:aa:...``; an Ethernet MAC or InvalidArgument."""
    mac = text.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        raise InvalidArgument(f"hw_addr {text!r} is not an Ethernet MAC address (six hex bytes with colons)")
    return mac


def check_link_name(name: str, what: str = "name") -> str:
    """A name the kernel accepts for a link (net/core/dev.c dev_valid_name)."""
    if len(name) >= IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n") or not name.isprintable():
        raise InvalidArgument(
            f"interface {what} {name!r} is not a valid link name (at most 15 characters, no '/', ':' or spaces)"
        )
    return name


def parse_address(message: pb.IPAddress) -> IPIface:
    """IPAddress{address, prefix_length} -> an interface address; ``a/len`` is accepted in ``address`` too."""
    text = message.address.strip()
    if "/" not in text:
        text = f"{text}/{message.prefix_length}" if message.prefix_length else text
    try:
        address = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise InvalidArgument(f"address {message.address!r} (prefix length {message.prefix_length}): {exc}") from None
    if "/" not in message.address and not message.prefix_length:
        raise InvalidArgument(f"address {message.address!r} has no prefix length")
    return address


def interface_request(message: pb.Interface) -> InterfaceRequest:
    """Check an Interface message; the errors name the field."""
    mac = normalize_mac(message.hw_addr) if message.hw_addr else ""
    device = message.device
    if not mac and not device:
        raise InvalidArgument("the interface names neither hw_addr nor device: the guest link cannot be found")
    if device:
        check_link_name(device, "device")
    name = check_link_name(message.name) if message.name else ""
    if name == LOOPBACK or device == LOOPBACK:
        raise InvalidArgument("the loopback link is the guest's own: UpdateInterface does not configure lo")
    if message.mtu and not 68 <= message.mtu <= 65535:
        # 68: the IPv4 minimum (RFC 791); 65535: ETH_MAX_MTU.
        raise InvalidArgument(f"mtu {message.mtu} is outside 68..65535")
    addresses: list[IPIface] = []
    for item in message.addresses:
        address = parse_address(item)
        if address not in addresses:
            addresses.append(address)
    return InterfaceRequest(mac, device, name, int(message.mtu), tuple(addresses))


def find_link(links: Iterable[Link], request: InterfaceRequest) -> Link | None:
    """The link the request is about: by MAC, else by device name."""
    for link in links:
        if (link.mac == request.mac) if request.mac else (link.name == request.device):
            return link
    return None


def temporary_name(index: int) -> str:
    """A name to park a link under while another takes its name."""
    return f"capsa{index}"


def plan_interface(
    request: InterfaceRequest, link: Link, links: Sequence[Link], addresses: Sequence[Address]
) -> list[Change]:
    """The netlink changes that make ``link`` what ``request`` says.

    Renaming needs the link down (net/core/dev.c dev_change_name: EBUSY on
    a running link); a link that already holds the wanted name, say the
    kernel named the second NIC eth0, moves to a temporary name until its
    own UpdateInterface.  Addresses that are not asked for go before new
    ones are added (the same address with another prefix length is a
    different address); the link-local IPv6 ones stay.
    """
    changes: list[Change] = []
    down = False
    if request.name and request.name != link.name:
        for other in links:
            if other.name == request.name and other.index != link.index:
                if other.up:
                    changes.append(LinkChange(other.index, up=False))
                changes.append(LinkChange(other.index, name=temporary_name(other.index)))
                if other.up:
                    changes.append(LinkChange(other.index, up=True))
        if link.up:
            changes.append(LinkChange(link.index, up=False))
            down = True
        changes.append(LinkChange(link.index, name=request.name))
    if request.mtu and request.mtu != link.mtu:
        changes.append(LinkChange(link.index, mtu=request.mtu))
    if down or not link.up:
        changes.append(LinkChange(link.index, up=True))
    current = [item.address for item in addresses if item.index == link.index]
    for address in current:
        if address not in request.addresses and not _is_link_local(address):
            changes.append(AddressChange(Command.DELETE, link.index, address))
    for address in request.addresses:
        if address not in current:
            changes.append(AddressChange(Command.ADD, link.index, address, nodad=address.version == 6))
    return changes


def _is_link_local(address: IPIface) -> bool:
    return address.version == 6 and address.ip in _LINK_LOCAL_V6


def interface_message(link: Link, addresses: Iterable[Address]) -> pb.Interface:
    """What the guest link now is, as agent.proto's Interface (the UpdateInterface reply)."""
    return pb.Interface(
        device=link.name,
        name=link.name,
        addresses=[
            pb.IPAddress(address=str(item.address.ip), prefix_length=item.address.network.prefixlen)
            for item in addresses
            if item.index == link.index
        ],
        mtu=link.mtu,
        hw_addr=link.mac,
    )


# --- UpdateRoutes -----------------------------------------------------------------


def _parse_ip(text: str, what: str) -> IPAddr:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not an IP address") from None


def route_request(message: pb.Route, links: Sequence[Link]) -> Route:
    """Check a Route message against the guest's links.

    ``dest`` is a network (``10.88.0.0/16``), a host address (``10.0.0.1``
    means ``/32``), or ``default``/empty: the default route of the
    gateway's (or source's) family, IPv4 when neither says, as ``ip route
    add default dev eth0`` does.  ``device`` must name a guest link other
    than ``lo``.  A route without a gateway and with scope 0 gets scope
    link, as iproute2 gives it (the kernel reports on-link routes so);
    IPv6 routes have no scope (the kernel reports universe).
    """
    gateway = _parse_ip(message.gateway, "gateway") if message.gateway.strip() else None
    source = _parse_ip(message.source, "source") if message.source.strip() else None
    text = message.dest.strip()
    if text in ("", "default"):
        version = gateway.version if gateway else source.version if source else 4
        dest: IPNet = ipaddress.IPv4Network("0.0.0.0/0") if version == 4 else ipaddress.IPv6Network("::/0")
    else:
        try:
            dest = ipaddress.ip_network(text)
        except ValueError as exc:
            raise InvalidArgument(f"route destination {message.dest!r}: {exc}") from None
    for what, address in (("gateway", gateway), ("source", source)):
        if address is not None and address.version != dest.version:
            raise InvalidArgument(f"route to {dest}: {what} {address} is not an IPv{dest.version} address")
    if not message.device:
        raise InvalidArgument(f"route to {dest}: no device")
    if message.device == LOOPBACK:
        raise InvalidArgument(f"route to {dest} on lo: the loopback routes are the guest kernel's own")
    index = next((link.index for link in links if link.name == message.device), None)
    if index is None:
        raise InvalidArgument(f"route to {dest}: the guest has no link {message.device!r}")
    scope = int(message.scope)
    if scope > 255:
        raise InvalidArgument(f"route to {dest}: scope {scope} is not a route scope (0..255)")
    if dest.version == 6:
        scope = RT_SCOPE_UNIVERSE
    elif gateway is None and scope == RT_SCOPE_UNIVERSE:
        scope = RT_SCOPE_LINK
    return Route(dest, gateway, index, source, scope)


def reported(route: Route, loopback: int | None) -> bool:
    """Whether a route of the main table is in the UpdateRoutes reply: not lo's, not IPv6 link-local or multicast."""
    if route.index == loopback:
        return False
    return not (isinstance(route.dest, ipaddress.IPv6Network) and any(route.dest.subnet_of(n) for n in _KERNEL_V6))


def managed(route: Route, loopback: int | None) -> bool:
    """Whether UpdateRoutes removes this route when it is not asked for: a reported one the kernel did not make."""
    return reported(route, loopback) and not route.kernel


def plan_routes(wanted: Sequence[Route], current: Sequence[Route], loopback: int | None) -> list[RouteChange]:
    """The route changes that make the main table hold ``wanted`` and, of the routes it manages, nothing else.

    A current route with the same destination, gateway and link as a wanted
    one but another source or scope is replaced, even one the kernel made:
    deleted, then added.  Additions go on-link first (the kernel refuses a
    gateway it cannot reach on a link, ENETUNREACH), default routes last.
    Managed routes that are no longer wanted go last, routes via a gateway
    before on-link ones: if the kernel refuses an addition, the guest keeps
    the routes it had.
    """
    unique: list[Route] = []
    for route in wanted:
        if route not in unique:
            unique.append(route)

    def asked(have: Route) -> bool:
        return any(satisfies(have, want) for want in unique)

    order = sorted(current, key=lambda r: (r.gateway is None, -r.dest.prefixlen, r.family, str(r.dest), str(r.gateway)))
    identities = {route.identity for route in unique}
    replaced = [have for have in order if reported(have, loopback) and have.identity in identities and not asked(have)]
    stale = [have for have in order if managed(have, loopback) and not asked(have) and have not in replaced]
    # Against every current route: one the agent does not manage (the
    # kernel's fe80::/64, say) that the host also lists is there already.
    remaining = [have for have in current if have not in replaced]
    additions = [want for want in unique if not any(satisfies(have, want) for have in remaining)]
    additions = sorted(additions, key=lambda r: (r.gateway is not None, r.dest.prefixlen == 0))
    return [
        *(RouteChange(Command.DELETE, r) for r in replaced),
        *(RouteChange(Command.ADD, r) for r in additions),
        *(RouteChange(Command.DELETE, r) for r in stale),
    ]


def satisfies(have: Route, want: Route) -> bool:
    """Whether an existing route is the one asked for; a wanted route without a
    source takes whatever the kernel chose (its on-link routes carry the
    address as ``src``)."""
    return (
        have.identity == want.identity
        and have.scope == want.scope
        and (want.source is None or have.source == want.source)
    )


def route_message(route: Route, names: dict[int, str]) -> pb.Route:
    """A guest route as agent.proto's Route; a default route's dest is ``0.0.0.0/0`` or ``::/0``."""
    return pb.Route(
        dest=str(route.dest),
        gateway=str(route.gateway) if route.gateway is not None else "",
        device=names.get(route.index, ""),
        source=str(route.source) if route.source is not None else "",
        scope=route.scope,
    )
