"""The data the runtime hands to the VM and the agent, built by pure functions."""


import pytest

from capsa.config import parse_config
from capsa.errors import HypervisorError
from capsa.runtime.sandbox import choose_channel, kernel_cmdline


def test_channel_is_vsock_only_where_the_host_has_it() -> None:
    config = parse_config({})
    assert choose_channel(config, vhost_vsock_present=True) == "vsock"
    assert choose_channel(config, vhost_vsock_present=False) == "serial"
    forced = parse_config({"agent": {"channel": "vsock"}})
    with pytest.raises(HypervisorError, match="vhost-vsock"):
        choose_channel(forced, vhost_vsock_present=False)
    assert choose_channel(parse_config({"agent": {"channel": "serial"}}), vhost_vsock_present=True) == "serial"


def test_kernel_cmdline_tells_the_agent_its_channel() -> None:
    config = parse_config({"agent": {"vsock_port": 2048}, "hypervisor": {"image": "", "kernel_params": ["foo=bar"]}})
    serial = kernel_cmdline(config, "serial", debug=False)
    assert "capsa.channel=serial" in serial
    assert "quiet" in serial and "capsa.debug=1" not in serial
    assert "random.trust_cpu=on" in serial  # Python as PID 1 needs early entropy
    assert "rdinit=/init" in serial
    assert serial[-1] == "foo=bar"  # the user's parameters come last, so they win
    vsock = kernel_cmdline(config, "vsock", debug=True)
    assert "capsa.vsock_port=2048" in vsock
    assert "capsa.debug=1" in vsock and "quiet" not in vsock


def test_kernel_cmdline_leaves_kaslr_on() -> None:
    for debug in (False, True):
        for channel in ("serial", "vsock"):
            assert "nokaslr" not in kernel_cmdline(parse_config({}), channel, debug)


def test_kernel_cmdline_for_a_rootfs_image() -> None:
    for config in (parse_config({}), parse_config({"hypervisor": {"initrd": ""}})):  # the default
        params = kernel_cmdline(config, "serial", debug=False)
        assert "init=/init" in params and "rdinit=/init" not in params
        assert {"root=/dev/pmem0", "rootfstype=erofs", "rootflags=dax", "ro"} <= set(params)


