"""A container in a VM on a network namespace the way an engine hands it one.

The test plays the engine: it makes two network namespaces of its own, one
for the container and one for its peer (standing in for the engine's
bridge), joined by a veth pair with addresses in 10.240.N.0/24 and a MAC
set on the container's end.  Nothing gets an address outside those
namespaces.  `capsa run` gets the container's namespace in its spec; then
the guest must show the veth's IP and MAC, TCP must work both ways (busybox
httpd and nc on each side), and after `delete` the namespace must hold no
tap, no macvtap and no qdisc of ours.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Capsa, vm_processes

from capsa.config import resolve_config_path

# busybox-static's wget crashes (its static glibc), so HTTP requests are
# written with nc.
NETWORK_APPLETS = ("ip", "httpd", "nc")
REQUEST = "echo -e 'GET / HTTP/1.0\\r\\n\\r' | nc -w 10 {host} {port}"


@dataclass(frozen=True)
class Wire:
    container_ns: str
    peer_ns: str
    container_ip: str
    peer_ip: str
    container_ip6: str
    peer_ip6: str
    mac: str
    mtu: int

    @property
    def container_ns_path(self) -> str:
        return f"/run/netns/{self.container_ns}"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def tc(netns: str, *args: str) -> str:
    return subprocess.run(["tc", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def network() -> Iterator[Wire]:
    tag = f"{os.getpid() % 10000}-{random.randrange(1 << 16):04x}"
    subnet = random.randrange(1, 255)
    net = Wire(
        container_ns=f"capsa-nt-{tag}-c",
        peer_ns=f"capsa-nt-{tag}-p",
        container_ip=f"10.240.{subnet}.2",
        peer_ip=f"10.240.{subnet}.1",
        container_ip6=f"fd00:ca05:{subnet:x}::2",
        peer_ip6=f"fd00:ca05:{subnet:x}::1",
        mac=f"02:ca:05:a0:{subnet:02x}:02",
        mtu=1400,
    )
    try:
        ip("netns", "add", net.container_ns)
        ip("netns", "add", net.peer_ns)
        c, p = ["-n", net.container_ns], ["-n", net.peer_ns]
        veth = ("type", "veth", "peer", "name", "peer0", "netns", net.peer_ns)
        ip(*c, "link", "add", "eth0", "mtu", str(net.mtu), *veth)
        ip(*c, "link", "set", "eth0", "address", net.mac)
        ip(*c, "addr", "add", f"{net.container_ip}/24", "dev", "eth0")
        ip(*c, "link", "set", "eth0", "up")
        ip(*c, "link", "set", "lo", "up")
        ip(*c, "route", "add", "default", "via", net.peer_ip)
        # nodad: the addresses are usable at once, as a CNI plugin that waits for DAD leaves them.
        ip(*c, "addr", "add", f"{net.container_ip6}/64", "dev", "eth0", "nodad")
        ip(*c, "-6", "route", "add", "default", "via", net.peer_ip6, "dev", "eth0")
        ip(*p, "addr", "add", f"{net.peer_ip}/24", "dev", "peer0")
        ip(*p, "addr", "add", f"{net.peer_ip6}/64", "dev", "peer0", "nodad")
        ip(*p, "link", "set", "peer0", "up")
        ip(*p, "link", "set", "lo", "up")
        yield net
    finally:
        for name in (net.container_ns, net.peer_ns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def spec_with_network(capsa: Capsa, net: Wire | None, script: str) -> None:
    """The bundle's spec: ``script`` in busybox with network applets, in ``net``'s container namespace
    (None: a new namespace, as the default spec asks)."""
    for applet in NETWORK_APPLETS:
        link = capsa.bundle / "rootfs" / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    www = capsa.bundle / "rootfs" / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("served-by-the-container\n")
    capsa.spec(["sh", "-c", script])
    config = capsa.bundle / "config.json"
    spec = json.loads(config.read_text())
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] == "network" and net is not None:
            namespace["path"] = net.container_ns_path
    config.write_text(json.dumps(spec))


def use_network_model(model: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point CAPSA_CONFIG at a copy of the configuration in force with ``[network] model`` set."""
    base = resolve_config_path(None)[0]
    lines = base.read_text().splitlines() if base.exists() else []
    kept, skipping = [], False
    for line in lines:
        if line.strip().startswith("["):
            skipping = line.strip() == "[network]"
        if not skipping:
            kept.append(line)
    path.write_text("\n".join([*kept, "[network]", f'model = "{model}"', ""]))
    monkeypatch.setenv("CAPSA_CONFIG", str(path))


def peer_httpd(net: Wire, directory: Path) -> subprocess.Popen[bytes]:
    directory.mkdir()
    (directory / "index.html").write_text("served-by-the-peer\n")
    return subprocess.Popen(
        ["ip", "netns", "exec", net.peer_ns, "busybox", "httpd", "-f", "-p", "8081", "-h", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def peer_get(net: Wire, host: str, port: int, timeout: float = 30) -> str:
    """An HTTP GET from the peer namespace, retrying while the container's server comes up; the body."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            ["ip", "netns", "exec", net.peer_ns, "busybox", "sh", "-c", REQUEST.format(host=host, port=port)],
            capture_output=True,
            text=True,
        )
        if " 200 OK" in result.stdout or time.monotonic() > deadline:
            return body(result.stdout)
        time.sleep(0.3)


def peer_ping6(net: Wire, timeout: float = 20) -> bool:
    """Ping the container's IPv6 address from the peer until it answers (the guest does DAD first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ping = ["ip", "netns", "exec", net.peer_ns, "busybox", "ping", "-6", "-c", "1", "-W", "1", net.container_ip6]
        if subprocess.run(ping, capture_output=True).returncode == 0:
            return True
        time.sleep(0.3)
    return False


def body(response: str) -> str:
    return response.replace("\r\n", "\n").split("\n\n", 1)[-1]


def ours_left(net: Wire) -> list[str]:
    """Links and qdiscs of ours still in the container's namespace."""
    found = [line for line in ip("-n", net.container_ns, "-o", "link").splitlines() if "_capsa" in line]
    found += [line for line in tc(net.container_ns, "qdisc", "show").splitlines() if "ingress" in line]
    return found


# The container serves the peer; the test looks at the rest through `capsa exec`.
SCRIPT = "exec httpd -f -p 80 -h /www"


def check_network_round_trip(capsa: Capsa, net: Wire, tmp_path: Path, name: str) -> None:
    spec_with_network(capsa, net, SCRIPT)
    server = peer_httpd(net, tmp_path / "peer-www")
    try:
        result = capsa.run(name, "--detach")
        assert result.code == 0, result.stderr
        # The peer reaches the container's server at the veth's address.
        assert peer_get(net, net.container_ip, 80) == "served-by-the-container\n"
        exec_result = capsa("exec", name, "ip", "-o", "link", "show", "eth0")
        assert exec_result.code == 0, exec_result.stderr
        link = exec_result.stdout
        assert f"link/ether {net.mac}" in link
        assert f"mtu {net.mtu}" in link
        addr = capsa("exec", name, "ip", "-o", "-4", "addr", "show", "eth0").stdout
        assert f"inet {net.container_ip}/24" in addr
        route = capsa("exec", name, "ip", "route").stdout
        assert f"default via {net.peer_ip} dev eth0" in route
        addr6 = capsa("exec", name, "ip", "-o", "-6", "addr", "show", "eth0").stdout
        assert f"inet6 {net.container_ip6}/64" in addr6
        route6 = capsa("exec", name, "ip", "-6", "route").stdout
        assert f"default via {net.peer_ip6} dev eth0" in route6
        assert peer_ping6(net), "the peer cannot reach the guest over IPv6"
        neighbours = ip("-n", net.peer_ns, "neigh", "show", net.container_ip)
        assert net.mac in neighbours  # ARP answered by the guest, with the veth's MAC
        # And the container reaches the peer's server.
        get = capsa("exec", name, "sh", "-c", REQUEST.format(host=net.peer_ip, port=8081))
        assert body(get.stdout) == "served-by-the-peer\n", get.stderr
        assert ours_left(net) != []  # while it runs, the tap/macvtap is there
    finally:
        deleted = capsa("delete", "--force", name)
        server.terminate()
        server.wait(10)
    assert deleted.code == 0, deleted.stderr
    assert ours_left(net) == []
    # The engine's veth is as the engine left it.
    assert net.mac in ip("-n", net.container_ns, "-o", "link", "show", "eth0")
    assert f"{net.container_ip}/24" in ip("-n", net.container_ns, "-o", "addr", "show", "eth0")


@pytest.mark.vm
@pytest.mark.slow
def test_tcfilter_puts_the_guest_on_the_namespace_network(capsa: Capsa, network: Wire, tmp_path: Path) -> None:
    check_network_round_trip(capsa, network, tmp_path, "net-tc")


@pytest.mark.vm
@pytest.mark.slow
def test_macvtap_puts_the_guest_on_the_namespace_network(
    capsa: Capsa, network: Wire, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_network_model("macvtap", tmp_path / "configuration.toml", monkeypatch)
    check_network_round_trip(capsa, network, tmp_path, "net-mvt")


@pytest.mark.vm
@pytest.mark.slow
def test_model_none_gives_no_nic(capsa: Capsa, network: Wire, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_network_model("none", tmp_path / "configuration.toml", monkeypatch)
    spec_with_network(capsa, network, "ip -o link")
    result = capsa.run("net-none")
    assert result.code == 0, result.stderr
    assert [line.split(":")[1].strip() for line in result.stdout.splitlines()] == ["lo"]
    assert ours_left(network) == []


@pytest.mark.vm
@pytest.mark.slow
def test_namespace_configured_between_create_and_start(capsa: Capsa, tmp_path: Path) -> None:
    """Docker 28's order: the spec asks for a new namespace, `create` returns, the engine moves its
    veth into /proc/<container pid>/ns/net and configures it, then `start`: the guest gets that network."""
    subnet = random.randrange(1, 255)
    peer_ns = f"capsa-nt-{os.getpid() % 10000}-{random.randrange(1 << 16):04x}-p"
    container_ip, peer_ip, mac = f"10.241.{subnet}.2", f"10.241.{subnet}.1", f"02:ca:05:a1:{subnet:02x}:02"
    spec_with_network(capsa, None, SCRIPT)
    created = False
    try:
        ip("netns", "add", peer_ns)
        result = capsa("create", "--bundle", str(capsa.bundle), "late-net")
        assert result.code == 0, result.stderr
        created = True
        pid = int(capsa.state("late-net")["pid"])
        # The container's PID lives in a network namespace of its own, not the host's.
        assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        ip("-n", peer_ns, "link", "add", "peer0", "type", "veth", "peer", "name", "eth0", "netns", str(pid))
        inside = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip"]
        for args in (
            ["link", "set", "eth0", "address", mac],
            ["addr", "add", f"{container_ip}/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["route", "add", "default", "via", peer_ip],
        ):
            subprocess.run([*inside, *args], check=True, capture_output=True)
        ip("-n", peer_ns, "addr", "add", f"{peer_ip}/24", "dev", "peer0")
        ip("-n", peer_ns, "link", "set", "peer0", "up")

        result = capsa("start", "late-net")
        assert result.code == 0, result.stderr

        net = Wire("", peer_ns, container_ip, peer_ip, "", "", mac, 1500)
        assert peer_get(net, container_ip, 80) == "served-by-the-container\n"
        assert f"link/ether {mac}" in capsa("exec", "late-net", "ip", "-o", "link", "show", "eth0").stdout
    finally:
        if created:
            capsa("delete", "--force", "late-net")
        subprocess.run(["ip", "netns", "del", peer_ns], capture_output=True)


@pytest.mark.vm
@pytest.mark.slow
def test_an_interface_added_while_running_gets_a_nic(capsa: Capsa, network: Wire) -> None:
    """CNI chaining, `podman network connect`: a second veth appears in the running container's
    namespace; the guest gets a NIC for it with its MAC and address, and the peer reaches it.
    When it goes (`network disconnect`), the NIC goes too."""
    spec_with_network(capsa, network, SCRIPT)
    second_ip = network.container_ip.replace("10.240.", "10.242.")
    second_peer_ip = network.peer_ip.replace("10.240.", "10.242.")
    second_mac = network.mac.replace("02:ca:05:a0", "02:ca:05:a2")
    result = capsa.run("net-late", "--detach")
    assert result.code == 0, result.stderr
    try:
        c, p = ["-n", network.container_ns], ["-n", network.peer_ns]
        ip(*c, "link", "add", "eth1", "type", "veth", "peer", "name", "peer1", "netns", network.peer_ns)
        ip(*c, "link", "set", "eth1", "address", second_mac)
        ip(*c, "addr", "add", f"{second_ip}/24", "dev", "eth1")
        ip(*c, "link", "set", "eth1", "up")
        ip(*p, "addr", "add", f"{second_peer_ip}/24", "dev", "peer1")
        ip(*p, "link", "set", "peer1", "up")
        deadline = time.monotonic() + 30
        link = ""
        while time.monotonic() < deadline:
            link = capsa("exec", "net-late", "ip", "-o", "addr", "show").stdout
            if f"inet {second_ip}/24" in link:
                break
            time.sleep(0.5)
        assert f"inet {second_ip}/24" in link, link
        assert second_mac in capsa("exec", "net-late", "ip", "-o", "link", "show", "eth1").stdout
        ping = ["ip", "netns", "exec", network.peer_ns, "busybox", "ping", "-c", "2", "-W", "2", second_ip]
        assert subprocess.run(ping, capture_output=True).returncode == 0
        assert len([line for line in ip(*c, "-o", "link").splitlines() if "tap" in line and "_capsa" in line]) == 2
        # `network disconnect`: the veth goes, and the guest's NIC with it (and its tap).
        ip(*c, "link", "del", "eth1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            link = capsa("exec", "net-late", "ip", "-o", "link", "show").stdout
            if "eth1" not in link:
                break
            time.sleep(0.5)
        assert "eth1" not in link, link
        assert "eth0" in link
        assert len([line for line in ip(*c, "-o", "link").splitlines() if "tap" in line and "_capsa" in line]) == 1
        assert peer_get(network, network.container_ip, 80) == "served-by-the-container\n"
    finally:
        deleted = capsa("delete", "--force", "net-late")
    assert deleted.code == 0, deleted.stderr
    assert ours_left(network) == []


@pytest.mark.vm
@pytest.mark.slow
def test_delete_after_a_killed_proxy_leaves_the_namespace_clean(capsa: Capsa, network: Wire) -> None:
    """SIGKILL gives the proxy no chance to take its mirror down: `delete` sweeps the namespace instead."""
    spec_with_network(capsa, network, SCRIPT)
    result = capsa.run("net-kill", "--detach")
    assert result.code == 0, result.stderr
    try:
        proxy = vm_processes(capsa, "net-kill")["proxy"]
        assert ours_left(network) != []
        os.kill(proxy, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while capsa.status("net-kill") != "stopped":
            assert time.monotonic() < deadline, "the container did not stop with its proxy"
            time.sleep(0.2)
        # What the proxy made is still there: the veth's ingress qdisc, redirecting to nowhere.
        assert any("eth0" in line for line in ours_left(network))
    finally:
        deleted = capsa("delete", "--force", "net-kill")
    assert deleted.code == 0, deleted.stderr
    assert ours_left(network) == []
    assert f"{network.container_ip}/24" in ip("-n", network.container_ns, "-o", "addr", "show", "eth0")
