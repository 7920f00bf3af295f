#!/usr/bin/env python3
"""What the agent policy costs per request, against what the agent pays for every request anyway.

The agent checks each request against its policy before the handler runs
(capsa/agent/policy.py).  This measures that check, in-process, for three
policies: none (the built-in allow-everything), the shipped ``read-only``
example, and a worst case of 50 conditional rules that all miss before the
default decides.  The requests are a CreateContainer carrying a realistic
spec (Docker-shaped: 13 mounts, 14 capabilities) and a ReadStdout (the most
frequent request: one per chunk of a container's output).

Every figure is a ratio against the baseline measured side by side in the
same run: one ttrpc round trip of ``Check`` (the cheapest request) between
our client and server over a unix socket in this process, the least any
request costs before a policy sees it.  The host's CPU stands in for the
guest's (under TCG the guest runs every instruction several times slower,
the check and the round trip alike).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from capsa.agent.policy import ALLOW_ALL, Enforcer, parse
from capsa.cli.spec import default_spec
from capsa.protocols import agent_pb2 as pb
from capsa.ttrpc.client import Client
from capsa.ttrpc.server import Context, Server, unary_method

REPO = Path(__file__).parents[1]
ROUNDS = 7
CALLS = 2000


def docker_like_spec() -> bytes:
    spec = default_spec(["nginx", "-g", "daemon off;"], terminal=False)
    spec["root"]["readonly"] = True
    for name in ("hosts", "hostname", "resolv.conf"):
        spec["mounts"].append(
            {
                "destination": f"/etc/{name}",
                "type": "bind",
                "source": f"/run/capsa/shared/c1/{name}",
                "options": ["rbind", "rprivate"],
            }
        )
    spec["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "/run/capsa/volumes/v1", "options": ["rbind", "ro"]}
    )
    spec["annotations"] = {"io.kubernetes.cri.image-name": "docker.io/library/nginx:1.25"}
    return json.dumps(spec).encode()


def worst_case() -> str:
    rules = "".join(
        f'[[rule]]\nname = "r{n}"\nrpc = "*"\naction = "deny"\nwhen = {{ container_id = "no-such-{n}-*" }}\n'
        for n in range(50)
    )
    return "version = 1\n" + rules.replace('rpc = "*"', 'rpc = ["CreateContainer", "ReadStdout"]')


def per_call(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter() - started) / CALLS)
    return best


def round_trip() -> float:
    """Seconds per Check round trip, best of the rounds."""

    async def check(request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    async def measure() -> float:
        server = Server()
        server.register_service("capsa.agent.v1.AgentService", {"Check": unary_method(pb.CheckRequest, check)})
        with tempfile.TemporaryDirectory() as work:
            path = f"{work}/agent.sock"
            listening = await server.serve_unix(path)
            client = await Client.connect_unix(path)
            best = float("inf")
            try:
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    for _ in range(CALLS // 4):
                        await client.unary(
                            "capsa.agent.v1.AgentService", "Check", pb.CheckRequest(), pb.CheckResponse, timeout=5
                        )
                    best = min(best, (time.perf_counter() - started) / (CALLS // 4))
            finally:
                await client.aclose()
                listening.close()
            return best

    return asyncio.run(measure())


def main() -> None:
    create = pb.CreateContainerRequest(container_id="c1", oci_spec_json=docker_like_spec())
    read = pb.ReadStreamRequest(container_id="c1", len=65536)
    policies = {
        "none (allow everything)": ALLOW_ALL,
        "read-only example": parse((REPO / "config" / "policies" / "read-only.toml").read_bytes()),
        "50 conditional rules, all missing": parse(worst_case()),
    }
    baseline = round_trip()
    print(f"baseline: one ttrpc Check round trip = {baseline * 1e6:.1f} µs")
    print(f"{'request':<18} {'policy':<36} {'check µs':>9} {'x round trip':>13}")
    for method, request in (("CreateContainer", create), ("ReadStdout", read)):
        for name, policy in policies.items():
            enforcer = Enforcer(policy)
            check = per_call(lambda: enforcer.check(method, request))  # noqa: B023  (called at once)
            print(f"{method:<18} {name:<36} {check * 1e6:9.1f} {check / baseline:13.3f}")


if __name__ == "__main__":
    main()
