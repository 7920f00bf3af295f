"""``capsa env``: the settings capsa would use, as ``kata-runtime env`` shows them.

Text by default (``key = value``, one per line), or a JSON object with
``--json`` whose keys include ``kernel``, ``initrd`` or ``image``,
``hypervisor_path``, ``machine_type`` and ``accelerator``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from capsa import __version__
from capsa.cli.context import Context
from capsa.hypervisor.accel import resolve_accelerator
from capsa.runtime.confinement import measures
from capsa.runtime.sandbox import VHOST_VSOCK, choose_channel, kernel_cmdline


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="show the settings capsa would use")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(execute=execute)


def environment(ctx: Context) -> dict[str, Any]:
    config = ctx.config
    hv = config.hypervisor
    verdict = resolve_accelerator(config)
    channel = choose_channel(config, VHOST_VSOCK.exists())
    env: dict[str, Any] = {
        "version": __version__,
        "config_file": str(config.source) if config.source else None,
        "root": str(ctx.root),
        "hypervisor_path": str(hv.path),
        "machine_type": hv.machine_type,
        "accelerator": verdict.accelerator,
        "accelerator_reason": verdict.reason,
        "kernel": str(hv.kernel),
    }
    if hv.image is not None:
        env["image"] = str(hv.image)
    else:
        env["initrd"] = str(hv.initrd)
    env.update(
        {
            "kernel_params": " ".join(kernel_cmdline(config, channel, debug=False)),
            "default_vcpus": hv.default_vcpus,
            "default_memory_mib": hv.default_memory_mib,
            "shared_fs": config.shared_fs.kind,
            "virtiofsd_path": str(config.shared_fs.virtiofsd_path),
            "agent_channel": channel,
            "sandbox_uid_range": [
                config.security.sandbox_id_base,
                config.security.sandbox_id_base + config.security.sandbox_id_count - 1,
            ],
            "confinement": {m.name: {"on": m.on, "detail": m.detail} for m in measures(config)},
        }
    )
    return env


def execute(args: argparse.Namespace, ctx: Context) -> int:
    env = environment(ctx)
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        for key, value in env.items():
            print(f"{key} = {json.dumps(value)}")
    return 0
