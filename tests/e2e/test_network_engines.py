"""Podman's and Docker's default bridge networks with the runtime under test.

Each engine runs in a network namespace the test made (``nsenter --net``:
``e2e_engines.in_netns``), so its bridge (Podman 4.3's CNI ``cni-podman0``,
10.88.0.0/16; Docker's ``docker0``, 172.17.0.0/16), its NAT rules and its
published ports live there, and the test's "host side" (the client of
``-p``) runs there too: nothing gets an address, a bridge or a rule in the
host's own namespace.  What a user sees:

- ``-p 127.0.0.1:18080:80`` to busybox ``httpd``: a GET from the host side
  to 127.0.0.1:18080 returns the page (a file on a volume); with ``-p
  18081:80`` a client beyond the engine's host gets it too;
- the container's ``eth0`` has the IP, prefix and MAC ``inspect`` reports,
  and it reaches the bridge's gateway address;
- two containers on the bridge reach each other (TCP and ping), and the
  host side reaches the container's own address;
- the container reaches out: an HTTP server in a third namespace behind
  the engine's host (its "uplink"), which has no route back to the bridge,
  answers through the engine's masquerading;
- ``network connect`` of a second network while it runs, and ``network
  disconnect``; a network with IPv6, reached over IPv6;
- ``--network host`` under capsa: refused with the runtime's one line,
  nothing left (under runc it runs on the engine host's links);
- after ``stop``: no tap and no ingress qdisc left in the container's network
  namespace (held open by the test, so it can be looked at after the
  engine let go of it), and no runtime process left; after ``rm``, no
  namespace of the engine's left.

Every test runs with capsa's default network model (``tcfilter``: a tap
and tc mirroring) and again with ``macvtap`` (``-macvtap`` engines: the
wrapper hands the runtime a configuration saying so).  Under runc
(``CAPSA_E2E_RUNTIME=runc``) the same tests pass (the ``-macvtap`` ones are
skipped), which proves they test the engines' contract, not capsa's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_engines import Docker, Podman, in_netns
from e2e_support import (
    Runtime,
    assert_nothing_left,
    kill_pids,
    mounts_under,
    session_processes,
    unmount_under,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

Engine = Podman | Docker
PORT = 18080  # published on the engine host's 127.0.0.1
PUBLIC_PORT = 18081  # published on all its addresses
PAGE = "served-by-the-container\n"
# TEST-NET-2 (RFC 5737), only ever inside the test's namespaces.
UPLINK_IP, OUTSIDE_IP = "198.51.100.1", "198.51.100.2"
SECOND = "e2e-second"  # a second bridge network, connected to a running container
DUAL, V6_SUBNET = "e2e-dual", "fd00:ca05:e2e::/64"  # a network with IPv6 (Docker needs its subnet named)
CNI_LEASES = Path("/var/lib/cni/networks")
# busybox-static's wget crashes (its static glibc), so HTTP requests are written with nc.
REQUEST = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {host} {port}"
# The runtime's network devices in the engine's namespace: capsa's taps and macvtaps.
OURS = re.compile(r"^\d+: \S*_capsa[:@]", re.MULTILINE)


def ip_netns(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", *args], capture_output=True, text=True, timeout=30)


def outside(engine: Engine) -> str:
    """The name of the namespace standing for the world beyond the engine's host (see ``engine``)."""
    assert engine.netns is not None
    return engine.netns.name + "-out"


def macvtap_runtime(runtime: Runtime, session_dir: Path) -> Runtime:
    """The runtime under test with ``[network] model = "macvtap"`` (a copy of the configuration in
    force, handed to it by the wrapper as ``CAPSA_CONFIG``)."""
    from capsa.config import resolve_config_path

    base = resolve_config_path(None)[0]
    kept, skipping = [], False
    for line in base.read_text().splitlines() if base.exists() else []:
        if line.strip().startswith("["):
            skipping = line.strip() == "[network]"
        if not skipping:
            kept.append(line)
    config = session_dir / "configuration-macvtap.toml"
    config.write_text("\n".join([*kept, "[network]", 'model = "macvtap"', ""]))
    return Runtime(runtime.binary, runtime.session, "macvtap", {**runtime.env, "CAPSA_CONFIG": str(config)})


@pytest.fixture(scope="module", params=["podman", "docker", "podman-macvtap", "docker-macvtap"])
def engine(request: pytest.FixtureRequest, runtime: Runtime, session_dir: Path, image_tar: Path) -> Iterator[Engine]:
    """One engine on its default bridge, in a network namespace of its own (its "host"), with an uplink
    ``198.51.100.1/24`` to a second namespace (the "outside", ``.2``, no route back to the bridge);
    both deleted afterwards.  ``-macvtap``: capsa with its other network model (nothing new under runc)."""
    kind, _, model = request.param.partition("-")
    if model:
        if not runtime.capsa:
            pytest.skip("the network model is capsa's")
        runtime = macvtap_runtime(runtime, session_dir)
    name = f"capsa-e2e-{request.param}-{os.getpid()}"
    made: list[str] = []
    # CNI's host-local IPAM keeps each network's leases in /var/lib/cni/networks/<name>
    # (Podman's default): the directories of the tests' own networks go with them.
    leases = [CNI_LEASES / network for network in (SECOND, DUAL) if not (CNI_LEASES / network).exists()]
    try:
        for namespace in (name, name + "-out"):
            added = ip_netns("add", namespace)
            assert added.returncode == 0, added.stderr
            made.append(namespace)
            subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True, timeout=30)
        here, there = ("ip", "-n", name), ("ip", "-n", name + "-out")
        for argv in (
            (*here, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", name + "-out"),
            (*here, "addr", "add", f"{UPLINK_IP}/24", "dev", "uplink"),
            (*here, "link", "set", "uplink", "up"),
            (*there, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0"),
            (*there, "link", "set", "eth0", "up"),
        ):
            subprocess.run(argv, check=True, timeout=30)
        netns = Path("/run/netns") / name
        tag = f"{kind}-net" + (f"-{model}" if model else "")
        found: Engine = (Podman if kind == "podman" else Docker)(runtime, session_dir, image_tar, netns=netns, tag=tag)
        try:
            yield found
        finally:
            found.stop()
    finally:
        for namespace in made:
            ip_netns("del", namespace)
        for directory in leases:
            shutil.rmtree(directory, ignore_errors=True)


def run_args(engine: Engine, *args: str, network: str = "bridge") -> list[str]:
    runtime = ["--runtime", engine.runtime_name] if isinstance(engine, Docker) else []
    return ["run", *runtime, "--network", network, *args]


def host_side(engine: Engine, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert engine.netns is not None
    argv = [*in_netns(engine.netns), "busybox", "sh", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def body(response: str) -> str:
    return response.replace("\r\n", "\n").split("\n\n", 1)[-1]


def host_get(engine: Engine, host: str, port: int, timeout: float = 60) -> str:
    """An HTTP GET from the host side, retried while the container's server comes up; the body."""
    deadline = time.monotonic() + timeout
    while True:
        result = host_side(engine, REQUEST.format(host=host, port=port))
        if " 200 OK" in result.stdout or time.monotonic() > deadline:
            return body(result.stdout) if " 200 OK" in result.stdout else result.stdout + result.stderr
        time.sleep(0.5)


def container_get(engine: Engine, cid: str, host: str, port: int, timeout: float = 60) -> str:
    """An HTTP GET from inside container ``cid``, retried like ``host_get``; the body."""
    request = REQUEST.format(host=host, port=port)
    script = f"i=0; while [ $i -lt {int(timeout)} ]; do {request} && exit; sleep 1; i=$((i+1)); done"
    return body(engine("exec", cid, "sh", "-c", script, timeout=timeout + 30).stdout)


def rm(engine: Engine, *cids: str) -> None:
    """Remove containers whatever state a failed test left them in, keeping the test's own failure."""
    # Podman's rm --force waits --time (10 s) after TERM, which httpd and sleep as PID 1 ignore.
    now = ("--time", "0") if isinstance(engine, Podman) else ()
    with contextlib.suppress(AssertionError):
        if engine("rm", "--force", *now, *cids, timeout=120).code != 0:
            # A runtime process that holds the engine up is ended first (marked, naming the container).
            session = engine.runtime.session
            kill_pids([p.pid for p in session_processes(session, []) if p.marked and any(c in p.cmdline for c in cids)])
            engine("rm", "--force", *now, *cids, timeout=60)


def netns_path(engine: Engine, cid: str) -> str:
    return engine.inspect(cid, "{{.NetworkSettings.SandboxKey}}")


def leftovers_in(netns: str) -> list[str]:
    """The runtime's links and any ingress qdisc in the namespace at ``netns`` (a path or /proc/self/fd/N)."""
    links = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-o", "link"], capture_output=True, text=True, timeout=30
    )
    qdiscs = subprocess.run(
        ["nsenter", f"--net={netns}", "tc", "qdisc", "show"], capture_output=True, text=True, timeout=30
    )
    assert links.returncode == 0 and qdiscs.returncode == 0, links.stderr + qdiscs.stderr
    found = [line for line in links.stdout.splitlines() if OURS.match(line)]
    return found + [line for line in qdiscs.stdout.splitlines() if "ingress" in line]


@pytest.fixture(scope="class")
def web(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """busybox httpd on port 80 serving a page from a read-only volume, published on the engine host's 127.0.0.1:18080
    and on all its addresses' 18081."""
    www = tmp_path_factory.mktemp("www")
    (www / "index.html").write_text(PAGE)
    publish = ("-p", f"127.0.0.1:{PORT}:80", "-p", f"{PUBLIC_PORT}:80", "-v", f"{www}:/www:ro")
    cid = engine(*run_args(engine, "-d", *publish, engine.image, "httpd", "-f", "-p", "80", "-h", "/www")).check().out
    try:
        yield cid
    finally:
        rm(engine, cid)


class TestBridge:
    """One published web server on the engine's default bridge, and what can reach it."""

    def test_published_port_serves_the_page(self, engine: Engine, web: str) -> None:
        assert host_get(engine, "127.0.0.1", PORT) == PAGE

    def test_published_on_every_address_serves_the_outside(self, engine: Engine, web: str) -> None:
        """``-p 18081:80`` (all addresses): a client in the outside namespace reaches it at the uplink's
        address, through the engine's DNAT (the request never touches the engine host's loopback)."""
        request = REQUEST.format(host=UPLINK_IP, port=PUBLIC_PORT)
        argv = [*in_netns(Path("/run/netns") / outside(engine)), "busybox", "sh", "-c", request]
        deadline = time.monotonic() + 60
        while " 200 OK" not in (got := subprocess.run(argv, capture_output=True, text=True, timeout=60)).stdout:
            assert time.monotonic() < deadline, got.stdout + got.stderr
            time.sleep(0.5)
        assert body(got.stdout) == PAGE

    def test_eth0_has_the_ip_and_mac_the_engine_reports(self, engine: Engine, web: str) -> None:
        address = engine.inspect(web, "{{.NetworkSettings.IPAddress}}/{{.NetworkSettings.IPPrefixLen}}")
        mac = engine.inspect(web, "{{.NetworkSettings.MacAddress}}")
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", address) and mac, (address, mac)
        link = engine("exec", web, "ip", "-o", "link", "show", "eth0").check().out
        addr = engine("exec", web, "ip", "-o", "-4", "addr", "show", "eth0").check().out
        assert f"link/ether {mac}" in link
        assert f"inet {address} " in addr
        # The host side reaches the container at that address, not only through the published port.
        assert host_get(engine, address.split("/")[0], 80) == PAGE

    def test_reaches_the_bridge_gateway(self, engine: Engine, web: str) -> None:
        gateway = engine.inspect(web, "{{.NetworkSettings.Gateway}}")
        assert engine.netns is not None
        bridge = subprocess.run(
            [*in_netns(engine.netns), "ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30
        ).stdout
        assert f"inet {gateway}/" in bridge, f"the gateway {gateway} is not the bridge's address:\n{bridge}"
        route = engine("exec", web, "ip", "route").check().out
        assert f"default via {gateway} dev eth0" in route
        ping = engine("exec", web, "ping", "-c", "3", "-W", "5", gateway, timeout=60)
        assert ping.code == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr

    def test_two_containers_on_the_bridge_reach_each_other(self, engine: Engine, web: str) -> None:
        peer = engine(*run_args(engine, "-d", engine.image, "sleep", "600")).check().out
        try:
            web_ip = engine.inspect(web, "{{.NetworkSettings.IPAddress}}")
            peer_ip = engine.inspect(peer, "{{.NetworkSettings.IPAddress}}")
            assert web_ip != peer_ip
            assert container_get(engine, peer, web_ip, 80) == PAGE
            ping = engine("exec", web, "ping", "-c", "3", "-W", "5", peer_ip, timeout=60)
            assert ping.code == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
        finally:
            rm(engine, peer)

    def test_reaches_out_through_the_engines_nat(self, engine: Engine, web: str, tmp_path: Path) -> None:
        """The outside has no route to the bridge's subnet: only the engine's
        masquerading (CNI's ipMasq, Docker's MASQUERADE rule) lets the answer back."""
        (tmp_path / "index.html").write_text("served-from-outside\n")
        argv = [*in_netns(Path("/run/netns") / outside(engine)), "busybox", "httpd", "-f", "-p", "8080"]
        server = subprocess.Popen([*argv, "-h", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert container_get(engine, web, OUTSIDE_IP, 8080) == "served-from-outside\n"
        finally:
            server.kill()
            server.wait(timeout=30)

    def test_a_network_connected_while_it_runs_reaches_it(self, engine: Engine, web: str) -> None:
        """``network connect`` of a second bridge network to the running container
        (a veth the engine adds to its namespace after start): the container shows
        it with the address and MAC ``inspect`` reports, and a container on that
        network reaches it there; after ``network disconnect`` the address is gone."""
        engine("network", "create", SECOND).check()
        peer = None
        try:
            engine("network", "connect", SECOND, web).check()
            settings = f'(index .NetworkSettings.Networks "{SECOND}")'
            address = engine.inspect(web, f"{{{{{settings}.IPAddress}}}}/{{{{{settings}.IPPrefixLen}}}}")
            mac = engine.inspect(web, f"{{{{{settings}.MacAddress}}}}")
            assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", address) and mac, (address, mac)

            def shown() -> bool:
                links = engine("exec", web, "ip", "-o", "link").stdout
                addrs = engine("exec", web, "ip", "-o", "-4", "addr").stdout
                return f"link/ether {mac}" in links and f"inet {address} " in addrs

            wait_until(shown, 60, f"{address} ({mac}) in the container")
            peer = engine(*run_args(engine, "-d", engine.image, "sleep", "600", network=SECOND)).check().out
            assert container_get(engine, peer, address.split("/")[0], 80) == PAGE
            engine("network", "disconnect", SECOND, web).check()
            wait_until(
                lambda: f"inet {address} " not in engine("exec", web, "ip", "-o", "-4", "addr").stdout,
                60,
                f"{address} to leave the container",
            )
        finally:
            if peer is not None:
                rm(engine, peer)
            engine("network", "disconnect", SECOND, web)
            engine("network", "rm", SECOND)


def test_dual_stack_network(engine: Engine, tmp_path: Path) -> None:
    """A user-made network with IPv6 (Podman picks a ULA subnet; Docker is given one): the
    container shows the IPv6 address ``inspect`` reports, the host side and another
    container reach its server over IPv6."""
    (tmp_path / "index.html").write_text(PAGE)
    subnet = ("--subnet", "10.77.0.0/24", "--subnet", V6_SUBNET) if isinstance(engine, Docker) else ()
    engine("network", "create", "--ipv6", *subnet, DUAL).check()
    cids: list[str] = []
    try:
        served = ("-v", f"{tmp_path}:/www:ro", engine.image, "httpd", "-f", "-p", "80", "-h", "/www")
        cids.append(engine(*run_args(engine, "-d", *served, network=DUAL)).check().out)
        settings = f'(index .NetworkSettings.Networks "{DUAL}")'
        template = f"{{{{{settings}.GlobalIPv6Address}}}}/{{{{{settings}.GlobalIPv6PrefixLen}}}}"
        address = engine.inspect(cids[0], template)
        assert ":" in address and not address.startswith("/"), address
        wait_until(
            lambda: f"inet6 {address} " in engine("exec", cids[0], "ip", "-o", "-6", "addr").stdout,
            60,
            f"{address} in the container",
        )
        v6 = address.split("/")[0]
        assert host_get(engine, v6, 80) == PAGE
        cids.append(engine(*run_args(engine, "-d", engine.image, "sleep", "600", network=DUAL)).check().out)
        assert container_get(engine, cids[1], v6, 80) == PAGE
    finally:
        if cids:
            rm(engine, *cids)
        engine("network", "rm", DUAL)


def test_host_network_is_refused_with_one_clear_line(engine: Engine, runtime: Runtime) -> None:
    """``--network host`` (no network namespace of its own in the spec): runc
    runs it on the engine host's links (here the test's namespace, with its
    ``uplink``); capsa cannot put a VM on the host's network and says so,
    through the engine, leaving nothing behind."""
    result = engine(*run_args(engine, "--rm", engine.image, "ip", "-o", "link", network="host"), timeout=120)
    if runtime.capsa:
        assert result.code != 0
        assert "host's network namespace cannot be shared" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    else:
        assert result.code == 0 and "uplink" in result.stdout, result.stdout + result.stderr
    assert engine("ps", "--all", "--quiet").check().out == ""
    words = ("conmon",) if isinstance(engine, Podman) else ("containerd-shim",)
    assert_nothing_left(runtime, engine.runtime_root, engine.needles, engine_words=words)


def test_nothing_left_after_the_container_stops(engine: Engine, runtime: Runtime) -> None:
    """While it runs, the container's namespace holds capsa's tap (under capsa).
    Once ``stop`` returns (both engines delete the runtime's container then),
    that namespace, held open here past the engine's own teardown, holds no
    tap and no ingress qdisc, and no runtime process is left; after ``rm``
    the engine left no namespace and (Podman's CNI) no address leased."""
    cid = engine(*run_args(engine, "-d", engine.image, "sleep", "600")).check().out
    try:
        path = netns_path(engine, cid)
        held = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        rm(engine, cid)
        raise
    try:
        # Podman's CNI host-local IPAM keeps a file per leased address, shared with the host's own podman.
        lease = CNI_LEASES / "podman" / engine.inspect(cid, "{{.NetworkSettings.IPAddress}}")
        assert not isinstance(engine, Podman) or lease.read_text().split()[0] == cid
        links = subprocess.run(["nsenter", f"--net={path}", "ip", "-o", "link"], capture_output=True, text=True)
        assert bool(OURS.search(links.stdout)) == runtime.capsa, links.stdout
        if runtime.capsa:  # the model configured is the one used: a passthru macvtap, else a tap
            device = "mvtap0_capsa@eth0:" if "macvtap" in engine.runtime.tag else "tap0_capsa:"
            assert f" {device} " in links.stdout, links.stdout
        # sleep as PID 1 ignores TERM: the engine KILLs it after a second.
        engine("stop", "--time", "1", cid, timeout=120).check()
        assert leftovers_in(f"/proc/{os.getpid()}/fd/{held}") == []
        words = ("conmon",) if isinstance(engine, Podman) else ("containerd-shim",)
        assert_nothing_left(runtime, engine.runtime_root, engine.needles, engine_words=words)
    finally:
        os.close(held)
        rm(engine, cid)
    if mounts_under([Path(path)]):
        # The engine kept the namespace (its path is still an nsfs mount; Docker
        # unlinks the emptied file later): nothing of ours may be in it either.
        found = leftovers_in(path)
        unmount_under([Path(path)])
        pytest.fail(f"the engine left its network namespace {path} (holding {found or 'nothing of ours'})")
    # The engine released the address (it ran its network teardown although the container was in a VM).
    assert not (lease.exists() and lease.read_text().split()[0] == cid), f"{lease} still leased to {cid}"
