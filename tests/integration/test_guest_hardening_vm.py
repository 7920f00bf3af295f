"""What a container learns of the guest kernel: no kernel addresses, no kernel log, no agent channel,
no modules to load, no unprivileged BPF or userfaultfd."""

from __future__ import annotations

import os

import pytest
from harness import Capsa

pytestmark = pytest.mark.vm

PROBE = (
    "head -1 /proc/kallsyms; "
    "dmesg >/dev/null 2>&1 && echo dmesg=allowed || echo dmesg=refused; "
    "cat /proc/sys/kernel/kptr_restrict /proc/sys/kernel/dmesg_restrict; "
    "ls /dev | grep -E '^(vport|hvc|virtio-ports)' || echo no-agent-devices; "
    # The guest kernel is built without CONFIG_MODULES: no /proc/modules, and
    # init_module(2) is not there to call (busybox insmod then fails).
    "[ -e /proc/modules ] && echo modules=present || echo modules=none; "
    "insmod /bin/busybox 2>/dev/null && echo insmod=loaded || echo insmod=failed; "
    "cat /proc/sys/kernel/unprivileged_bpf_disabled; "
    # Without CONFIG_USERFAULTFD the sysctl (and the system call) is not there at all.
    "cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || echo userfaultfd=none"
)


def test_a_container_sees_no_kernel_addresses_log_or_agent_channel(capsa: Capsa) -> None:
    for applet in ("head", "dmesg", "grep", "ls", "cat", "insmod"):
        link = capsa.bundle / "rootfs" / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    capsa.spec(["sh", "-c", PROBE])
    result = capsa.run("hardened")
    assert result.code == 0, result.stderr
    first, dmesg, kptr, dmesg_restrict, devices, modules, insmod, bpf, userfaultfd = result.stdout.splitlines()
    assert first.split()[0] == "0" * 16, first  # root in its namespaces, and still zeros
    assert (dmesg, kptr, dmesg_restrict) == ("dmesg=refused", "2", "1")
    assert devices == "no-agent-devices"
    assert (modules, insmod) == ("modules=none", "insmod=failed")
    assert bpf == "2"
    assert userfaultfd in ("0", "userfaultfd=none")
