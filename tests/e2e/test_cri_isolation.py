"""A CRI pod's containers are kept apart, except where the pod shares.

Issue 4: "Each container keeps its own rootfs, mounts, cgroup and process
namespace inside the VM unless the pod spec shares them."  Under capsa every
container of a pod runs in the pod's one VM (crun in the guest makes the
namespaces, ``agent/crun.py:guest_spec`` maps containerd's namespace paths to
the pod sandbox's process in the guest); under runc the same pod runs on the
host, which proves the assertions.

What containerd 1.6's CRI plugin asks for (``WithPodNamespaces``): every
container joins the sandbox's network, IPC and UTS namespaces by path; the PID
namespace is the container's own (``NamespaceOption.pid = CONTAINER``, the
kubelet's default) or the sandbox's (``POD``: ``shareProcessNamespace:
true``); the mount namespace is always the container's own, and on a cgroup
v1 host (this one) no cgroup namespace is asked for, so ``/proc/self/cgroup``
shows the full path, ``<cgroup_parent>/<container id>``.

Each check runs through ExecSync, as a user of ``kubectl exec`` would look.
"""

from __future__ import annotations

import pytest
from cri import api_pb2 as cri
from cri.harness import ShimContainerd

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

# Distinctive commands, so that one container's processes are recognisable from the other.
A_COMMAND = ["sleep", "1234"]
B_COMMAND = ["sleep", "4321"]
# The pause image's entrypoint (cri/harness.py), PID 1 of a pod that shares its PID namespace.
PAUSE_COMMAND = "/bin/sh -c while :; do sleep 3600; done"
PORT = 8080

# One ExecSync that reports what a container sees, a line per fact: its namespaces
# (namespaces(7): the link names the namespace by inode), IPv4 addresses, hostname,
# cgroup, the mount at / (mountinfo fields 3 onwards: device, root within the
# filesystem, mount point, options, source; proc(5)), PID 1, the marker file, and
# every process it can see by /proc (newlines in a command line, such as this
# script's own, become spaces so that each process stays on its line).
VIEW = r"""
for ns in pid mnt net uts ipc; do echo "ns.$ns=$(readlink /proc/self/ns/$ns)"; done
echo "addresses=$(ip -o -4 addr show | awk '{ print $4 }' | sort | tr '\n' ' ')"
echo "hostname=$(hostname)"
echo "cgroup=$(tr '\n' ' ' < /proc/self/cgroup)"
echo "root=$(awk '$5 == "/" { $1 = ""; $2 = ""; print }' /proc/self/mountinfo | tr '\n' ' ')"
echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline)"
if [ -e /tmp/a-only ]; then echo marker=yes; else echo marker=no; fi
for d in /proc/[0-9]*; do
    cmd=$(tr '\0\n' '  ' < $d/cmdline 2>/dev/null)
    [ -n "$cmd" ] && echo "proc=${d#/proc/} $cmd"
done
true
"""


class View:
    """What one container sees, parsed from :data:`VIEW`'s output."""

    def __init__(self, output: str) -> None:
        self.fields: dict[str, str] = {}
        # PID -> command line, of every process the container can see.
        self.processes: dict[int, str] = {}
        for line in output.splitlines():
            key, sep, value = line.partition("=")
            assert sep, f"not a line of VIEW: {line!r}"
            if key == "proc":
                pid, _, cmdline = value.partition(" ")
                self.processes[int(pid)] = cmdline.strip()
            else:
                assert key not in self.fields, f"{key} twice in:\n{output}"
                self.fields[key] = value.strip()

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def commands(self) -> set[str]:
        return set(self.processes.values())


def view(k: ShimContainerd, container_id: str) -> View:
    return View(k.sh(container_id, VIEW))


def start(k: ShimContainerd, pod_id: str, pod: cri.PodSandboxConfig, name: str, command: list[str]) -> str:
    cid = k.create_container(pod_id, pod, name, command)
    k.call("StartContainer", cri.StartContainerRequest(container_id=cid))
    return cid


def assert_nothing_left(k: ShimContainerd) -> None:
    left = k.wait_nothing_left()
    assert left == [], "left behind:\n" + "\n".join(str(p) for p in left)


def test_containers_of_a_pod_are_kept_apart(k: ShimContainerd, handler: str) -> None:
    """pid=CONTAINER (the default): A's file and processes are A's alone, each
    container has its own PID 1, mount namespace, root mount and cgroup; the
    network (127.0.0.1 included) and the hostname are the pod's."""
    with k.pod(f"apart-{handler}", handler) as (pod_id, pod):
        a = start(k, pod_id, pod, "a", A_COMMAND)
        b = start(k, pod_id, pod, "b", B_COMMAND)
        # A writes to its rootfs and serves on the pod's loopback; busybox httpd
        # daemonizes, away from ExecSync's stdio.
        k.sh(
            a,
            "touch /tmp/a-only && mkdir -p /tmp/www && echo served-by-a > /tmp/www/index.html && "
            f"httpd -p 127.0.0.1:{PORT} -h /tmp/www </dev/null >/dev/null 2>&1",
        )
        seen_a, seen_b = view(k, a), view(k, b)

        # The positive controls first: A sees its own file and processes.
        assert seen_a["marker"] == "yes"
        assert seen_a["pid1"] == " ".join(A_COMMAND), seen_a.processes
        assert seen_a.processes[1] == " ".join(A_COMMAND)
        assert any(cmd.startswith("httpd ") for cmd in seen_a.commands()), seen_a.processes

        # Rootfs: A's file is not in B's.
        assert seen_b["marker"] == "no"
        # Processes: B has its own PID 1 and sees none of A's, by /proc and by ps.
        assert seen_b["pid1"] == " ".join(B_COMMAND), seen_b.processes
        assert " ".join(A_COMMAND) not in seen_b.commands(), seen_b.processes
        assert not any(cmd.startswith("httpd ") for cmd in seen_b.commands()), seen_b.processes
        ps_b = k.sh(b, "ps")
        assert "sleep 4321" in ps_b and "sleep 1234" not in ps_b and "httpd" not in ps_b, ps_b
        assert seen_a["ns.pid"] != seen_b["ns.pid"]

        # Mounts: a mount namespace each, and each its own root mount.
        assert seen_a["ns.mnt"] != seen_b["ns.mnt"]
        assert seen_a["root"] and seen_b["root"]
        assert seen_a["root"] != seen_b["root"], (seen_a["root"], seen_b["root"])

        # cgroup: each in its own, named by its container ID (containerd's cgroupsPath).
        assert seen_a["cgroup"] != seen_b["cgroup"]
        assert a in seen_a["cgroup"] and b not in seen_a["cgroup"], seen_a["cgroup"]
        assert b in seen_b["cgroup"] and a not in seen_b["cgroup"], seen_b["cgroup"]

        # Shared: the pod's network (its address; B reaches A on 127.0.0.1), IPC and hostname.
        assert seen_a["ns.net"] == seen_b["ns.net"]
        ip = k.call("PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
        assert f"{ip}/" in seen_a["addresses"], seen_a["addresses"]
        assert seen_a["addresses"] == seen_b["addresses"]
        assert seen_a["ns.ipc"] == seen_b["ns.ipc"]
        assert seen_a["ns.uts"] == seen_b["ns.uts"]
        assert seen_a["hostname"] == seen_b["hostname"] == pod.hostname
        assert k.sh(b, f"wget -q -O - http://127.0.0.1:{PORT}/index.html") == "served-by-a\n"
    assert_nothing_left(k)


def test_share_process_namespace(k: ShimContainerd, handler: str) -> None:
    """pid=POD (``shareProcessNamespace: true``): the pod's containers share one PID
    namespace whose PID 1 is the pause process; each still keeps its own rootfs."""
    with k.pod(f"sharepid-{handler}", handler, pid=cri.POD) as (pod_id, pod):
        a = start(k, pod_id, pod, "a", A_COMMAND)
        b = start(k, pod_id, pod, "b", B_COMMAND)
        k.sh(a, "touch /tmp/a-only")
        seen_a, seen_b = view(k, a), view(k, b)

        assert seen_a["ns.pid"] == seen_b["ns.pid"]
        for seen in (seen_a, seen_b):
            assert seen["pid1"] == PAUSE_COMMAND, seen.processes
            assert {" ".join(A_COMMAND), " ".join(B_COMMAND), PAUSE_COMMAND} <= seen.commands(), seen.processes
        ps_b = k.sh(b, "ps")
        assert "sleep 1234" in ps_b and "sleep 4321" in ps_b and "while :; do sleep 3600; done" in ps_b, ps_b

        # Sharing processes shares no files: the rootfs and mounts stay each container's own.
        assert (seen_a["marker"], seen_b["marker"]) == ("yes", "no")
        assert seen_a["ns.mnt"] != seen_b["ns.mnt"]
    assert_nothing_left(k)


def test_memory_limit_is_the_containers_own(k: ShimContainerd, handler: str) -> None:
    """A container's memory limit is in its own cgroup, and its sibling's is unlimited.
    (test_cri.py's test_container_limits proves the limit arrives; this proves it stays
    with its container.)"""
    limit = 96 << 20
    if handler == "runc":
        # The host's cgroup v1 memory hierarchy, which runc mounts with the container's cgroup as its root.
        script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    else:
        # The guest's cgroup v2 (no cgroup namespace: CRI adds none on a v1 host).
        script = "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max"
    with k.pod(f"memory-{handler}", handler) as (pod_id, pod):
        limited = k.create_container(
            pod_id, pod, "limited", A_COMMAND, resources=cri.LinuxContainerResources(memory_limit_in_bytes=limit)
        )
        k.call("StartContainer", cri.StartContainerRequest(container_id=limited))
        free = start(k, pod_id, pod, "free", B_COMMAND)
        assert int(k.sh(limited, script)) == limit
        unlimited = k.sh(free, script).strip()
        # cgroup v2 says "max"; v1 says the largest page-aligned value (runc leaves the default).
        assert unlimited == "max" or int(unlimited) >= 1 << 62, unlimited
    assert_nothing_left(k)
