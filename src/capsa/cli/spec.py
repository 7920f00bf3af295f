"""``capsa spec``: write a starter config.json, as ``runc spec`` does."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from capsa.cli.context import Context
from capsa.errors import CapsaError, InvalidArgument

OCI_VERSION = "1.0.2"
_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="create a new specification file (config.json)")
    p.add_argument("--bundle", "-b", default=".", help="directory to write config.json in")
    p.add_argument("--rootless", action="store_true", help="a spec for an unprivileged user")
    p.set_defaults(execute=execute)


def default_spec(args: list[str] | None = None, terminal: bool = True) -> dict[str, Any]:
    """The spec runc writes, with our hostname: a shell in ./rootfs, locked down."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args or ["sh"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
            ],
            "cwd": "/",
            "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "capsa",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


def rootless(spec: dict[str, Any]) -> dict[str, Any]:
    """runc spec --rootless: a user namespace mapping the caller to root."""
    linux = spec["linux"]
    linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"] + [{"type": "user"}]
    linux["uidMappings"] = [{"containerID": 0, "hostID": os.getuid(), "size": 1}]
    linux["gidMappings"] = [{"containerID": 0, "hostID": os.getgid(), "size": 1}]
    linux.pop("resources", None)
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/sys/fs/cgroup"]
    return spec


def execute(args: argparse.Namespace, ctx: Context) -> int:
    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise InvalidArgument(f"bundle {bundle}: no such directory")
    target = bundle / "config.json"
    spec = default_spec()
    if args.rootless:
        spec = rootless(spec)
    try:
        with open(target, "x") as f:
            json.dump(spec, f, indent="\t")
            f.write("\n")
    except FileExistsError:
        raise CapsaError(f"{target} exists: remove it first") from None
    except OSError as exc:
        raise CapsaError(f"{target}: {exc.strerror}") from exc
    return 0
