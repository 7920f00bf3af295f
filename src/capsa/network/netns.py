"""Netlink and tap devices inside the engine's network namespace.

The engine's namespace is not ours: capsa-proxy stays in the host's
network namespace (QEMU too; it only needs the tap's file descriptor) and
reaches into the engine's for a moment at a time.  setns(2) with
``CLONE_NEWNET`` moves only the calling *thread*, so every piece of work
here runs in a thread of its own that enters the namespace, works, and
ends (:func:`run_in_netns`); the event loop's thread never moves.  What is
made there stays there: a netlink socket talks to the namespace it was
opened in, and a tap opened with ``TUNSETIFF`` is created in the namespace
of the thread that asked (Documentation/networking/tuntap.rst), whoever
holds its file descriptor later.

pyroute2's own ``netns=`` support forks a helper process (and can create a
missing namespace): neither is wanted in a daemon with an event loop, so
its ``IPRoute`` is only ever opened inside such a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from capsa.errors import NetworkError
from capsa.network.model import AddressInfo, LinkInfo, RouteInfo

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: ioctl on a namespace fd giving its CLONE_NEW* type (linux/nsfs.h, _IO(0xb7, 0x3)).
NS_GET_NSTYPE = 0xB703

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
#: Packets carry a virtio-net header: QEMU's virtio-net then passes
#: checksum and segmentation offloads through instead of doing them in software.
IFF_VNET_HDR = 0x4000
TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16

#: macvtap character devices are ``/dev/tap<ifindex>`` (drivers/net/tap.c).
MACVTAP_DEVICE = "/dev/tap{index}"
#: Where a macvtap's ifindex is chosen: the device node's name is global
#: while ifindexes are per namespace, so a low one would collide with the
#: macvtap of another namespace that got the same number.
MACVTAP_INDEX_RANGE = (1 << 20, 1 << 30)
#: How long to wait for devtmpfs to show a new macvtap's node.
MACVTAP_NODE_TIMEOUT = 2.0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns_fd: int, work: Callable[[], T], what: str) -> T:
    """Run ``work`` in a new thread that first enters the namespace ``netns_fd``; return its result.

    Blocking: call it from a worker thread (``asyncio.to_thread``), never
    from the event loop.  ``work``'s exception is raised here.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def thread_main() -> None:
        try:
            if _libc().setns(netns_fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise NetworkError(f"cannot enter the network namespace to {what}: {os.strerror(code)}")
            result.append(work())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=thread_main, name=f"netns-{what}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def open_netns(path: str) -> int:
    """An fd of the namespace at ``path`` (``/proc/PID/ns/net``, ``/run/netns/NAME``...).

    Holding it keeps the namespace alive and means the same one even if the
    path is reused, from the attach to the last teardown step.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"network namespace {path}: {exc.strerror}") from exc
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetworkError(f"{path} is not a network namespace")
    return fd


def is_host_netns(netns_fd: int) -> bool:
    """Whether ``netns_fd`` is the network namespace of PID 1 or of this process (nsfs identity)."""
    st = os.fstat(netns_fd)
    for own in ("/proc/1/ns/net", "/proc/self/ns/net"):
        with contextlib.suppress(OSError):
            other = os.stat(own)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


# linux/rtnetlink.h: the multicast groups that tell of links, addresses and routes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
NETLINK_ROUTE = 0


def event_socket() -> socket.socket:
    """A non-blocking rtnetlink socket of the current namespace that receives its link,
    address and route changes (rtnetlink(7), "multicast groups"); only their arrival matters."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
        sock.bind((0, groups))
    except OSError as exc:
        sock.close()
        raise NetworkError(f"cannot listen to the namespace's netlink events: {exc.strerror}") from exc
    return sock


def drain(sock: socket.socket) -> None:
    """Read away every pending message (an overrun, ENOBUFS, only means there were many)."""
    while True:
        try:
            if not sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                return


def iproute() -> Any:
    """A pyroute2 ``IPRoute`` on a netlink socket of the calling thread's namespace."""
    from pyroute2 import IPRoute

    return IPRoute()


# --- reading ------------------------------------------------------------------


def read_links_addresses_routes() -> tuple[list[LinkInfo], list[AddressInfo], list[RouteInfo]]:
    """The current namespace's links, addresses and routes as plain records (inside the namespace).

    A namespace with only its loopback (a new one, before the engine moves a
    veth in, or ``--network none``) has nothing to mirror, and is told apart
    by ``if_nameindex`` alone: importing pyroute2 costs the proxy about
    20 MiB and 0.14 s.
    """
    if {name for _, name in socket.if_nameindex()} <= {"lo"}:
        return [], [], []
    with iproute() as ipr:
        links = [_link_info(msg) for msg in ipr.get_links()]
        addresses = [_address_info(msg) for msg in ipr.get_addr()]
        routes = [_route_info(msg) for msg in ipr.get_routes()]
    return links, addresses, routes


def _link_info(msg: Any) -> LinkInfo:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    return LinkInfo(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME") or ""),
        mac=str(msg.get_attr("IFLA_ADDRESS") or ""),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        kind=str(kind or ""),
        link_type=int(msg["ifi_type"]),
    )


def _address_info(msg: Any) -> AddressInfo:
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    # on a point-to-point link, and the only one given for IPv6.
    address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS") or ""
    return AddressInfo(index=int(msg["index"]), address=str(address), prefixlen=int(msg["prefixlen"]))


def _route_info(msg: Any) -> RouteInfo:
    table = msg.get_attr("RTA_TABLE")
    return RouteInfo(
        family=int(msg["family"]),
        dst=str(msg.get_attr("RTA_DST") or ""),
        dst_len=int(msg["dst_len"]),
        oif=int(msg.get_attr("RTA_OIF") or 0),
        gateway=str(msg.get_attr("RTA_GATEWAY") or ""),
        prefsrc=str(msg.get_attr("RTA_PREFSRC") or ""),
        scope=int(msg["scope"]),
        proto=int(msg["proto"]),
        type=int(msg["type"]),
        table=int(table if table is not None else msg["table"]),
        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
    )


# --- taps ---------------------------------------------------------------------


def _ifreq(name: str, flags: int) -> bytes:
    """struct ifreq (netdevice(7)) with ifr_name and ifr_flags set; 40 bytes on Linux."""
    encoded = name.encode()
    if len(encoded) >= IFNAMSIZ:
        raise NetworkError(f"link name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    return struct.pack(f"{IFNAMSIZ}sH22x", encoded, flags)


def create_tap(name: str, mtu: int) -> int:
    """Create tap ``name`` in the current namespace, set its MTU and bring it up; return its fd.

    The tap is not persistent (no ``TUNSETPERSIST``): it exists while a
    file descriptor is attached, so once QEMU holds the only one, the tap
    goes when QEMU does, however QEMU ends.
    """
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open {TUN_DEVICE}: {exc.strerror}") from exc
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as exc:
            reason = "a link of that name exists" if exc.errno == errno.EBUSY else exc.strerror
            raise NetworkError(f"cannot create tap {name}: {reason}") from exc
        _set_up(name, mtu)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _set_up(name: str, mtu: int) -> None:
    from pyroute2 import NetlinkError

    with iproute() as ipr:
        try:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, mtu=mtu, state="up")
        except (NetlinkError, IndexError) as exc:
            raise NetworkError(f"cannot set {name} up with MTU {mtu}: {exc}") from exc


def create_macvtap(name: str, lower: str, mtu: int) -> int:
    """Create macvtap ``name`` on ``lower`` in passthru mode, bring it up, open it; return its fd.

    Passthru mode (the one macvlan/macvtap per lower device) takes the
    lower device's MAC, leaves the lower device's own unchanged, puts the
    lower device in promiscuous mode and hands the macvtap every frame it
    receives (drivers/net/macvlan.c, ``MACVLAN_MODE_PASSTHRU``): the veth
    keeps its MAC, and the guest sends and receives with that same MAC.
    The other modes refuse a macvtap with its lower device's MAC, which is
    why Kata's macvtap model gives the veth a random MAC instead.
    """
    from pyroute2 import NetlinkError

    with iproute() as ipr:
        found = ipr.link_lookup(ifname=lower)
        if not found:
            raise NetworkError(f"no link {lower} in the network namespace")
        index = 0
        for _attempt in range(8):
            index = _free_macvtap_index()
            try:
                ipr.link(
                    "add", ifname=name, index=index, kind="macvtap", link=found[0], macvtap_mode="passthru", mtu=mtu
                )
                break
            except NetlinkError as exc:
                # EEXIST: the index is taken here, or its /dev/tapN by another namespace's macvtap.
                if exc.code != errno.EEXIST or ipr.link_lookup(ifname=name):
                    raise NetworkError(f"cannot create macvtap {name} on {lower}: {exc}") from exc
        else:
            raise NetworkError(f"cannot create macvtap {name} on {lower}: no free interface index")
        try:
            ipr.link("set", index=index, state="up")
            return _open_macvtap(index)
        except BaseException:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
            raise


def _free_macvtap_index() -> int:
    while True:
        index = random.randrange(*MACVTAP_INDEX_RANGE)
        if not os.path.exists(MACVTAP_DEVICE.format(index=index)):
            return index


def _open_macvtap(index: int) -> int:
    path = MACVTAP_DEVICE.format(index=index)
    deadline = time.monotonic() + MACVTAP_NODE_TIMEOUT
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise NetworkError(f"{path} did not appear for the new macvtap") from None
            time.sleep(0.01)
        except OSError as exc:
            raise NetworkError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        # A macvtap queue starts as IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        # already; said again so QEMU's probe (TUNGETIFF) finds it either way.
        fcntl.ioctl(fd, TUNSETIFF, _ifreq("", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot set up {path}: {exc.strerror}") from exc
    return fd


def delete_link(name: str) -> str | None:
    """Delete link ``name`` if it exists; the problem as a message, or None."""
    from pyroute2 import NetlinkError

    with iproute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            return f"ip link del {name}: {exc}"
    return None


def link_names() -> set[str]:
    """The names of the current namespace's links."""
    with iproute() as ipr:
        return {str(msg.get_attr("IFLA_IFNAME")) for msg in ipr.get_links()}
