"""The engine namespace's loopback, relayed to the guest's: the rules and the socket options, as data.

Under runc a process that enters a pod's network namespace and dials
``localhost:PORT`` reaches the pod's server: containerd's CRI does exactly
that for ``PortForward`` (``kubectl port-forward``), dialling tcp4, then
tcp6.  Under capsa the server listens in the guest, and the host's side of
the namespace has nothing on its loopback.  So the VM's owner listens there
(:mod:`capsa.network.relay`), and a NAT rule in the namespace sends it every
TCP connection to the loopback: ``nat OUTPUT``, ``-o lo``, ``REDIRECT``
(iptables-extensions(8): a locally generated connection is redirected to
127.0.0.1 or ``::1``, its port replaced).  The relay reads the port asked
for back from conntrack (``SO_ORIGINAL_DST``) and opens that port on the
guest's loopback through the agent (agent.proto ``OpenTcpStream``).

The rules live in a chain of ours, :data:`CHAIN`, jumped to from ``OUTPUT``,
fed to ``iptables-restore --noflush`` (whichever backend the host's
``iptables`` is: nft or legacy; both work in a network namespace): the
namespace's other rules (Docker's embedded DNS puts some there) are left
alone, and removing ours is deleting what ``iptables-save`` shows of them.
The relay's own port needs no exception: the relay never dials in the
namespace, and a connection to that port number is redirected onto itself
and, like any other, forwarded to the same port in the guest.

Pure: the text for ``iptables-restore`` and the parsing of what the kernel
returns; :mod:`capsa.network.relay` runs them.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from capsa.errors import NetworkError

#: The chain that holds the redirect (iptables chain names: at most 28 characters).
CHAIN = "CAPSA-PORT-FORWARD"

#: linux/netfilter_ipv4.h SO_ORIGINAL_DST, at level SOL_IP; the IPv6 twin
#: linux/netfilter_ipv6/ip6_tables.h IP6T_SO_ORIGINAL_DST, at level SOL_IPV6.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = 0
SOL_IPV6 = 41


@dataclass(frozen=True)
class Family:
    """One address family's loopback, and the iptables tools that NAT it."""

    name: str
    af: int
    #: Where the relay listens: where REDIRECT sends a locally generated connection.
    address: str
    #: Every destination of this family on the loopback.
    loopback: str
    restore: str
    save: str
    #: getsockopt(level, option, size) that gives the connection's original destination.
    level: int
    option: int
    #: sizeof(struct sockaddr_in) or sizeof(struct sockaddr_in6).
    size: int


IPV4 = Family(
    name="IPv4",
    af=socket.AF_INET,
    address="127.0.0.1",
    loopback="127.0.0.0/8",
    restore="iptables-restore",
    save="iptables-save",
    level=SOL_IP,
    option=SO_ORIGINAL_DST,
    size=16,
)
IPV6 = Family(
    name="IPv6",
    af=socket.AF_INET6,
    address="::1",
    loopback="::1/128",
    restore="ip6tables-restore",
    save="ip6tables-save",
    level=SOL_IPV6,
    option=IP6T_SO_ORIGINAL_DST,
    size=28,
)
FAMILIES = (IPV4, IPV6)


def jump_rule(family: Family) -> str:
    """The ``OUTPUT`` rule that sends the family's loopback TCP to :data:`CHAIN`, as ``iptables-save`` prints it."""
    return f"-A OUTPUT -d {family.loopback} -o lo -p tcp -j {CHAIN}"


def install_rules(family: Family, port: int) -> str:
    """``iptables-restore --noflush`` input: every TCP connection to the loopback goes to ``port``.

    Declaring the chain empties it if it exists (a VM's relay left behind by
    a killed owner), so the redirect names this relay's port; a second jump
    to the chain left by that owner would change nothing.
    """
    if not 0 < port < 65536:
        raise NetworkError(f"relay port {port}: not a TCP port")
    return (
        "*nat\n"
        f":{CHAIN} - [0:0]\n"
        f"{jump_rule(family)}\n"
        f"-A {CHAIN} -p tcp -j REDIRECT --to-ports {port}\n"
        "COMMIT\n"
    )


def removal_rules(saved: str) -> str | None:
    """``iptables-restore --noflush`` input that removes our rules from the nat table ``saved``
    (``iptables-save -t nat`` output); None when it holds none of them."""
    jumps: list[str] = []
    has_chain = False
    for line in saved.splitlines():
        words = line.split()
        if line.startswith(f":{CHAIN} "):
            has_chain = True
        elif words[:2] == ["-A", "OUTPUT"] and words[-2:] == ["-j", CHAIN]:
            jumps.append("-D" + line[2:])
    if not has_chain and not jumps:
        return None
    body = "".join(f"{jump}\n" for jump in jumps)
    if has_chain:
        body += f"-F {CHAIN}\n-X {CHAIN}\n"
    return f"*nat\n{body}COMMIT\n"


def original_port(family: Family, raw: bytes) -> int:
    """The destination port a redirected connection asked for, from the ``sockaddr_in``
    (``sockaddr_in6``) that ``SO_ORIGINAL_DST`` returns: family in host order,
    then the port in network order (ip(7), ipv6(7))."""
    if len(raw) < 4:
        raise NetworkError(f"original destination: {len(raw)} bytes, not an {family.name} socket address")
    (af,) = struct.unpack("=H", raw[:2])
    if af != family.af:
        raise NetworkError(f"original destination: address family {af}, expected {family.af} ({family.name})")
    (port,) = struct.unpack("!H", raw[2:4])
    if port == 0:
        raise NetworkError("original destination: port 0")
    return int(port)
