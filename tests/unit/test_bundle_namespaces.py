"""The namespaces a container in a VM cannot share with the host (config-linux.md "Namespaces")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.spec import default_spec
from capsa.errors import BundleError, InvalidArgument
from capsa.runtime.bundle import check_namespaces, load_bundle

WHERE = Path("/b/config.json")
HOST = {"net": {(3, 4026531840)}, "pid": {(3, 4026531836)}, "ipc": {(3, 4026531839)}}
FILES = {
    "/proc/1/ns/net": (3, 4026531840),
    "/proc/4242/ns/ipc": (3, 4026531839),
    "/run/netns/cni-1": (3, 4026532500),
    "/proc/777/ns/pid": (3, 4026532600),
}


def fake_stat(path: str) -> os.stat_result:
    if path not in FILES:
        raise FileNotFoundError(2, "No such file or directory", path)
    dev, ino = FILES[path]
    return os.stat_result((0o444, ino, dev, 1, 0, 0, 0, 0, 0, 0))


KINDS = {"net": "network", "pid": "pid", "ipc": "ipc", "cni-1": "network", "uts": "uts"}


def fake_kind(path: str) -> str | None:
    """What ioctl(NS_GET_NSTYPE) would say of the fake files."""
    fake_stat(path)
    return KINDS.get(path.rsplit("/", 1)[-1])


def check(*namespaces: dict[str, str]) -> Path | None:
    spec = {"linux": {"namespaces": list(namespaces)}}
    return check_namespaces(spec, WHERE, host_ids=lambda kind: HOST[kind], stat=fake_stat, kind_of=fake_kind)


OWN = ({"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"})


def test_namespaces_of_its_own_are_fine() -> None:
    assert check(*OWN) is None


def test_an_engines_network_namespace_is_where_the_vm_attaches() -> None:
    assert check({"type": "pid"}, {"type": "ipc"}, {"type": "network", "path": "/run/netns/cni-1"}) == Path(
        "/run/netns/cni-1"
    )


def test_other_pid_and_ipc_namespaces_are_accepted() -> None:
    # A pod's containers join the infra container's namespaces by path.
    assert check({"type": "pid", "path": "/proc/777/ns/pid"}, {"type": "ipc"}, {"type": "network"}) is None


@pytest.mark.parametrize(("kind", "label"), [("network", "network"), ("pid", "PID"), ("ipc", "IPC")])
def test_an_absent_entry_is_the_hosts_namespace(kind: str, label: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        check(*(ns for ns in OWN if ns["type"] != kind))
    assert str(error.value) == (
        f"the host's {label} namespace cannot be shared with a container in a VM (use a {label} namespace of its own)"
    )


@pytest.mark.parametrize(
    ("entry", "label"),
    [
        ({"type": "network", "path": "/proc/1/ns/net"}, "network"),
        ({"type": "ipc", "path": "/proc/4242/ns/ipc"}, "IPC"),  # the host's, under another name
    ],
)
def test_a_path_to_the_hosts_namespace_is_refused(entry: dict[str, str], label: str) -> None:
    others = [ns for ns in OWN if ns["type"] != entry["type"]]
    with pytest.raises(InvalidArgument, match=f"the host's {label} namespace"):
        check(*others, entry)


def test_a_missing_namespace_path_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="network namespace /run/netns/gone: No such file or directory"):
        check({"type": "pid"}, {"type": "ipc"}, {"type": "network", "path": "/run/netns/gone"})


@pytest.mark.parametrize("linux", ["x", {"namespaces": "x"}, {"namespaces": [{"path": "/x"}]}, {"namespaces": ["x"]}])
def test_malformed_namespaces(linux: Any) -> None:
    with pytest.raises(BundleError):
        check_namespaces({"linux": linux}, WHERE, host_ids=lambda kind: HOST[kind], stat=fake_stat, kind_of=fake_kind)


def make_bundle(tmp_path: Path, spec: dict[str, Any]) -> Path:
    (tmp_path / "rootfs" / "bin").mkdir(parents=True)
    (tmp_path / "rootfs" / "bin" / "sh").write_bytes(b"\x7fELF")
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


def test_capsa_spec_is_accepted(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path, default_spec(["sh"], terminal=False)))
    assert bundle.network_namespace is None


def test_load_bundle_refuses_our_own_network_namespace(tmp_path: Path) -> None:
    # This process's namespace is the runtime's: what the engine would hand
    # us for `--network host`.
    spec = default_spec(["sh"], terminal=False)
    spec["linux"]["namespaces"] = [
        ns if ns["type"] != "network" else {"type": "network", "path": "/proc/self/ns/net"}
        for ns in spec["linux"]["namespaces"]
    ]
    with pytest.raises(InvalidArgument, match="network namespace cannot be shared"):
        load_bundle(make_bundle(tmp_path, spec))


def test_load_bundle_keeps_another_network_namespace_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any file that is not the host's namespace stands in for /run/netns/X,
    # which needs root to create; it passes for a network namespace here.
    monkeypatch.setattr("capsa.runtime.bundle.namespace_type", lambda path: "network")
    netns = tmp_path / "netns"
    netns.write_text("")
    spec = default_spec(["sh"], terminal=False)
    spec["linux"]["namespaces"] = [
        ns if ns["type"] != "network" else {"type": "network", "path": str(netns)} for ns in spec["linux"]["namespaces"]
    ]
    bundle = load_bundle(make_bundle(tmp_path / "b", spec))
    assert bundle.network_namespace == netns


def test_a_pods_sandbox_namespaces_are_the_pods_not_the_hosts() -> None:
    # containerd gives a pod's later containers /proc/<sandbox task pid>/ns/* paths;
    # the shim v2 hands out the VM's PID, which lives in the host's namespaces.
    ipc = {"type": "ipc", "path": "/proc/4242/ns/ipc"}
    others = [ns for ns in OWN if ns["type"] != "ipc"]
    spec = {"linux": {"namespaces": [*others, ipc]}}
    pod = frozenset({4242})
    assert check_namespaces(
        spec, WHERE, host_ids=lambda kind: HOST[kind], stat=fake_stat, pod_pids=pod, kind_of=fake_kind
    ) is None
    with pytest.raises(InvalidArgument, match="IPC"):
        check_namespaces(
            spec,
            WHERE,
            host_ids=lambda kind: HOST[kind],
            stat=fake_stat,
            pod_pids=frozenset({4243}),
            kind_of=fake_kind,
        )


def test_a_path_to_a_namespace_of_another_type_is_refused() -> None:
    # runc refuses it too; before, only the network namespace's type was noticed.
    with pytest.raises(BundleError, match=r"pid namespace path /proc/4242/ns/ipc is a ipc namespace"):
        check({"type": "pid", "path": "/proc/4242/ns/ipc"}, {"type": "ipc"}, {"type": "network"})
    with pytest.raises(BundleError, match=r"uts namespace path /run/netns/cni-1 is a network namespace"):
        check(*OWN, {"type": "uts", "path": "/run/netns/cni-1"})


def test_the_real_kind_of_a_namespace_file() -> None:
    from capsa.runtime.bundle import namespace_type

    assert namespace_type("/proc/self/ns/uts") == "uts"
    assert namespace_type("/proc/self/ns/net") == "network"
    assert namespace_type("/etc/hostname") is None
