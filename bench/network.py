#!/usr/bin/env python3
"""Network: TCP throughput between the host side of a bridge and a container on it, capsa against runc,
side by side; and what a network namespace adds to a container's create-to-running time.

The benchmark builds its own wire, in network namespaces it makes and
deletes (the host's own namespace gets no address, link or rule):

- ``H``, the "host side": a bridge ``br0`` with 10.251.0.1/24, as an
  engine's ``podman0``/``docker0`` would be, and the benchmark's end of
  every TCP connection (its sockets are made in a thread that entered
  ``H``);
- one namespace per runtime, as an engine hands a container: a veth
  ``eth0`` (10.251.0.2/24 for capsa, .3 for runc, default route via the
  bridge) whose peer is a port of ``br0``.

Both containers run the same busybox servers: port 5001 sends ``--size-mib``
MiB of zeros to whoever connects (``dd | nc``: container to host), port
5002 reads what it is sent until EOF and closes (host to container).  The
host side times each transfer from ``connect`` to the peer's close and
checks the byte count.  A third server echoes: the host side times
200 one-byte request/response round trips on one connection (TCP_NODELAY)
and takes their median (round trip latency, lower is better).  Rounds alternate capsa and runc, so drift in the
shared host's load hits both; the report gives the median MiB/s of
``--rounds`` rounds and the ratio capsa/runc.  Under TCG (these hosts)
the guest's CPU, and so its TCP stack and virtio-net driver, is emulated,
and QEMU's tap backend has no vhost-net.

Then the setup cost: ``create`` + ``start`` (until the container runs) of
``sleep`` with the spec naming a configured namespace (capsa: read the
namespace, tap + tc mirroring, NIC hot-plug, the agent's UpdateInterface
and UpdateRoutes) and with a new empty one (the default spec), for both
runtimes; medians.  ``--macvtap`` adds capsa with ``[network] model =
"macvtap"`` (a passthru macvtap on the veth instead of a tap and tc
mirroring) as a third container on the bridge.

Run as root after scripts/setup.sh, with capsa's Python:
/opt/capsa/venv/bin/python bench/network.py [--rounds N] [--size-mib M] [--setup-rounds N] [--macvtap]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from capsa.cli.spec import default_spec
from capsa.config import DEFAULT_CONFIG_PATH
from capsa.network.netns import open_netns, run_in_netns

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "dd", "nc", "cat", "sleep")
SUBNET = "10.251.0"
HOST_IP = f"{SUBNET}.1"
SEND_PORT, RECEIVE_PORT, ECHO_PORT = 5001, 5002, 5003
# Port 5001 streams $MIB MiB to each client; port 5002 swallows what it gets, then closes;
# port 5003 echoes.
SERVERS = (
    f"nc -ll -p {SEND_PORT} -e sh -c 'dd if=/dev/zero bs=1M count=$MIB 2>/dev/null' & "
    f"nc -ll -p {RECEIVE_PORT} -e sh -c 'cat > /dev/null' & "
    f"nc -ll -p {ECHO_PORT} -e cat & wait"
)
ECHOES = 200  # round trips per round
CHUNK = 1 << 20


@dataclass
class Side:
    """One runtime's container on the bridge, and its figures."""

    runtime: str  # "capsa" or "runc"
    netns: str
    ip: str
    to_host: list[float] = field(default_factory=list)  # MiB/s per round
    from_host: list[float] = field(default_factory=list)
    round_trip: list[float] = field(default_factory=list)  # median microseconds per round
    setup_netns: list[float] = field(default_factory=list)  # create + start seconds
    setup_empty: list[float] = field(default_factory=list)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def wire(tag: str, runtimes: tuple[str, ...]) -> Iterator[tuple[str, list[Side]]]:
    """The bridge namespace and one configured container namespace per runtime; all deleted afterwards."""
    host = f"capsa-bn-{tag}-h"
    made = [host]
    try:
        ip("netns", "add", host)
        ip("-n", host, "link", "set", "lo", "up")
        ip("-n", host, "link", "add", "br0", "type", "bridge")
        ip("-n", host, "addr", "add", f"{HOST_IP}/24", "dev", "br0")
        ip("-n", host, "link", "set", "br0", "up")
        sides = []
        for index, runtime in enumerate(runtimes):
            name = f"capsa-bn-{tag}-{runtime}"
            made.append(name)
            address = f"{SUBNET}.{2 + index}"
            ip("netns", "add", name)
            ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{index}", "netns", host)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "route", "add", "default", "via", HOST_IP)
            ip("-n", host, "link", "set", f"v{index}", "master", "br0", "up")
            sides.append(Side(runtime, f"/run/netns/{name}", address))
        yield f"/run/netns/{host}", sides
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def make_bundle(work: Path, name: str, args: list[str], netns: str | None, env: dict[str, str]) -> Path:
    bundle = work / name
    if not (bundle / "rootfs").exists():
        rootfs = bundle / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in APPLETS:
            os.symlink("busybox", rootfs / "bin" / applet)
        for directory in ("proc", "sys", "dev", "tmp", "etc"):
            (rootfs / directory).mkdir()
    spec = default_spec(args, terminal=False)
    spec["process"]["env"] += [f"{key}={value}" for key, value in env.items()]
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] == "network" and netns is not None:
            namespace["path"] = netns
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


class Runtime:
    """``capsa`` (this Python's, with ``config`` when given) or ``runc``, each with a state root in the work dir."""

    def __init__(self, name: str, work: Path, config: Path | None = None) -> None:
        self.name = name
        root = work / f"{name}-root"
        self.argv = [sys.executable, "-m", "capsa"] if name.startswith("capsa") else ["runc"]
        self.argv += ["--root", str(root), *(["--config", str(config)] if config is not None else [])]
        self.log = work / f"{name}.log"

    def __call__(self, *args: str, timeout: float = 120) -> None:
        # stdio to a file: a detached container keeps what it was given.
        with self.log.open("ab") as log:
            done = subprocess.run(
                [*self.argv, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=timeout
            )
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-800:]
            raise RuntimeError(f"{self.name} {' '.join(args)} exited {done.returncode}: {tail}")

    def delete(self, cid: str) -> None:
        subprocess.run([*self.argv, "delete", "--force", cid], capture_output=True, timeout=120)


def config_with_model(work: Path, model: str) -> Path:
    """The configuration in force with ``[network] model`` replaced, as a file in the work dir."""
    source = Path(os.environ.get("CAPSA_CONFIG", DEFAULT_CONFIG_PATH))
    kept, skipping = [], False
    for line in source.read_text().splitlines() if source.exists() else []:
        if line.strip().startswith("["):
            skipping = line.strip() == "[network]"
        if not skipping:
            kept.append(line)
    path = work / f"configuration-{model}.toml"
    path.write_text("\n".join([*kept, "[network]", f'model = "{model}"', ""]))
    return path


def host_socket(host_fd: int) -> socket.socket:
    """A TCP socket of the bridge's namespace (a socket stays in the namespace it was made in)."""
    return run_in_netns(host_fd, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "make a socket")


def wait_listening(host_fd: int, address: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with host_socket(host_fd) as sock:
            sock.settimeout(5)
            try:
                sock.connect((address, RECEIVE_PORT))
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(CHUNK):
                    pass
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.3)


def receive(host_fd: int, address: str, size: int) -> float:
    """Container to host: read the stream until the container closes; seconds from connect."""
    with host_socket(host_fd) as sock:
        sock.settimeout(120)
        began = time.perf_counter()
        sock.connect((address, SEND_PORT))
        got = 0
        while chunk := sock.recv(CHUNK):
            got += len(chunk)
        took = time.perf_counter() - began
    if got != size:
        raise RuntimeError(f"received {got} bytes from {address}, expected {size}")
    return took


def send(host_fd: int, address: str, size: int) -> float:
    """Host to container: send ``size`` bytes, half-close, wait for the container to close; seconds."""
    data = bytes(CHUNK)
    with host_socket(host_fd) as sock:
        sock.settimeout(120)
        began = time.perf_counter()
        sock.connect((address, RECEIVE_PORT))
        for _ in range(size // CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass
        return time.perf_counter() - began


def echo(host_fd: int, address: str, count: int) -> float:
    """Request/response latency: ``count`` one-byte round trips on one TCP connection
    (``TCP_NODELAY``); the median in microseconds."""
    times = []
    with host_socket(host_fd) as sock:
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((address, ECHO_PORT))
        for _ in range(count):
            began = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError(f"the echo server at {address} did not echo")
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def throughput(
    sides: list[Side], runtimes: dict[str, Runtime], host_fd: int, work: Path, args: argparse.Namespace
) -> None:
    size = args.size_mib << 20
    for side in sides:
        bundle = make_bundle(
            work, f"{side.runtime}-server", ["sh", "-c", SERVERS], side.netns, {"MIB": str(args.size_mib)}
        )
        runtimes[side.runtime]("run", "--detach", "--bundle", str(bundle), f"bn-{side.runtime}")
    try:
        for side in sides:
            wait_listening(host_fd, side.ip)
        for round_ in range(args.rounds):
            for side in sides:
                side.to_host.append(args.size_mib / receive(host_fd, side.ip, size))
                side.from_host.append(args.size_mib / send(host_fd, side.ip, size))
                side.round_trip.append(echo(host_fd, side.ip, ECHOES))
                print(
                    f"round {round_ + 1}: {side.runtime}: container->host {side.to_host[-1]:.1f} MiB/s, "
                    f"host->container {side.from_host[-1]:.1f} MiB/s, round trip {side.round_trip[-1]:.0f} us",
                    file=sys.stderr,
                )
    finally:
        for side in sides:
            runtimes[side.runtime].delete(f"bn-{side.runtime}")


def setup_cost(sides: list[Side], runtimes: dict[str, Runtime], work: Path, rounds: int) -> None:
    serial = 0
    for round_ in range(rounds):
        for side in sides:
            runtime = runtimes[side.runtime]
            for netns, figures in ((side.netns, side.setup_netns), (None, side.setup_empty)):
                serial += 1
                cid = f"bs{serial}"
                bundle = make_bundle(work, f"{side.runtime}-sleep", ["sleep", "600"], netns, {})
                try:
                    began = time.perf_counter()
                    runtime("create", "--bundle", str(bundle), cid)
                    runtime("start", cid)
                    figures.append(time.perf_counter() - began)
                finally:
                    runtime.delete(cid)
            print(
                f"round {round_ + 1}: {side.runtime}: create+start with the bridge's namespace "
                f"{side.setup_netns[-1]:.3f} s, with an empty one {side.setup_empty[-1]:.3f} s",
                file=sys.stderr,
            )


def spread(values: list[float], unit: str, digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(sides: list[Side], args: argparse.Namespace) -> None:
    runc = next(side for side in sides if side.runtime == "runc")
    print(f"TCP, {args.size_mib} MiB per transfer, bridge in a namespace of its own; median (min-max) of {args.rounds}")
    print(f"{'direction':<18} {'runtime':<14} {'throughput':>28} {'x runc':>7}")
    for label, attr in (("container -> host", "to_host"), ("host -> container", "from_host")):
        base = statistics.median(getattr(runc, attr))
        for side in sides:
            figures = getattr(side, attr)
            ratio = statistics.median(figures) / base
            print(f"{label:<18} {side.runtime:<14} {spread(figures, 'MiB/s', 1):>28} {ratio:>7.3f}")
    base = statistics.median(runc.round_trip)
    for side in sides:
        ratio = statistics.median(side.round_trip) / base
        print(f"{'1-byte round trip':<18} {side.runtime:<14} {spread(side.round_trip, 'us', 0):>28} {ratio:>7.2f}")
    if args.setup_rounds:
        print(f"create + start of `sleep`, median (min-max) of {args.setup_rounds}")
        print(f"{'runtime':<14} {'bridge namespace':>24} {'empty namespace':>24} {'difference':>10}")
        for side in sides:
            extra = statistics.median(side.setup_netns) - statistics.median(side.setup_empty)
            print(
                f"{side.runtime:<14} {spread(side.setup_netns, 's', 3):>24} "
                f"{spread(side.setup_empty, 's', 3):>24} {extra:>+9.3f}s"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--setup-rounds", type=int, default=5, help="rounds of the setup-cost part (0: skip it)")
    parser.add_argument("--macvtap", action="store_true", help='also capsa with [network] model = "macvtap"')
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces, QEMU, runc)")
    if shutil.which("runc") is None:
        raise SystemExit("runc is not installed: run scripts/setup.sh")
    work = Path(tempfile.mkdtemp(prefix="capsa-bn-"))
    try:
        runtimes = {name: Runtime(name, work) for name in ("capsa", "runc")}
        if args.macvtap:
            runtimes["capsa-macvtap"] = Runtime("capsa-macvtap", work, config_with_model(work, "macvtap"))
        names = tuple(runtimes)
        with wire(f"{os.getpid()}", names) as (host_path, sides):
            host_fd = open_netns(host_path)
            try:
                throughput(sides, runtimes, host_fd, work, args)
                setup_cost(sides, runtimes, work, args.setup_rounds)
            finally:
                os.close(host_fd)
        report(sides, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
