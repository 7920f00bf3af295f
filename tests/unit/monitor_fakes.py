"""A fake host for capsa-monitor's tests: a /proc, state roots, socket directories and bundles in a directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from capsa.monitor.collector import Settings
from capsa.protocols import agent_pb2
from capsa.runtime.agent_client import SERVICE as AGENT_SERVICE
from capsa.runtime.state import ContainerState, StateStore
from capsa.ttrpc.errors import Code, StatusError
from capsa.ttrpc.server import Context, Method, Server, unary_method

BOOT_TIME = 1_700_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class FakeHost:
    def __init__(self, base: Path, socket_root: Path | None = None) -> None:
        self.base = base
        self.proc = base / "proc"
        self.proc.mkdir(parents=True)
        (self.proc / "stat").write_text(f"cpu  1 2 3 4\nbtime {BOOT_TIME}\nprocesses 1\n")
        # Short, when real sockets go there: a unix socket path holds at most 107 bytes.
        self.socket_root = socket_root or base / "vm"
        self.root = base / "root"
        self.containerd = base / "containerd"
        self.process(1, "systemd", ppid=0)

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "roots": (self.root,),
            "default_roots": False,
            "socket_root": self.socket_root,
            "proc": self.proc,
            "containerd_runc_root": self.base / "no-containerd",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def process(
        self,
        pid: int,
        comm: str,
        *,
        ppid: int = 1,
        utime: int = 0,
        stime: int = 0,
        start: int = 1000,
        state: str = "S",
        argv: Sequence[str] = (),
        rss_kb: int = 0,
        pss_kb: int = 0,
        cwd: Path | None = None,
    ) -> None:
        """A process as proc(5) shows it: stat (fields 1-22 and a few more), smaps_rollup, cmdline, cwd."""
        directory = self.proc / str(pid)
        directory.mkdir()
        fields = [state, ppid, pid, pid, 0, -1, 4194560, 10, 0, 0, 0, utime, stime, 0, 0, 20, 0, 1, 0, start, 1000, 10]
        (directory / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n")
        (directory / "smaps_rollup").write_text(
            "55d0e0a00000-7ffd5e1f6000 ---p 00000000 00:00 0                          [rollup]\n"
            f"Rss:             {rss_kb} kB\nPss:             {pss_kb} kB\nPss_Anon:          0 kB\n"
        )
        (directory / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
        if cwd is not None:
            os.symlink(cwd, directory / "cwd")

    def container(
        self,
        container_id: str,
        *,
        shim: int,
        proxy: int,
        hypervisor: int = 0,
        status: str = "running",
        annotations: Mapping[str, str] | None = None,
        root: Path | None = None,
        shim_start: int = 1000,
        proxy_start: int = 1000,
    ) -> Path:
        """A runc-CLI container: its state directory, socket directory (with the link back) and state.json."""
        store = StateStore(root or self.root, self.socket_root)
        state_dir = store.claim(container_id)
        store.save(
            ContainerState(
                id=container_id,
                bundle=str(self.base / "bundle"),
                rootfs=str(self.base / "bundle" / "rootfs"),
                status=status,
                pid=shim,
                pid_start=shim_start,
                proxy_pid=proxy,
                proxy_start=proxy_start,
                hypervisor_pid=hypervisor,
                created="2024-05-01T12:00:00+00:00",
                annotations=dict(annotations or {}),
            )
        )
        return state_dir

    def socket_dir(self, container_id: str, root: Path | None = None) -> Path:
        return StateStore(root or self.root, self.socket_root).socket_dir(container_id)

    def bundle(self, namespace: str, container_id: str, address: str, annotations: Mapping[str, str]) -> Path:
        """A containerd bundle (io.containerd.runtime.v2.task/<namespace>/<id>) served by the shim at ``address``."""
        bundle = self.containerd / namespace / container_id
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": dict(annotations)}))
        (bundle / "address").write_text(address)
        return bundle


def shim_v2_argv(namespace: str, sandbox_id: str, socket_path: str) -> list[str]:
    """What containerd-shim-capsa-v2's start gives its server (shim/v2/main.py)."""
    return [
        "/opt/capsa/venv/bin/python",
        "-m",
        "capsa.shim.v2",
        "-namespace",
        namespace,
        "-address",
        "/run/containerd/containerd.sock.ttrpc",
        "-id",
        sandbox_id,
        "-socket",
        socket_path,
        "--ready-fd",
        "3",
    ]


# -- sockets: a fake agent served from a thread, a sick proxy --------------------------


@contextlib.contextmanager
def serving(make: Callable[[], Server], path: Path) -> Iterator[None]:
    """Serve ``make()`` on ``path`` from a thread with its own loop, until the block ends."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def main() -> None:
        nonlocal stop
        stop = loop.create_future()
        listener = await make().serve_unix(str(path))
        ready.set()
        try:
            await stop
        finally:
            listener.close()
            await listener.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def silent_listener(path: Path) -> Iterator[None]:
    """A socket that accepts connections and never answers: a sick proxy."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not done.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def fake_agent(missing: frozenset[str] = frozenset()) -> Server:
    async def check(request: agent_pb2.CheckRequest, context: Context) -> agent_pb2.CheckResponse:
        return agent_pb2.CheckResponse(status=agent_pb2.CheckResponse.SERVING)

    async def details(request: agent_pb2.GuestDetailsRequest, context: Context) -> agent_pb2.GuestDetailsResponse:
        return agent_pb2.GuestDetailsResponse(
            kernel_release="6.1.0-capsa",
            agent_version="0.1.0",
            crun_version="1.8.1",
            online_cpus=2,
            mem_total_bytes=480 << 20,
            kernel_boot_seconds=0.3,
            agent_start_seconds=0.6,
        )

    async def stats(request: agent_pb2.StatsContainerRequest, context: Context) -> agent_pb2.StatsContainerResponse:
        if request.container_id in missing:
            raise StatusError(Code.NOT_FOUND, f"container {request.container_id} does not exist")
        return agent_pb2.StatsContainerResponse(
            cpu_usage_usec=2_500_000, memory_usage_bytes=7 << 20, memory_limit_bytes=0, pids_current=2
        )

    server = Server()
    methods: dict[str, Method] = {
        "Check": unary_method(agent_pb2.CheckRequest, check),
        "GetGuestDetails": unary_method(agent_pb2.GuestDetailsRequest, details),
        "StatsContainer": unary_method(agent_pb2.StatsContainerRequest, stats),
    }
    server.register_service(AGENT_SERVICE, methods)
    return server
