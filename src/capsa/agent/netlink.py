"""The thin pyroute2 shell under UpdateInterface and UpdateRoutes.

:mod:`capsa.agent.network` decides what to change; this module reads the
guest's links, addresses and routes over rtnetlink (rtnetlink(7)) and
carries the plan out, one request at a time, turning the kernel's refusals
into :class:`~capsa.agent.network.NetlinkFailed` with the request and the
errno's words.

pyroute2 is imported on the first call, never at a cold agent start: a
container without a network does not pay for it.  A VM booted to be saved
as a template imports it before serving (:func:`preload`), so that every
clone resumes with it loaded and a pod's first UpdateInterface skips about
half a second of emulated imports.  Only the modules AsyncIPRoute
needs are loaded: ``pyroute2/__init__.py``, which imports every netlink
family pyroute2 supports (nl80211, conntrack, ipset, devlink...), is not
run; the package is registered bare and its submodules import as usual.
Under TCG that halves a cost of the order of a second of guest time.
Its rtnetlink modules import ``ssl`` at
module level, for an RTM_NEWPROBE ``ssl`` probe the agent never sends; the
guest image has no ``ssl`` (no libssl: ``guest/image/build.py``), so while
pyroute2 loads, a placeholder module stands in for it and is removed again
afterwards.  (``unittest.mock``, which pyroute2 also imports, calling
``Mock()`` at import time, is in the image.)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import ipaddress
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from capsa.agent import network
from capsa.agent.network import (
    Address,
    AddressChange,
    Change,
    Command,
    InterfaceNotFound,
    Link,
    LinkChange,
    NetlinkFailed,
    Route,
)
from capsa.protocols import agent_pb2 as pb

log = logging.getLogger("capsa.agent")

#: How long UpdateInterface waits for the NIC the host just hot-plugged
#: (PCIe hot-plug, then the virtio-net probe; about a second under TCG).
LINK_WAIT_SECONDS = 30.0
#: <linux/if.h> IFF_UP; <linux/if_addr.h> IFA_F_NODAD; RT_TABLE_MAIN.
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
#: <linux/rtnetlink.h> RTN_UNICAST: the only route type the agent manages;
#: RTPROT_KERNEL: a route the kernel made for an address.
RTN_UNICAST = 1
RTPROT_KERNEL = 2

#: Modules pyroute2 imports at module level, that the agent never uses and
#: the guest image does not have.
_UNUSED_BY_AGENT = ("ssl",)

_iproute_class: Any = None


@contextlib.contextmanager
def _placeholders(names: Sequence[str]) -> Iterator[None]:
    """Empty stand-ins for the modules of ``names`` that cannot be imported, for the duration.

    Any attribute use fails with a message that says why; the stand-ins
    leave ``sys.modules`` afterwards, so a later real import fails as it
    should.
    """
    added: list[str] = []
    try:
        for name in names:
            if name in sys.modules or _importable(name):
                continue
            module = types.ModuleType(name, f"placeholder: {name} is not in the capsa guest image")

            def missing(attribute: str, _name: str = name) -> Any:
                raise AttributeError(f"{_name}.{attribute}: {_name} is not in the capsa guest image")

            module.__getattr__ = missing  # type: ignore[method-assign]
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)
            sys.modules[name] = module
            added.append(name)
        yield
    finally:
        for name in reversed(added):
            sys.modules.pop(name, None)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _bare_package(name: str) -> None:
    """Put package ``name`` in ``sys.modules`` without running its ``__init__``.

    Its submodules import as usual (the module has its ``__path__``); only
    what the package's own ``__init__`` would have imported is not loaded.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"no package named {name!r}")
    sys.modules[name] = importlib.util.module_from_spec(spec)


def _async_iproute() -> Any:
    """pyroute2's AsyncIPRoute, imported on first use."""
    global _iproute_class
    if _iproute_class is None:
        started = time.monotonic()
        try:
            _bare_package("pyroute2")
            with _placeholders(_UNUSED_BY_AGENT):
                module = importlib.import_module("pyroute2.iproute.linux")
        except ImportError as exc:
            raise NetlinkFailed(f"cannot configure the guest network: pyroute2 does not load: {exc}") from exc
        _iproute_class = module.AsyncIPRoute
        log.debug("pyroute2 imported in %.3f s", time.monotonic() - started)
    return _iproute_class


def preload() -> float:
    """Import pyroute2's rtnetlink modules now; return the seconds it took.

    For a VM that is about to be saved as a template (``capsa.template=1``):
    its clones resume with the modules loaded.  Importing does not open a
    socket or start a thread (pyroute2 0.9), so nothing of this VM's own
    goes into the clones with them.  A failure is only logged: the first
    UpdateInterface will report it as usual.
    """
    started = time.monotonic()
    try:
        _async_iproute()
    except NetlinkFailed as exc:
        log.warning("%s", exc)
    return time.monotonic() - started


def _netlink_errno(exc: BaseException) -> int | None:
    """The errno of pyroute2's NetlinkError (its ``code``), else None."""
    code = getattr(exc, "code", None)
    if type(exc).__name__ == "NetlinkError" and isinstance(code, int):
        return code
    return None


class GuestNetwork:
    """UpdateInterface and UpdateRoutes on the guest's own network namespace.

    One call at a time: both read a snapshot, plan, and apply, and two
    interleaved plans would each undo the other's work.
    """

    def __init__(self, link_wait_seconds: float = LINK_WAIT_SECONDS, iproute: Callable[[], Any] | None = None) -> None:
        """``iproute`` makes the rtnetlink socket (pyroute2's AsyncIPRoute unless given)."""
        self._lock = asyncio.Lock()
        self._link_wait_seconds = link_wait_seconds
        self._iproute = iproute

    async def update_interface(self, message: pb.Interface) -> pb.Interface:
        request = network.interface_request(message)
        async with self._lock, self._open() as ipr:
            link = await self._wait_for_link(ipr, request)
            links = await _links(ipr)
            changes = network.plan_interface(request, link, links, await _addresses(ipr, link.index))
            await self._apply(ipr, changes, {item.index: item.name for item in links})
            link = next(item for item in await _links(ipr) if item.index == link.index)
            return network.interface_message(link, await _addresses(ipr, link.index))

    async def update_routes(self, messages: Sequence[pb.Route]) -> list[pb.Route]:
        async with self._lock, self._open() as ipr:
            links = await _links(ipr)
            wanted = [network.route_request(message, links) for message in messages]
            loopback = next((link.index for link in links if link.name == network.LOOPBACK), None)
            changes = network.plan_routes(wanted, await _routes(ipr), loopback)
            names = {link.index: link.name for link in links}
            await self._apply(ipr, changes, names)
            return [
                network.route_message(route, names) for route in await _routes(ipr) if network.reported(route, loopback)
            ]

    @contextlib.asynccontextmanager
    async def _open(self) -> Any:
        ipr = (self._iproute or _async_iproute())()
        try:
            yield ipr
        finally:
            ipr.close()

    async def _wait_for_link(self, ipr: Any, request: network.InterfaceRequest) -> Link:
        """The link the request names, waiting (bounded) for a NIC still being hot-plugged."""
        deadline = time.monotonic() + self._link_wait_seconds
        delay = 0.01
        while True:
            links = await _links(ipr)
            link = network.find_link(links, request)
            if link is not None:
                return link
            if time.monotonic() >= deadline:
                have = ", ".join(f"{item.name} ({item.mac})" for item in links)
                raise InterfaceNotFound(
                    f"{request.describe()} did not appear in the guest within {self._link_wait_seconds:g} s"
                    f" (links: {have})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _apply(self, ipr: Any, changes: Sequence[Change], names: dict[int, str]) -> None:
        for change in changes:
            what = _describe(change, names)
            log.debug("netlink: %s", what)
            try:
                await _send(ipr, change)
            except Exception as exc:
                code = _netlink_errno(exc)
                if code is None:
                    raise
                raise NetlinkFailed(f"{what}: {os.strerror(code)}") from exc
            if isinstance(change, LinkChange) and change.name is not None:
                names[change.index] = change.name


async def _send(ipr: Any, change: Change) -> None:
    if isinstance(change, LinkChange):
        fields: dict[str, Any] = {"index": change.index}
        if change.name is not None:
            fields["ifname"] = change.name
        if change.mtu is not None:
            fields["mtu"] = change.mtu
        if change.up is not None:
            fields["state"] = "up" if change.up else "down"
        await ipr.link("set", **fields)
    elif isinstance(change, AddressChange):
        address = change.address
        fields = {"index": change.index, "address": str(address.ip), "prefixlen": address.network.prefixlen}
        if change.command is Command.ADD and change.nodad:
            fields["flags"] = IFA_F_NODAD
        await ipr.addr(change.command.value, **fields)
    else:
        route = change.route
        fields = {
            "dst": str(route.dest),
            "oif": route.index,
            "table": RT_TABLE_MAIN,
            "family": _family(route.family),
        }
        if route.gateway is not None:
            fields["gateway"] = str(route.gateway)
        # An IPv4 delete matches the scope exactly unless it is
        # RT_SCOPE_NOWHERE (net/ipv4/fib_trie.c fib_table_delete); the
        # route to delete was read from the kernel, so its scope is exact.
        fields["scope"] = route.scope
        if change.command is Command.ADD and route.source is not None:
            fields["prefsrc"] = str(route.source)
        await ipr.route(change.command.value, **fields)


def _family(version: int) -> int:
    import socket

    return socket.AF_INET if version == 4 else socket.AF_INET6


def _describe(change: Change, names: dict[int, str]) -> str:
    if isinstance(change, LinkChange):
        link = names.get(change.index, f"link #{change.index}")
        parts = []
        if change.name is not None:
            parts.append(f"renaming {link} to {change.name}")
        if change.mtu is not None:
            parts.append(f"setting the MTU of {link} to {change.mtu}")
        if change.up is not None:
            parts.append(f"setting {link} {'up' if change.up else 'down'}")
        return ", ".join(parts)
    if isinstance(change, AddressChange):
        verb = "adding address" if change.command is Command.ADD else "removing address"
        preposition = "to" if change.command is Command.ADD else "from"
        return f"{verb} {change.address} {preposition} {names.get(change.index, f'link #{change.index}')}"
    verb = "adding route" if change.command is Command.ADD else "removing route"
    return f"{verb} {change.route.describe(names)}"


# --- snapshots ----------------------------------------------------------------------


async def _links(ipr: Any) -> list[Link]:
    links = []
    async for message in await ipr.get_links():
        links.append(
            Link(
                index=int(message["index"]),
                name=str(message.get("ifname") or ""),
                mac=str(message.get("address") or "").lower(),
                mtu=int(message.get("mtu") or 0),
                up=bool(message["flags"] & IFF_UP),
            )
        )
    return links


async def _addresses(ipr: Any, index: int) -> list[Address]:
    found = []
    async for message in await ipr.get_addr(index=index):
        text = message.get("address")
        if not text or int(message["index"]) != index:
            continue
        found.append(Address(index, ipaddress.ip_interface(f"{text}/{message['prefixlen']}")))
    return found


async def _routes(ipr: Any) -> list[Route]:
    """The main table's unicast routes through one link (multipath routes have no RTA_OIF: skipped)."""
    found = []
    async for message in await ipr.get_routes(table=RT_TABLE_MAIN):
        oif = message.get("oif")
        if message["type"] != RTN_UNICAST or oif is None:
            continue
        if message.get("table", RT_TABLE_MAIN) != RT_TABLE_MAIN:
            continue
        version = 4 if message["family"] == _family(4) else 6
        dst = message.get("dst") or ("0.0.0.0" if version == 4 else "::")
        gateway = message.get("gateway")
        source = message.get("prefsrc")
        found.append(
            Route(
                dest=ipaddress.ip_network(f"{dst}/{message['dst_len']}", strict=False),
                gateway=ipaddress.ip_address(gateway) if gateway else None,
                index=int(oif),
                source=ipaddress.ip_address(source) if source else None,
                scope=int(message["scope"]),
                kernel=message["proto"] == RTPROT_KERNEL,
            )
        )
    return found
