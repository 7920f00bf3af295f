"""Traffic control that joins the engine's veth to the VM's tap (Kata's "tcfilter" model).

Both links live in the engine's network namespace.  Each gets an ingress
qdisc (tc-ingress(8): handle ``ffff:``), and on it one u32 filter that
matches every packet (a single key with mask 0) of every protocol
(``ETH_P_ALL``) and hands it to ``mirred egress redirect`` towards the
other link (tc-mirred(8)): what arrives on the veth from the engine's
bridge leaves through the tap into QEMU, and what the guest sends arrives
on the tap and leaves through the veth.  The namespace's own IP stack never
sees a packet of the veth again, which is right: the addresses now belong
to the guest.

In iproute2's words, for veth ``eth0`` and tap ``tap0_capsa``::

    tc qdisc add dev eth0 ingress
    tc qdisc add dev tap0_capsa ingress
    tc filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev tap0_capsa
    tc filter add dev tap0_capsa parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev eth0

The plan is data (:func:`mirror_plan`, :func:`teardown_plan`, tested as
such); :func:`apply` and :func:`remove` are the thin shell that sends it
over rtnetlink with pyroute2, inside the namespace (the caller's thread
must already be there: :func:`capsa.network.netns.run_in_netns`).
Removing an ingress qdisc removes its filters with it.

A proxy killed by SIGKILL cannot undo its mirrors.  Its taps go with
QEMU's file descriptors, and the veth's filter is left redirecting to
device index 0; :func:`dead_mirrors` finds such qdiscs so that ``delete``
can remove them later (:func:`capsa.network.attach.sweep`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from capsa.errors import NetworkError

#: The ingress qdisc's handle, ``ffff:`` (tc-ingress(8)).
INGRESS_HANDLE = 0xFFFF0000
#: ETH_P_ALL (linux/if_ether.h): the filter sees every protocol.
ETH_P_ALL = 0x0003
#: u32 key matching every packet: value 0 under mask 0 at offset 0.
MATCH_ALL_KEY = "0x0/0x0+0"
#: Filter priority; one filter per qdisc, any value works.
FILTER_PRIORITY = 1


@dataclass(frozen=True)
class IngressQdisc:
    """An ingress qdisc on ``device``."""

    device: str


@dataclass(frozen=True)
class Redirect:
    """A match-all u32 filter on ``source``'s ingress: mirred egress redirect to ``target``."""

    source: str
    target: str


TcStep = IngressQdisc | Redirect


def mirror_plan(veth: str, tap: str) -> tuple[TcStep, ...]:
    """The steps that mirror ``veth`` and ``tap`` both ways, in the order they must be applied."""
    if veth == tap:
        raise ValueError(f"cannot mirror {veth} onto itself")
    return (IngressQdisc(veth), IngressQdisc(tap), Redirect(veth, tap), Redirect(tap, veth))


def teardown_plan(plan: tuple[TcStep, ...]) -> tuple[IngressQdisc, ...]:
    """What undoes ``plan``: its qdiscs, last made first (their filters go with them)."""
    return tuple(step for step in reversed(plan) if isinstance(step, IngressQdisc))


def tc_command(step: TcStep) -> str:
    """``step`` as an iproute2 ``tc`` command line, for logs and people."""
    if isinstance(step, IngressQdisc):
        return f"tc qdisc add dev {step.device} ingress"
    return (
        f"tc filter add dev {step.source} parent ffff: protocol all u32 match u8 0 0 "
        f"action mirred egress redirect dev {step.target}"
    )


def filter_request(source_index: int, target_index: int) -> dict[str, Any]:
    """The keyword arguments of pyroute2's ``tc("add-filter", "u32", source_index, ...)`` for a Redirect."""
    return {
        "parent": INGRESS_HANDLE,
        "prio": FILTER_PRIORITY,
        "protocol": ETH_P_ALL,
        "keys": [MATCH_ALL_KEY],
        # The u32 classid; with an action it only has to be set.
        "target": INGRESS_HANDLE,
        "action": {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target_index},
    }


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"no link {name} in the network namespace")
    return int(found[0])


def apply(ipr: Any, plan: tuple[TcStep, ...], made: list[IngressQdisc]) -> None:
    """Apply ``plan`` with ``ipr`` (a pyroute2 ``IPRoute`` in the namespace).

    Every qdisc made is appended to ``made`` as soon as it exists, so that
    after a failed step the caller removes exactly what was made.
    """
    from pyroute2 import NetlinkError

    for step in plan:
        try:
            if isinstance(step, IngressQdisc):
                ipr.tc("add", "ingress", _index(ipr, step.device), INGRESS_HANDLE)
                made.append(step)
            else:
                request = filter_request(_index(ipr, step.source), _index(ipr, step.target))
                ipr.tc("add-filter", "u32", _index(ipr, step.source), **request)
        except NetlinkError as exc:
            reason = "the link has one already" if exc.code == errno.EEXIST else os.strerror(exc.code)
            raise NetworkError(f"`{tc_command(step)}` failed: {reason}") from exc


def redirect_targets(filter_msg: Any) -> list[int]:
    """The ifindexes that a dumped filter's ``mirred`` actions redirect to (0: a device that is gone)."""
    options = filter_msg.get_attr("TCA_OPTIONS")
    actions = options.get_attr("TCA_U32_ACT") if options is not None else None
    if actions is None:
        return []
    targets = []
    for _name, action in actions["attrs"]:
        if action.get_attr("TCA_ACT_KIND") != "mirred":
            continue
        parms = action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
        targets.append(int(parms["ifindex"]))
    return targets


def dead_mirrors(ipr: Any) -> list[IngressQdisc]:
    """Ingress qdiscs of the namespace whose filters redirect to a device that no longer exists.

    Such a qdisc swallows every packet of its link (the redirect drops what
    it cannot deliver), so it is broken whoever made it; in practice it is
    the veth's half of a mirror whose tap went with a killed proxy's QEMU.
    """
    links = {int(msg["index"]): str(msg.get_attr("IFLA_IFNAME")) for msg in ipr.get_links()}
    dead = []
    for index, name in sorted(links.items()):
        targets = [t for f in ipr.get_filters(index=index, parent=INGRESS_HANDLE) for t in redirect_targets(f)]
        if targets and any(t not in links for t in targets):
            dead.append(IngressQdisc(name))
    return dead


def remove(ipr: Any, qdiscs: tuple[IngressQdisc, ...] | list[IngressQdisc]) -> list[str]:
    """Delete ``qdiscs`` (and so their filters); a link already gone is not an error.

    Returns what could not be removed, as messages; never raises for a netlink error.
    """
    from pyroute2 import NetlinkError

    problems = []
    for qdisc in qdiscs:
        found = ipr.link_lookup(ifname=qdisc.device)
        if not found:
            continue  # the link went away, its qdiscs with it (a tap whose QEMU exited)
        try:
            ipr.tc("del", "ingress", int(found[0]), INGRESS_HANDLE)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                continue  # no such qdisc (any more)
            problems.append(f"tc qdisc del dev {qdisc.device} ingress: {exc}")
    return problems
