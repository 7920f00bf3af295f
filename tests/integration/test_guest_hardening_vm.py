"""What a container learns of the guest kernel: no kernel addresses, no kernel log, no agent channel."""

from __future__ import annotations

import os

import pytest
from harness import Capsa

pytestmark = pytest.mark.vm

PROBE = (
    "head -1 /proc/kallsyms; "
    "dmesg >/dev/null 2>&1 && echo dmesg=allowed || echo dmesg=refused; "
    "cat /proc/sys/kernel/kptr_restrict /proc/sys/kernel/dmesg_restrict; "
    "ls /dev | grep -E '^(vport|hvc|virtio-ports)' || echo no-agent-devices"
)


def test_a_container_sees_no_kernel_addresses_log_or_agent_channel(capsa: Capsa) -> None:
    for applet in ("head", "dmesg", "grep", "ls", "cat"):
        link = capsa.bundle / "rootfs" / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    capsa.spec(["sh", "-c", PROBE])
    result = capsa.run("hardened")
    assert result.code == 0, result.stderr
    first, dmesg, kptr, dmesg_restrict, devices = result.stdout.splitlines()
    assert first.split()[0] == "0" * 16, first  # root in its namespaces, and still zeros
    assert (dmesg, kptr, dmesg_restrict) == ("dmesg=refused", "2", "1")
    assert devices == "no-agent-devices"
