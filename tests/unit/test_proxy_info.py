"""capsa-proxy's Info over a real unix socket: answered from what the proxy started, with no guest round trip.

`capsa create` asks Info every time and records the PIDs; before, the proxy
asked the agent GetGuestDetails (``crun --version`` in the emulated guest)
for fields nobody read.  Here there is no VM and no agent at all: Info must
still answer.  No VM, no root.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from capsa.config import parse_config
from capsa.proxy.launch import SOCKET_NAME, ProxyClient
from capsa.proxy.proxy import Proxy
from capsa.proxy.service import build_server


def info_from(proxy: Proxy, run_dir: Path) -> tuple[int, int, int]:
    async def scenario() -> tuple[int, int, int]:
        listener = await build_server(proxy).serve_unix(str(run_dir / SOCKET_NAME))
        try:
            client = await ProxyClient.connect(run_dir, request_timeout=5.0)
            try:
                info = await client.info()
            finally:
                await client.aclose()
        finally:
            listener.close()
            await listener.wait_closed()
        return info.proxy_pid, info.hypervisor_pid, info.virtiofsd_pid

    return asyncio.run(asyncio.wait_for(scenario(), 10))


def test_info_needs_no_agent(tmp_path: Path) -> None:
    proxy = Proxy(parse_config({}), "c1", tmp_path)
    assert info_from(proxy, tmp_path) == (os.getpid(), 0, 0)


def test_info_reports_the_processes_the_proxy_started(tmp_path: Path) -> None:
    proxy = Proxy(parse_config({}), "c1", tmp_path)
    # Stand-ins for the started QEMU and virtiofsd: only their PIDs are read.
    proxy.sandbox.hypervisor = SimpleNamespace(vmm_pid=4242)  # type: ignore[assignment]
    proxy.sandbox.virtiofsd = SimpleNamespace(pid=4343)  # type: ignore[assignment]
    assert info_from(proxy, tmp_path) == (os.getpid(), 4242, 4343)
