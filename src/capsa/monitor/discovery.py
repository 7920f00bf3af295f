"""Finding the sandboxes of a host (docs/architecture.md, "Where things live on a host").

Two kinds:

- **runc-CLI containers** (``kind = "runc"``), one VM each: a state
  directory ``<root>/<id>/`` with capsa's ``state.json``.  They are found
  under the state roots engines use by default and any given, and through
  ``/run/capsa-vm/<key>/state``, the link each socket directory keeps to
  its state directory, which finds them under any root at all.  The link is
  also what ties a state directory to its sockets when the root was named
  through a symbolic link (``/var/run`` for ``/run``): the key hashes the
  path the runtime was given, not the real one.
- **shim v2 pods** (``kind = "shim-v2"``), one VM per pod: a
  ``containerd-shim-capsa-v2`` server process (comm ``capsa-shim-v2``),
  whose arguments name its namespace, sandbox ID and socket, and whose
  working directory is its sandbox's bundle; the pod's other containers
  are the bundles beside it whose ``address`` file names the same socket.

Reading is tolerant: a container may vanish while it is read, and a state
root may hold runc's own containers (Docker's and containerd's roots do),
whose ``state.json`` is not capsa's and is passed over.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from capsa.monitor.procfs import PROC, ProcessTable, read_cwd
from capsa.monitor.roles import Role
from capsa.runtime.container import current_status
from capsa.runtime.sockets import socket_key
from capsa.runtime.state import DEFAULT_ROOT, OWNER_LINK, SOCKET_ROOT, STATE_FILE, ContainerState, Status

#: Where engines point the runtime by default: capsa's own (what Podman 4.3,
#: which passes no ``--root``, gets), Docker's through containerd's runc shim.
DEFAULT_ROOTS = (DEFAULT_ROOT, Path("/run/docker/runtime-runc/moby"))
#: containerd's runc shim: ``--root /run/containerd/runc/<namespace>``, one per namespace.
CONTAINERD_RUNC_ROOT = Path("/run/containerd/runc")

SHIM_V2_COMM = "capsa-shim-v2"
SHIM_COMM = "capsa-shim"
#: The shim v2 names the address file in every bundle it serves (shim/v2/main.py).
ADDRESS_FILE = "address"

KIND_RUNC = "runc"
KIND_SHIM_V2 = "shim-v2"

# CRI annotations: containerd's CRI plugin, then CRI-O's.
_POD_NAME_KEYS = ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name")
_POD_NAMESPACE_KEYS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")
_CONTAINER_NAME_KEYS = ("io.kubernetes.cri.container-name", "io.kubernetes.container.name")


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str = ""  # the CRI container name, if any
    status: str = ""  # the OCI status as capsa's state says ("" for a shim v2 pod's: the shim tells)


@dataclass(frozen=True)
class SandboxInfo:
    """One VM and what the monitor knows of it before asking anyone."""

    id: str
    kind: str
    status: str  # OCI status (runc); a shim v2 pod's is "" until its shim answers
    containers: tuple[ContainerInfo, ...]
    #: (pid, role) of the processes its others hang from, live ones only.
    anchors: tuple[tuple[int, str], ...] = ()
    hypervisor_pid: int = 0
    #: runc: the socket directory holding proxy.sock; shim v2: the shim's ttrpc socket.
    endpoint: Path | None = None
    #: runc: the state directory; shim v2: "containerd namespace/sandbox ID".
    source: str = ""
    created: float | None = None  # seconds since the epoch
    pod_name: str = ""
    pod_namespace: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)


def pick(annotations: Mapping[str, str], keys: Sequence[str]) -> str:
    for key in keys:
        value = annotations.get(key)
        if value:
            return value
    return ""


def pod_labels(annotations: Mapping[str, str]) -> tuple[str, str]:
    """The pod's name and namespace from CRI annotations (``""`` outside Kubernetes)."""
    return pick(annotations, _POD_NAME_KEYS), pick(annotations, _POD_NAMESPACE_KEYS)


def container_name(annotations: Mapping[str, str]) -> str:
    return pick(annotations, _CONTAINER_NAME_KEYS)


def is_capsa_state(data: Mapping[str, Any]) -> bool:
    """capsa's state.json, not runc's (which shares Docker's and containerd's roots)."""
    return "proxy_pid" in data and "bundle" in data and isinstance(data.get("id"), str)


def parse_iso_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def runc_sandbox(
    state: ContainerState,
    state_dir: Path,
    socket_dir: Path | None,
    table: ProcessTable,
    exec_shims: Iterable[int] = (),
) -> SandboxInfo:
    """A runc-CLI container's sandbox (one VM, one container) from its state and the process table."""
    status = current_status(state, table.alive)
    anchors: list[tuple[int, str]] = []
    if status != Status.STOPPED:
        if table.alive(state.pid, state.pid_start):
            anchors.append((state.pid, Role.SHIM))
        if table.alive(state.proxy_pid, state.proxy_start):
            anchors.append((state.proxy_pid, Role.PROXY))
        anchors += [(pid, Role.EXEC_SHIM) for pid in exec_shims]
    annotations = dict(state.annotations)
    pod_name, pod_namespace = pod_labels(annotations)
    return SandboxInfo(
        id=state.id,
        kind=KIND_RUNC,
        status=status,
        containers=(ContainerInfo(state.id, container_name(annotations), status),),
        anchors=tuple(anchors),
        hypervisor_pid=state.hypervisor_pid if status != Status.STOPPED else 0,
        endpoint=socket_dir,
        source=str(state_dir),
        created=parse_iso_time(state.created),
        pod_name=pod_name,
        pod_namespace=pod_namespace,
        annotations=annotations,
    )


@dataclass(frozen=True)
class ShimArgs:
    """What a capsa-shim's command line says (shim/main.py's flags)."""

    root: str
    container_id: str
    exec_id: str


def parse_shim_argv(argv: Sequence[str]) -> ShimArgs | None:
    """``python -m capsa.shim --root R ... --id=ID [--exec-id X] ...``; None if it is not that."""
    values = _flag_values(argv, ("--root", "--id", "--exec-id"))
    if not values.get("--root") or not values.get("--id"):
        return None
    return ShimArgs(values["--root"], values["--id"], values.get("--exec-id", ""))


@dataclass(frozen=True)
class ShimV2Args:
    """What a containerd-shim-capsa-v2 server's command line says (shim/v2/main.py, Go-style flags)."""

    namespace: str
    sandbox_id: str
    socket: str


def parse_shim_v2_argv(argv: Sequence[str]) -> ShimV2Args | None:
    """``python -m capsa.shim.v2 -namespace NS -address A -id ID -socket S ...``; None without ID or socket."""
    values = _flag_values(argv, ("-namespace", "-id", "-socket"))
    if not values.get("-id") or not values.get("-socket"):
        return None
    return ShimV2Args(values.get("-namespace", ""), values["-id"], values["-socket"])


def _flag_values(argv: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """``NAME VALUE`` and ``NAME=VALUE`` forms; for Go-style ``-flag``, ``--flag`` too."""
    wanted = {name: name for name in names}
    wanted.update({"-" + name: name for name in names if not name.startswith("--")})
    values: dict[str, str] = {}
    args = list(argv)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in wanted:
            continue
        if eq:
            values[wanted[flag]] = value
        elif i + 1 < len(args):
            values[wanted[flag]] = args[i + 1]
    return values


# -- reading the host ---------------------------------------------------------


def default_roots(containerd_runc_root: Path = CONTAINERD_RUNC_ROOT) -> list[Path]:
    """The default state roots as they are now (containerd's namespaces come and go)."""
    roots = list(DEFAULT_ROOTS)
    with contextlib.suppress(OSError):
        roots += sorted(entry for entry in containerd_runc_root.iterdir() if entry.is_dir())
    return roots


def socket_links(socket_root: Path = SOCKET_ROOT) -> dict[str, tuple[Path, Path]]:
    """Each socket directory's state directory: real path of the state dir → (state dir as linked, socket dir)."""
    links: dict[str, tuple[Path, Path]] = {}
    try:
        entries = sorted(os.listdir(socket_root))
    except OSError:
        return links
    for entry in entries:
        try:
            target = Path(os.readlink(socket_root / entry / OWNER_LINK))
        except OSError:
            continue
        links[os.path.realpath(target)] = (target, socket_root / entry)
    return links


def find_state_dirs(roots: Iterable[Path], socket_root: Path = SOCKET_ROOT) -> list[tuple[Path, Path | None]]:
    """Every container state directory under ``roots`` or linked from a socket directory, each once,
    with its socket directory (None when it has none)."""
    links = socket_links(socket_root)
    found: dict[str, tuple[Path, Path | None]] = {}
    for root in roots:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            state_dir = Path(os.path.abspath(root)) / entry
            if not (state_dir / STATE_FILE).is_file():
                continue
            real = os.path.realpath(state_dir)
            if real in found:
                continue
            if real in links:
                found[real] = (state_dir, links[real][1])
            else:
                sockets = socket_root / socket_key(state_dir)
                found[real] = (state_dir, sockets if sockets.is_dir() else None)
    for real, (state_dir, sockets) in links.items():
        if real not in found and (state_dir / STATE_FILE).is_file():
            found[real] = (state_dir, sockets)
    return list(found.values())


def load_state(state_dir: Path) -> ContainerState | None:
    """capsa's state of the container, or None (gone, unreadable, or runc's own)."""
    try:
        text = (state_dir / STATE_FILE).read_text()
        data = json.loads(text)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not is_capsa_state(data):
        return None
    try:
        return ContainerState.from_json(text)
    except (TypeError, ValueError):
        return None


def exec_shims_by_state_dir(table: ProcessTable) -> dict[str, list[int]]:
    """The live ``capsa exec`` shims, by the real path of their container's state directory."""
    found: dict[str, list[int]] = {}
    for stat in table.with_comm(SHIM_COMM):
        args = parse_shim_argv(table.cmdlines.get(stat.pid, ()))
        if args is None or not args.exec_id:
            continue
        real = os.path.realpath(os.path.join(args.root, args.container_id))
        found.setdefault(real, []).append(stat.pid)
    return found


def discover_runc(roots: Iterable[Path], table: ProcessTable, socket_root: Path = SOCKET_ROOT) -> list[SandboxInfo]:
    exec_shims = exec_shims_by_state_dir(table)
    sandboxes: list[SandboxInfo] = []
    for state_dir, socket_dir in find_state_dirs(roots, socket_root):
        state = load_state(state_dir)
        if state is None:
            continue
        shims = exec_shims.get(os.path.realpath(state_dir), [])
        sandboxes.append(runc_sandbox(state, state_dir, socket_dir, table, shims))
    return sandboxes


def read_annotations(bundle: Path) -> dict[str, str]:
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    if not isinstance(annotations, dict):
        return {}
    return {str(k): str(v) for k, v in annotations.items()}


def pod_bundles(sandbox_bundle: Path, socket: str) -> list[Path]:
    """The bundles a shim v2 serves: its sandbox's, and those beside it naming its socket."""
    address = f"unix://{socket}"
    bundles = [sandbox_bundle]
    try:
        entries = sorted(sandbox_bundle.parent.iterdir())
    except OSError:
        return bundles
    for entry in entries:
        if entry == sandbox_bundle:
            continue
        try:
            if (entry / ADDRESS_FILE).read_text().strip() == address:
                bundles.append(entry)
        except OSError:
            continue
    return bundles


def discover_shim_v2(table: ProcessTable, proc: Path = PROC) -> list[SandboxInfo]:
    sandboxes: list[SandboxInfo] = []
    for stat in sorted(table.with_comm(SHIM_V2_COMM), key=lambda s: s.pid):
        args = parse_shim_v2_argv(table.cmdlines.get(stat.pid, ()))
        if args is None:
            continue
        bundle = read_cwd(stat.pid, proc)
        containers: list[ContainerInfo] = []
        annotations: dict[str, str] = {}
        if bundle is not None:
            for path in pod_bundles(bundle, args.socket):
                own = read_annotations(path)
                if path == bundle:
                    annotations = own
                containers.append(ContainerInfo(path.name, container_name(own)))
        if not any(c.id == args.sandbox_id for c in containers):
            containers.insert(0, ContainerInfo(args.sandbox_id))
        pod_name, pod_namespace = pod_labels(annotations)
        sandboxes.append(
            SandboxInfo(
                id=args.sandbox_id,
                kind=KIND_SHIM_V2,
                status="",
                containers=tuple(containers),
                anchors=((stat.pid, Role.SHIM),),
                endpoint=Path(args.socket),
                source=f"{args.namespace}/{args.sandbox_id}",
                created=table.started_at(stat.pid),
                pod_name=pod_name,
                pod_namespace=pod_namespace,
                annotations=annotations,
            )
        )
    return sandboxes


def wants_cmdline(comm: str) -> bool:
    """The processes whose command line discovery reads: the shims'."""
    return comm in (SHIM_COMM, SHIM_V2_COMM)
