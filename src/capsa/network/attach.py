"""Put a sandbox's VM on the engine's network, and take it off again.

The one entry point is :class:`NetworkAttachment`: :meth:`~NetworkAttachment.attach`
once the VM runs and its agent answers, :meth:`~NetworkAttachment.detach`
once the VM is stopped.  For each endpoint of the engine's namespace
(:func:`capsa.network.model.select_endpoints`), in that namespace:

* ``tcfilter`` (the default; Kata's model of the same name): a tap
  ``tap<N>_capsa`` with the veth's MTU, and tc mirroring between the two
  (:mod:`capsa.network.tc`);
* ``macvtap``: a passthru macvtap ``mvtap<N>_capsa`` on the veth
  (:func:`capsa.network.netns.create_macvtap`);

then QEMU gets the device's file descriptor and hot-plugs a virtio-net
NIC on it with the veth's MAC (:meth:`capsa.hypervisor.base.Hypervisor.plug_nic`),
and the agent configures that NIC (``UpdateInterface``: found by MAC,
named like the veth, its addresses and MTU) and the routes
(``UpdateRoutes``).  Then the namespace's loopback is relayed to the
guest's (:mod:`capsa.network.relay`: a listener and a NAT rule, so that
``localhost:PORT`` there reaches the guest, as CRI ``PortForward`` expects);
a namespace where that cannot be made keeps its VM, with a warning.

Nothing is left behind (DESIGN.md decision 9): a tap exists only while a
file descriptor holds it, and QEMU holds the only one, so it goes with
QEMU however QEMU ends; :meth:`detach` removes the ingress qdiscs (with
their filters), any macvtap and the relay's rules, and runs even after a
failed attach.  A proxy killed by SIGKILL leaves the veth's ingress qdisc
(now redirecting to nowhere), any macvtap and the relay's rules (now
redirecting to a closed port) behind: :func:`sweep` removes them when the
container is deleted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from capsa.errors import AgentError, CapsaError, NetworkError
from capsa.network import netns, relay, tc
from capsa.network.loopback import FAMILIES, Family
from capsa.network.model import (
    Endpoint,
    Route,
    interface_message,
    route_skip_reason,
    routes_message,
    select_endpoints,
    select_routes,
)
from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.errors import Code, StatusError

log = logging.getLogger("capsa.network")

T = TypeVar("T")

MODELS = ("tcfilter", "macvtap", "none")

#: How long a burst of netlink events may go on before the namespace is read again.
WATCH_SETTLE_SECONDS = 0.2


class NicHypervisor(Protocol):
    async def plug_nic(self, tap_fd: int, mac: str, mtu: int, slot: int) -> None: ...

    async def unplug_nic(self, slot: int) -> None: ...


class NetworkAgent(Protocol):
    async def update_interface(self, interface: pb.Interface) -> pb.Interface: ...

    async def update_routes(self, routes: pb.Routes) -> pb.Routes: ...


class GuestAgent(NetworkAgent, relay.StreamAgent, Protocol):
    """What an attachment asks of the agent: the NIC's configuration, and the loopback relay's streams."""


def device_name(model: str, slot: int) -> str:
    """The tap (or macvtap) of endpoint ``slot``: ours by its name (at most 15 bytes, IFNAMSIZ)."""
    return f"tap{slot}_capsa" if model == "tcfilter" else f"mvtap{slot}_capsa"


@dataclass
class _Made:
    """What one endpoint got in the namespace, so that detach undoes exactly that."""

    endpoint: Endpoint
    device: str
    slot: int
    qdiscs: list[tc.IngressQdisc] = field(default_factory=list)


class NetworkAttachment:
    """The VM's NICs in one engine network namespace (see the module docstring)."""

    def __init__(self, netns_path: str, model: str) -> None:
        if model not in MODELS:
            raise NetworkError(f"unknown network model {model!r} (known: {', '.join(MODELS)})")
        self.netns_path = netns_path
        self.model = model
        self.endpoints: tuple[Endpoint, ...] = ()
        self.routes: tuple[Route, ...] = ()
        self._netns_fd = -1
        self._events: socket.socket | None = None
        self._made: list[_Made] = []
        self._relay: relay.LoopbackRelay | None = None
        # NIC slots only grow: QEMU ids of an unplugged NIC are never reused.
        self._next_slot = 0

    async def attach(self, hypervisor: NicHypervisor, agent: GuestAgent) -> None:
        """Give the VM a NIC per endpoint and configure the guest; on failure, undo it all and raise."""
        if self.model == "none":
            return
        try:
            await self._attach(hypervisor, agent)
        except BaseException:
            await self.detach()
            raise

    async def _attach(self, hypervisor: NicHypervisor, agent: GuestAgent) -> None:
        started = time.monotonic()
        self._netns_fd = netns.open_netns(self.netns_path)
        if netns.is_host_netns(self._netns_fd):
            # Its links are the host's: mirroring one into a VM would cut the host off.
            raise NetworkError(f"{self.netns_path} is the host's network namespace: a VM cannot take it over")
        # Listening before the first read: no change between the two goes unseen.
        self._events = await self._in_netns(netns.event_socket, "listen to it")
        await self.refresh(hypervisor, agent)
        await self._relay_loopback(agent)
        if not self.endpoints:
            log.info("network namespace %s has no configured interface yet: the VM has no NIC", self.netns_path)
            return
        log.info(
            "VM on the network of %s (%s) in %.3f s: %s",
            self.netns_path,
            self.model,
            time.monotonic() - started,
            describe(self.endpoints),
        )

    async def _relay_loopback(self, agent: relay.StreamAgent) -> None:
        """Relay the namespace's loopback to the guest's; what fails is logged, the VM stays on the network.

        Only port forwarding (a connection to ``localhost`` in the namespace)
        needs it; a pod runs without it, so a host without iptables warns
        rather than refuses.
        """
        loopback = relay.LoopbackRelay(agent)
        try:
            listeners = await self._in_netns(relay.listen_and_redirect, "relay its loopback to the guest")
        except (NetworkError, OSError) as exc:
            log.warning(
                "network namespace %s: connections to its localhost will not reach the guest (port forwarding): %s",
                self.netns_path,
                exc,
            )
            return
        if not listeners:
            log.info("network namespace %s has no loopback address (lo down?): nothing to relay", self.netns_path)
            return
        loopback.serve(listeners)
        self._relay = loopback
        log.info("localhost of %s relayed to the guest's (%s)", self.netns_path, loopback.describe())

    async def refresh(self, hypervisor: NicHypervisor, agent: NetworkAgent) -> bool:
        """Bring the guest up to date with the namespace; whether anything was sent.

        An endpoint that appeared (a veth moved in and addressed: CNI
        chaining, ``podman network connect``) gets a NIC; one whose
        addresses or MTU changed is configured again; the routes are sent
        again when they changed.  An endpoint that went away keeps its NIC
        (the guest sees no more traffic on it); that is logged.
        """
        links, addresses, routes = await self._in_netns(netns.read_links_addresses_routes, "read its links")
        current = select_endpoints(links, addresses)
        known = {_identity(e): e for e in self.endpoints}
        new = [e for e in current if _identity(e) not in known]
        changed = [e for e in current if _identity(e) in known and known[_identity(e)] != e]
        left = known.keys() - {_identity(e) for e in current}
        endpoints = tuple(e for e in current if _identity(e) in known) + tuple(new)
        devices = {endpoint.index: endpoint.name for endpoint in endpoints}
        for route in routes:
            reason = route_skip_reason(route, devices)
            if reason is not None and reason not in ("made by the kernel", "in table 255"):
                log.debug("route to %s/%d not given to the guest: %s", route.dst or "default", route.dst_len, reason)
        wanted_routes = select_routes(routes, endpoints)
        for made in [made for made in self._made if _identity(made.endpoint) in left]:
            # `network disconnect`: the NIC goes, and its addresses and routes with it.
            log.info("%s (%s) left the network namespace: unplugging its NIC", made.endpoint.name, made.endpoint.mac)
            await hypervisor.unplug_nic(made.slot)
            self._made.remove(made)
            for problem in await self._in_netns(functools.partial(_undo, [made]), f"remove {made.device}"):
                log.warning("network namespace %s: %s", self.netns_path, problem)
        plugged = {_identity(made.endpoint) for made in self._made}
        for endpoint in new:
            # One plugged by a refresh whose guest part failed is only configured again.
            if _identity(endpoint) not in plugged:
                await self._plug(hypervisor, endpoint)
        for endpoint in [*new, *changed]:
            await _agent_call(agent.update_interface(interface_message(endpoint)), "UpdateInterface", endpoint.name)
        self.endpoints = endpoints
        send_routes = wanted_routes != self.routes and (bool(wanted_routes) or bool(self.routes))
        if send_routes:
            await _agent_call(agent.update_routes(routes_message(wanted_routes)), "UpdateRoutes", "")
        self.routes = wanted_routes
        return bool(new or changed or left or send_routes)

    async def watch(self, hypervisor: NicHypervisor, agent: NetworkAgent) -> None:
        """Follow the namespace until cancelled: each burst of netlink events ends in a :meth:`refresh`.

        Costs nothing while the namespace is quiet (the socket is only
        read when the kernel reports a change).  A failed refresh is logged
        and the next change tries again.
        """
        sock = self._events
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        pending = asyncio.Event()
        loop.add_reader(sock.fileno(), pending.set)
        try:
            while True:
                await pending.wait()
                # An engine's change is a burst (link moved in, renamed, up,
                # addressed, routed): let it settle, then look once.
                await asyncio.sleep(WATCH_SETTLE_SECONDS)
                pending.clear()
                netns.drain(sock)
                try:
                    if await self.refresh(hypervisor, agent):
                        log.info("network of %s updated: %s", self.netns_path, describe(self.endpoints))
                except (CapsaError, OSError) as exc:
                    log.warning("network namespace %s changed, but the VM could not follow: %s", self.netns_path, exc)
        finally:
            loop.remove_reader(sock.fileno())

    async def _plug(self, hypervisor: NicHypervisor, endpoint: Endpoint) -> None:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        made = _Made(endpoint, device_name(self.model, slot), slot)
        self._made.append(made)
        if self.model == "tcfilter":
            plan = tc.mirror_plan(endpoint.name, made.device)

            def make_tap() -> int:
                fd = netns.create_tap(made.device, endpoint.mtu)
                try:
                    with netns.iproute() as ipr:
                        tc.apply(ipr, plan, made.qdiscs)
                except BaseException:
                    os.close(fd)
                    raise
                return fd

            fd = await self._in_netns(make_tap, f"make {made.device}")
        else:
            fd = await self._in_netns(
                lambda: netns.create_macvtap(made.device, endpoint.name, endpoint.mtu), f"make {made.device}"
            )
        try:
            await hypervisor.plug_nic(fd, endpoint.mac, endpoint.mtu, slot)
        finally:
            # QEMU holds its own copy now (or failed and holds none): ours
            # would keep a tap alive past QEMU's end.
            os.close(fd)

    async def detach(self) -> None:
        """Remove what :meth:`attach` made in the namespace; never raises, safe to call twice."""
        made, self._made = self._made, []
        loopback, self._relay = self._relay, None
        families = loopback.families if loopback is not None else ()
        if loopback is not None:
            await loopback.close()
        events, self._events = self._events, None
        if events is not None:
            events.close()
        fd, self._netns_fd = self._netns_fd, -1
        if fd < 0:
            return
        try:
            if made or families:
                try:
                    problems = await self._in_netns(lambda: _undo(made, families), "remove its taps", fd)
                except Exception as exc:  # teardown reports, never raises
                    problems = [str(exc)]
                for problem in problems:
                    log.warning("network namespace %s: %s", self.netns_path, problem)
        finally:
            os.close(fd)

    async def _in_netns(self, work: Callable[[], T], what: str, fd: int | None = None) -> T:
        return await asyncio.to_thread(netns.run_in_netns, self._netns_fd if fd is None else fd, work, what)


def _undo(made: list[_Made], families: tuple[Family, ...] = ()) -> list[str]:
    """In the namespace: remove the qdiscs (their filters with them) and links of ``made``, and the
    loopback relay's rules of ``families``; the problems."""
    problems = relay.remove_rules(families)
    with netns.iproute() as ipr:
        for item in reversed(made):
            problems += tc.remove(ipr, tc.teardown_plan(tuple(item.qdiscs)))
    for item in reversed(made):
        # A tap normally went with QEMU's fd; a macvtap stays until deleted.
        problem = netns.delete_link(item.device)
        if problem:
            problems.append(problem)
    return problems


#: The names :func:`device_name` gives.
_OUR_DEVICE = re.compile(r"(mv)?tap[0-9]+_capsa")


def sweep(netns_path: str) -> list[str]:
    """After a VM whose proxy could not detach: remove what is left of its network in ``netns_path``.

    That is every ingress qdisc redirecting to a device that is gone
    (:func:`capsa.network.tc.dead_mirrors`), every link named like ours, and
    the loopback relay's rules.
    A namespace that is gone already took them along.  Blocking; returns the
    problems as messages and never raises.
    """
    try:
        fd = netns.open_netns(netns_path)
    except NetworkError:
        return []
    try:
        if netns.is_host_netns(fd):
            return []  # capsa never mirrors in the host's namespace (create refuses it)
        return netns.run_in_netns(fd, _sweep_here, "remove what a killed VM left")
    except Exception as exc:  # teardown reports, never raises
        return [str(exc)]
    finally:
        os.close(fd)


def _sweep_here() -> list[str]:
    problems = relay.remove_rules(FAMILIES)
    with netns.iproute() as ipr:
        problems += tc.remove(ipr, tc.dead_mirrors(ipr))
    for name in sorted(netns.link_names()):
        if _OUR_DEVICE.fullmatch(name):
            problem = netns.delete_link(name)
            if problem:
                problems.append(problem)
    return problems


def _identity(endpoint: Endpoint) -> tuple[str, str, int]:
    """What makes an endpoint the same one: a veth deleted and made anew is another (its tap mirrors the old)."""
    return endpoint.name, endpoint.mac, endpoint.index


def describe(endpoints: tuple[Endpoint, ...]) -> str:
    """``eth0 3a:5b:00:11:22:33 10.88.0.5/16 fd00::5/64; ...``, for logs."""
    return "; ".join(f"{e.name} {e.mac} {' '.join(f'{a}/{p}' for a, p in e.addresses)}" for e in endpoints)


async def _agent_call(call: Awaitable[Any], method: str, device: str) -> None:
    """Await an agent call; an agent without networking is told apart from one that failed."""
    try:
        await call
    except AgentError as exc:
        cause = exc.__cause__
        if isinstance(cause, StatusError) and cause.code == Code.UNIMPLEMENTED:
            raise NetworkError(
                f"the guest agent cannot configure a network interface ({method} is not implemented): "
                "rebuild the guest image (guest/image/build.py)"
            ) from exc
        what = f" {device}" if device else ""
        raise NetworkError(f"the guest could not configure its network{what}: {exc}") from exc
