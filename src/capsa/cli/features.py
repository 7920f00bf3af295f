"""``capsa features``: what capsa implements, as ``runc features`` prints it.

The document follows runtime-spec ``features.md`` and ``features-linux.md``
(the shape of runc 1.1's output): the OCI versions accepted, the hook stages,
the mount options, and under ``linux`` the namespaces, capabilities, cgroup
managers, seccomp vocabulary and LSMs.  Engines (containerd, CRI-O, podman)
read it to decide what they may put in a spec.

Every fact is about the whole of capsa, not about the host: the container is
made by crun 1.8.1 (Debian 12) inside the guest, on capsa's own guest kernel.
So the namespaces are those crun knows and the guest kernel is built with
(``guest/kernel/capsa.config``: UTS, IPC, PID, NET, TIME, USER namespaces and
cgroups); crun 1.8 has no ``features`` verb of its own, so its lists are
taken from its source (``mount_flags.perf``, ``seccomp.c``).  The guest
mounts only cgroup v2 and runs no systemd, and the guest kernel has no LSM:
the agent drops AppArmor and SELinux labels, so both are reported disabled.
Hooks run on the host (``io.capsa.hooks``), in the runtime's namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from capsa import __version__
from capsa.cli.context import Context
from capsa.cli.spec import OCI_VERSION
from capsa.errors import CapsaError
from capsa.runtime.hooks import STAGES
from capsa.runtime.schema import CAPABILITIES

OCI_VERSION_MIN = "1.0.0"

#: crun 1.8.1's mount flag table (``src/libcrun/mount_flags.perf``); ``idmap``
#: and ``copy-symlink`` came later.
MOUNT_OPTIONS = (
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rasync",
    "ratime",
    "rbind",
    "rdev",
    "rdiratime",
    "rdirsync",
    "relatime",
    "remount",
    "rexec",
    "rmand",
    "rnoatime",
    "rnodev",
    "rnodiratime",
    "rnoexec",
    "rnomand",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "ro",
    "rprivate",
    "rrelatime",
    "rro",
    "rrw",
    "rshared",
    "rslave",
    "rstrictatime",
    "rsuid",
    "rsync",
    "runbindable",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "tmpcopyup",
    "unbindable",
)

#: crun 1.8's namespace table, every one of them in the guest kernel's config.
NAMESPACES = ("cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts")

#: crun 1.8's ``get_seccomp_action`` (libseccomp 2.5 has SCMP_ACT_LOG and _NOTIFY).
SECCOMP_ACTIONS = (
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_TRAP",
)

SECCOMP_OPERATORS = (
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_LE",
    "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
)

#: crun passes ``SCMP_ARCH_<name>`` to libseccomp's ``seccomp_arch_resolve_name``;
#: these are the names libseccomp 2.5.4 resolves.
SECCOMP_ARCHS = (
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
)


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="show the implemented features (JSON)")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    print(json.dumps(features(host_facts(ctx)), indent=4))
    return 0


def features(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The features document; ``annotations`` adds facts about this host's VM parts."""
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION,
        "hooks": list(STAGES),
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {
            "namespaces": list(NAMESPACES),
            "capabilities": list(CAPABILITIES),
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {
                "enabled": True,
                "actions": list(SECCOMP_ACTIONS),
                "operators": list(SECCOMP_OPERATORS),
                "archs": list(SECCOMP_ARCHS),
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.capsa.version": __version__,
            "io.capsa.hooks": "host",
            "io.capsa.guest.runtime": "crun",
            **(annotations or {}),
        },
    }


def host_facts(ctx: Context) -> dict[str, str]:
    """QEMU's version and the guest kernel's release, when the configuration names them.

    ``features`` must answer even on a host where capsa is not set up yet,
    so a missing or unreadable part is left out rather than reported.
    """
    try:
        hv = ctx.config.hypervisor
    except CapsaError:
        return {}
    facts: dict[str, str] = {}
    qemu = qemu_version(hv.path)
    if qemu:
        facts["io.capsa.hypervisor.qemu.version"] = qemu
    release = kernel_release(hv.kernel)
    if release:
        facts["io.capsa.guest.kernel.release"] = release
    return facts


def qemu_version(binary: Path) -> str | None:
    """``QEMU emulator version 7.2.x (Debian ...)`` -> ``7.2.x (Debian ...)``."""
    if not os.access(binary, os.X_OK):
        return None
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.splitlines()[0] if out.stdout else ""
    prefix = "QEMU emulator version "
    if not first.startswith(prefix):
        return None
    return first.removeprefix(prefix).strip() or None


def kernel_release(kernel: Path) -> str | None:
    """The release the kernel builder recorded next to the guest kernel (its ``manifest.json``)."""
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((kernel.resolve().parent / "manifest.json").read_text())
        release = manifest.get("kernel_release") if isinstance(manifest, dict) else None
        if isinstance(release, str) and release:
            return release
    return None
