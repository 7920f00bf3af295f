"""``capsa check``: can this host run capsa, and with which accelerator?

Each finding is one line: ``ok``, ``warn`` or ``FAIL``, what was looked at,
and why it matters.  Exit status 0 when capsa can run containers here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from capsa.cli.context import Context
from capsa.config import HypervisorConfig
from capsa.errors import CapsaError
from capsa.hypervisor.accel import resolve_accelerator
from capsa.hypervisor.guest_kernel import describe_kaslr
from capsa.runtime.confinement import measures
from capsa.runtime.hostcgroup import describe_host
from capsa.runtime.sandbox import VHOST_VSOCK, renews_agent


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn", "FAIL"
    text: str


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="check whether this host can run capsa")
    p.set_defaults(execute=execute)


def template_exposure(hv: HypervisorConfig, accelerator: str) -> Finding:
    """What template clones share with their template, its bound, and the settings that remove it; pure."""
    bound = (
        f"at most {hv.template_max_clones or 'unbounded'} clones, "
        f"{f'{hv.template_max_age:g} s' if hv.template_max_age else 'no age bound'} per template"
    )
    shared = "the guest kernel's address (KASLR) and its stack canaries"
    renewed = renews_agent(hv.template_renew_agent, accelerator)
    if not renewed:
        shared += ", and the agent's process (hash seed, stack canary, PRNG states)"
    text = f'template boot: clones share {shared} with their template ({bound}); boot = "cold" removes this'
    if not renewed:
        text += '; template_renew_agent = "always" renews the agent (about 1 s per sandbox under TCG)'
    return Finding("ok" if renewed else "warn", text)


def findings(ctx: Context) -> list[Finding]:
    config = ctx.config
    hv = config.hypervisor
    out: list[Finding] = []
    add = out.append
    add(Finding("ok", f"configuration: {config.source or 'built-in defaults (no configuration file)'}"))
    if os.geteuid() == 0:
        add(Finding("ok", "running as root: capsa can create VMs, taps and mounts"))
    else:
        add(Finding("FAIL", "not running as root: capsa needs root to start VMs and share filesystems"))
    qemu_ok = hv.path.exists() and os.access(hv.path, os.X_OK)
    if qemu_ok:
        version = subprocess.run([str(hv.path), "--version"], capture_output=True, text=True, check=False)
        first = (version.stdout.splitlines() or ["unknown version"])[0]
        add(Finding("ok", f"hypervisor {hv.path}: {first}"))
    else:
        add(Finding("FAIL", f"hypervisor {hv.path} is missing: install qemu-system-x86"))
    for what, path in (("guest kernel", hv.kernel), ("guest image", hv.image or hv.initrd)):
        if path is not None and path.exists():
            add(Finding("ok", f"{what} {path}"))
        else:
            add(Finding("FAIL", f"{what} {path} is missing: build it (see README)"))
    if hv.kernel.exists():
        problem = describe_kaslr(hv.kernel, hv.kernel_params)
        if problem is None:
            text = "its decompressor puts the kernel at a random address on every cold boot"
            if hv.boot == "template":
                text += (
                    f"; a template's clones share its address (at most {hv.template_max_clones or 'unbounded'} "
                    f"clones, {f'{hv.template_max_age:g} s' if hv.template_max_age else 'no age bound'} per template)"
                )
            add(Finding("ok", f"guest kernel KASLR: {text}"))
        else:
            add(Finding("warn", f"guest kernel KASLR off: {problem}"))
    if qemu_ok and hv.kernel.exists():
        try:
            verdict = resolve_accelerator(config)
            add(
                Finding(
                    "ok" if verdict.accelerator == "kvm" else "warn",
                    f"accelerator {verdict.accelerator}: {verdict.reason}",
                )
            )
            if hv.boot == "template":
                add(template_exposure(hv, verdict.accelerator))
        except CapsaError as exc:
            add(Finding("FAIL", f"accelerator: {exc}"))
    if VHOST_VSOCK.exists():
        add(Finding("ok", f"agent channel vsock: {VHOST_VSOCK} exists"))
    else:
        add(Finding("warn", f"agent channel virtio-serial: {VHOST_VSOCK} is missing (modprobe vhost_vsock for vsock)"))
    if config.shared_fs.kind == "virtio-fs":
        vfsd = config.shared_fs.virtiofsd_path
        if vfsd.exists():
            add(Finding("ok", f"shared filesystem virtio-fs: {vfsd}"))
        else:
            add(Finding("FAIL", f'shared filesystem virtio-fs: {vfsd} is missing (set shared_fs.kind = "virtio-9p")'))
    else:
        add(Finding("ok", "shared filesystem virtio-9p: built into QEMU"))
    host_cgroups = describe_host()
    # Without a writable hierarchy containers still run, but engines' stats read an empty cgroup.
    usable = not ("read-only" in host_cgroups or host_cgroups.startswith("no cgroup"))
    add(
        Finding(
            "ok" if usable else "warn",
            f"cgroups: host {host_cgroups}: the VM's host processes go into the spec's cgroupsPath "
            "(with limits unless [security] cgroup_limits = false); the container's limits apply in the guest; "
            "--systemd-cgroup names the scope's cgroupfs path, without asking systemd over D-Bus",
        )
    )
    for measure in measures(config):
        # kvm_device matters only where KVM is used; the rest are the host side's defences.
        level = "ok" if measure.on or measure.name == "kvm_device" else "warn"
        add(Finding(level, f"confinement {measure.name}: {measure.detail}"))
    root = ctx.root
    parent = root if root.exists() else root.parent
    if os.access(parent, os.W_OK):
        add(Finding("ok", f"state root {root} is writable"))
    else:
        add(Finding("FAIL", f"state root {root} is not writable"))
    return out


def execute(args: argparse.Namespace, ctx: Context) -> int:
    results = findings(ctx)
    for finding in results:
        print(f"{finding.level:4} {finding.text}")
    failed = any(f.level == "FAIL" for f in results)
    print("capsa cannot run containers on this host" if failed else "capsa can run containers on this host")
    return 1 if failed else 0
