"""CRI ``PortForward`` (what ``kubectl port-forward`` uses): containerd's streaming server,
reached over the kubelet's WebSocket protocol (``cri/portforward.py``), dials
``localhost:PORT`` in the pod's network namespace.  Under runc that is the pod's server;
under capsa the server listens in the guest and the VM's owner relays the namespace's
loopback to the guest's (docs/kubernetes.md, "Port forwarding").  The same steps under
both handlers: a busybox ``httpd`` in the pod answers through the forward, and a port
nothing listens on ends in an error on the error channel, promptly."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
from cri import api_pb2 as cri
from cri.harness import ShimContainerd, host_boot_id, wait_for
from cri.portforward import forward

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

HTTP_PORT = 8080
CLOSED_PORT = 8081
#: The page names the kernel it was served from (its boot ID): the guest's under capsa.
SERVER = (
    "mkdir -p /tmp/www && echo served-by-$(cat /proc/sys/kernel/random/boot_id) > /tmp/www/index.html"
    f" && exec httpd -f -p {HTTP_PORT} -h /tmp/www"
)


def port_forward_url(k: ShimContainerd, pod_id: str, port: int) -> str:
    """A fresh streaming URL (each is good for one connection)."""
    response = k.call("PortForward", cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[port]))
    assert response.url.startswith("http://127.0.0.1:"), response.url
    return str(response.url)


def netns_path(k: ShimContainerd, pod_id: str) -> str:
    """The pod's network namespace (CNI's bind mount), from the sandbox's spec."""
    info = k.call("PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info
    spec = json.loads(info["info"])["runtimeSpec"]
    return str(next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network"))


def relay_rules(k: ShimContainerd, pod_id: str) -> str:
    """What of the relay's NAT rules the pod's network namespace holds (``iptables-save -t nat``)."""
    saved = subprocess.run(
        ["nsenter", f"--net={netns_path(k, pod_id)}", "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "\n".join(line for line in saved.stdout.splitlines() if "CAPSA" in line)


def test_port_forward_reaches_the_pods_server(k: ShimContainerd, handler: str) -> None:
    """An HTTP request through PortForward gets the page the pod's httpd serves, from the pod's
    kernel (the guest's under capsa); a second connection works too; a port without a listener
    ends with containerd's error on the error channel within seconds, not a hang."""
    with k.pod(f"portfwd-{handler}", handler) as (pod_id, pod):
        cid = k.create_container(pod_id, pod, "web", ["sh", "-c", SERVER])
        k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
        fetch = f"wget -q -O - http://127.0.0.1:{HTTP_PORT}/index.html"
        wait_for(lambda: k.exec_sync(cid, ["sh", "-c", fetch]).exit_code == 0, 60, "httpd to answer in the pod")
        boot_id = k.sh(cid, "cat /proc/sys/kernel/random/boot_id").strip()
        assert (boot_id == host_boot_id()) == (handler == "runc")
        if handler == "capsa":
            assert "-j CAPSA-PORT-FORWARD" in relay_rules(k, pod_id)

        request = b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n"
        for _attempt in range(2):
            got = forward(port_forward_url(k, pod_id, HTTP_PORT), HTTP_PORT, request)
            assert got.announced == {0: HTTP_PORT, 1: HTTP_PORT}, got
            assert got.data.startswith(b"HTTP/1.1 200 OK\r\n"), got
            assert got.data.endswith(f"\r\n\r\nserved-by-{boot_id}\n".encode()), got
            assert got.error == b"", got

        refused = forward(port_forward_url(k, pod_id, CLOSED_PORT), CLOSED_PORT, request)
        assert refused.announced == {0: CLOSED_PORT, 1: CLOSED_PORT}, refused
        assert refused.data == b"", refused
        assert f"error forwarding port {CLOSED_PORT} to pod {pod_id}".encode() in refused.error, refused
        # containerd waits 1 s for the other direction once one ended; then it closes.
        assert refused.seconds < 15, refused
        # The server in the pod is unharmed.
        again = forward(port_forward_url(k, pod_id, HTTP_PORT), HTTP_PORT, request)
        assert again.data.endswith(f"served-by-{boot_id}\n".encode()), again
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_the_relay_leaves_nothing_in_the_namespace(k: ShimContainerd, handler: str) -> None:
    """The pod's network namespace holds the relay's rules while the pod runs; once the pod is
    removed (its VM stopped) they are gone from it (the test holds the namespace past CRI's
    removal of its bind mount, to look)."""
    if handler != "capsa":
        pytest.skip("the relay is capsa's")
    pod_id = k.run_pod(k.pod_config("portfwd-rules"), handler)
    with contextlib.ExitStack() as held:
        try:
            rules = relay_rules(k, pod_id)
            assert ":CAPSA-PORT-FORWARD" in rules and "-j REDIRECT --to-ports" in rules, rules
            ns = held.enter_context(open(netns_path(k, pod_id), "rb"))  # held for the check below
        finally:
            k.remove_pod(pod_id)
        left = k.wait_nothing_left()
        assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)
        saved = subprocess.run(
            ["nsenter", f"--net=/proc/self/fd/{ns.fileno()}", "iptables-save", "-t", "nat"],
            capture_output=True,
            text=True,
            timeout=30,
            pass_fds=(ns.fileno(),),
        )
        assert saved.returncode == 0, saved.stderr
        assert "CAPSA" not in saved.stdout, saved.stdout
