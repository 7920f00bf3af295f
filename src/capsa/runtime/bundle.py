"""Reading an OCI bundle: config.json and the rootfs it names.

Everything here is checked on the host before a VM is started, so that bad
input fails in milliseconds and leaves nothing behind.  First the whole spec
is checked against the runtime-spec's own JSON Schema (``runtime/schema``),
so that every field has the type the spec gives it; then what a schema
cannot say, following the OCI runtime spec (config.md): ``root.path`` is
relative to the bundle unless absolute; ``process`` is required for
``create``/``run``; ``process.args`` is a non-empty array of strings.

Namespaces (config-linux.md "Namespaces"): an absent entry means the
container shares the runtime's namespace of that type, and an entry with a
``path`` joins that namespace.  A container in a VM can share neither the
host's network, nor its PID nor its IPC namespace (its processes live in
another kernel), so :func:`check_namespaces` refuses both forms of asking
for them, as Kata does ("Host networking requested, not supported").  A
network namespace of its own on the host is where the VM's network attaches
(DESIGN.md 7); its path is :attr:`Bundle.network_namespace`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa.errors import BundleError, CapsaError, InvalidArgument
from capsa.runtime.resources import without_kernel_memory
from capsa.runtime.schema import check_config

# What runc and crun assume when process.env has no PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_SYMLINKS = 40

# The namespaces a VM cannot share with the host: spec type -> /proc/<pid>/ns
# file name, and the name a user knows it by.
_VM_NAMESPACES = {"network": ("net", "network"), "pid": ("pid", "PID"), "ipc": ("ipc", "IPC")}

# (st_dev, st_ino) of an nsfs file: what identifies a namespace (namespaces(7)).
NamespaceId = tuple[int, int]

# ioctl_ns(2): NS_GET_NSTYPE = _IO(0xb7, 0x3) answers the CLONE_NEW* flag
# of the namespace an nsfs file refers to; spec type names (config-linux.md).
_NS_GET_NSTYPE = 0xB703
_NAMESPACE_TYPES = {
    0x40000000: "network",
    0x20000000: "pid",
    0x10000000: "user",
    0x08000000: "ipc",
    0x04000000: "uts",
    0x02000000: "cgroup",
    0x00020000: "mount",
    0x00000080: "time",
}


def namespace_type(path: str) -> str | None:
    """The spec's name for the namespace ``path`` refers to; None if it is no namespace file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _NAMESPACE_TYPES.get(fcntl.ioctl(fd, _NS_GET_NSTYPE))
    except OSError:
        return None  # ENOTTY: not an nsfs file
    finally:
        os.close(fd)

#: Deeper than any spec needs (linux.seccomp.syscalls[].args[] is 6 levels),
#: shallow enough that nothing which walks the spec later runs out of stack.
MAX_JSON_DEPTH = 128
_TOO_DEEP = f"nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays and objects)"


@dataclass(frozen=True)
class Bundle:
    """A bundle whose config.json parsed and whose rootfs exists."""

    path: Path
    spec: dict[str, Any]
    rootfs: Path
    # The engine's network namespace (linux.namespaces "network" path), where
    # the VM's network attaches; None: the container gets a new, empty one.
    network_namespace: Path | None = None

    @property
    def process(self) -> dict[str, Any]:
        process: dict[str, Any] = self.spec["process"]
        return process

    @property
    def annotations(self) -> dict[str, str]:
        annotations = self.spec.get("annotations") or {}
        return {str(k): str(v) for k, v in annotations.items()}

    @property
    def terminal(self) -> bool:
        return bool(self.process.get("terminal", False))


def load_bundle(
    path: str | os.PathLike[str], pod_pids: frozenset[int] = frozenset(), check_schema: bool = True
) -> Bundle:
    """Load and check ``path/config.json``; raise :class:`BundleError` naming the problem.

    ``pod_pids``: host PIDs that stand for a pod's sandbox (containerd hands
    out the VM's PID as the sandbox task's); namespace paths under their
    ``/proc/PID/ns/`` mean "the pod's namespaces", which the guest provides.
    ``check_schema=False`` skips the schema (its first use in a process costs
    0.1 s) where the caller knows the file passed it: the proxy, asked by a
    ``capsa create`` that checked it.
    """
    bundle = Path(path).absolute()
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle}: no such directory")
    config_path = bundle / "config.json"
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{config_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{config_path}: cannot read: {exc}") from exc
    spec = parse_json_object(text, f"{config_path}: ", BundleError)
    # The spec's own schema first: what follows may then trust the types of the fields it reads.
    if check_schema:
        check_config(spec, f"{config_path}: ", BundleError)
    _check_process(spec, config_path)
    _drop_kernel_memory(spec, config_path)
    network_namespace = check_namespaces(spec, config_path, pod_pids=pod_pids)
    rootfs = _rootfs_path(spec, bundle, config_path)
    _check_executable(spec["process"], rootfs)
    return Bundle(path=bundle, spec=spec, rootfs=rootfs, network_namespace=network_namespace)


def _drop_kernel_memory(spec: dict[str, Any], where: Path) -> None:
    """Leave ``linux.resources.memory.kernel``/``kernelTCP`` out, with a warning, as runc does on cgroup v2.

    The guest is cgroup v2, where crun would refuse the whole container for them.
    """
    linux = spec.get("linux")
    if isinstance(linux, dict) and isinstance(linux.get("resources"), dict):
        linux["resources"] = without_kernel_memory(linux["resources"], f"{where}: linux.resources")


def parse_json_object(text: str, prefix: str, error: type[CapsaError]) -> dict[str, Any]:
    """A JSON object from user input (config.json, ``exec --process``), or ``error`` in one line.

    Python's parser accepts what JSON does not (NaN, Infinity) and fails in
    ways that are not JSONDecodeError: RecursionError for deep nesting,
    ValueError for an integer of more than 4300 digits.  ``prefix`` goes
    before the message.
    """
    try:
        value = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise error(f"{prefix}not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError:
        raise error(f"{prefix}{_TOO_DEEP}") from None
    except ValueError as exc:
        raise error(f"{prefix}not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise error(f"{prefix}expected a JSON object")
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise error(f"{prefix}{_TOO_DEEP}")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (a loop, not recursion: the input is hostile)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def host_namespace_ids(kind: str) -> set[NamespaceId]:
    """The host's namespace of ``kind`` (a /proc/<pid>/ns name): init's and ours.

    Ours is the runtime's, which the engine means by an absent entry; init's
    is the host's own.  A file that cannot be read (/proc/1 of another user
    for a non-root caller) is left out.
    """
    found: set[NamespaceId] = set()
    for pid in ("1", "self"):
        with contextlib.suppress(OSError):
            info = os.stat(f"/proc/{pid}/ns/{kind}")
            found.add((info.st_dev, info.st_ino))
    return found


def is_pod_namespace(path: str, pod_pids: frozenset[int]) -> bool:
    """True for ``/proc/<pid>/ns/<kind>`` of a pod's sandbox PID."""
    parts = Path(path).parts
    return (
        len(parts) == 5
        and parts[:2] == ("/", "proc")
        and parts[3] == "ns"
        and parts[2].isdigit()
        and int(parts[2]) in pod_pids
    )


def check_namespaces(
    spec: dict[str, Any],
    where: Path,
    host_ids: Callable[[str], set[NamespaceId]] = host_namespace_ids,
    stat: Callable[[str], os.stat_result] = os.stat,
    pod_pids: frozenset[int] = frozenset(),
    kind_of: Callable[[str], str | None] | None = None,
) -> Path | None:
    """Refuse the host's network, PID or IPC namespace; return the network namespace path, if any.

    InvalidArgument for a namespace the VM cannot honour, BundleError for a
    malformed entry or a path that does not exist.
    """
    linux = spec.get("linux")
    if linux is None:
        linux = {}
    if not isinstance(linux, dict):
        raise BundleError(f"{where}: linux: expected an object")
    namespaces = linux.get("namespaces")
    if namespaces is None:
        namespaces = []
    if not isinstance(namespaces, list):
        raise BundleError(f"{where}: linux.namespaces: expected an array")
    paths: dict[str, str] = {}
    for index, entry in enumerate(namespaces):
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise BundleError(f"{where}: linux.namespaces[{index}]: expected an object with a type")
        path = entry.get("path", "")
        if not isinstance(path, str):
            raise BundleError(f"{where}: linux.namespaces[{index}].path: expected a string")
        if entry["type"] in paths:
            # config-linux.md "Namespaces": duplicated types MUST be an error.
            raise BundleError(f"{where}: linux.namespaces[{index}].type: a second {entry['type']!r} namespace")
        paths[entry["type"]] = path
    for kind, path in paths.items():
        # runc refuses a path to a namespace of another type; so do we, where
        # the path is the host's (a pod's paths mean the guest's namespaces).
        if not path or is_pod_namespace(path, pod_pids):
            continue
        try:
            actual = (kind_of or namespace_type)(path)
        except OSError as exc:
            raise BundleError(f"{where}: {kind} namespace {path}: {os.strerror(exc.errno or 0)}") from exc
        if actual != kind:
            what = f"a {actual} namespace" if actual else "not a namespace"
            raise BundleError(f"{where}: linux.namespaces: {kind} namespace path {path} is {what}")
    network: Path | None = None
    for kind, (proc_name, label) in _VM_NAMESPACES.items():
        refusal = (
            f"the host's {label} namespace cannot be shared with a container in a VM "
            f"(use a {label} namespace of its own)"
        )
        if kind not in paths:
            raise InvalidArgument(refusal)
        path = paths[kind]
        if not path or is_pod_namespace(path, pod_pids):
            continue
        try:
            info = stat(path)
        except OSError as exc:
            raise BundleError(f"{where}: {kind} namespace {path}: {os.strerror(exc.errno or 0)}") from exc
        if (info.st_dev, info.st_ino) in host_ids(proc_name):
            raise InvalidArgument(refusal)
        if kind == "network":
            network = Path(path)
    return network


def _check_process(spec: dict[str, Any], where: Path) -> None:
    """What the schema leaves optional that ``create`` needs; the spec's types are checked already."""
    process = spec.get("process")
    if process is None:
        raise BundleError(f"{where}: process: missing (the container needs a process to run)")
    check_process_fields(process, f"{where}: process.", BundleError)
    if not process["args"][0]:
        raise BundleError(f"{where}: process.args[0]: empty")


def check_process_fields(process: dict[str, Any], prefix: str, error: type[CapsaError]) -> None:
    """config.md "Process" beyond its schema: ``args`` non-empty (REQUIRED on Linux), ``cwd`` absolute.

    Shared by the bundle's process and ``exec --process``, after their
    schema check (runtime/schema), which made sure of the types; ``prefix``
    goes before the field's name in the message, ``error`` is what to raise.
    """
    if not process.get("args"):
        raise error(f"{prefix}args: expected a non-empty array of strings")
    if not process.get("cwd", "/").startswith("/"):
        raise error(f"{prefix}cwd: expected an absolute path")


def _rootfs_path(spec: dict[str, Any], bundle: Path, where: Path) -> Path:
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise BundleError(f"{where}: root.path: missing")
    rootfs = Path(root["path"])
    if not rootfs.is_absolute():
        rootfs = bundle / rootfs
    if not rootfs.is_dir():
        raise BundleError(f"{where}: root.path: {rootfs}: no such directory")
    return rootfs


def resolve_in_rootfs(rootfs: Path, path: str) -> Path | None:
    """Resolve an absolute container path on the host, symlinks confined to rootfs.

    Absolute symlink targets are taken relative to the rootfs, as they would
    be inside the container.  Returns None when the path does not exist.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = rootfs.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if not candidate.exists() and not candidate.is_symlink():
            return None
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def _check_executable(process: dict[str, Any], rootfs: Path) -> None:
    """Fail early, as runc's ``exec: "x": executable file not found in $PATH``."""
    arg0: str = process["args"][0]
    if "/" in arg0:
        cwd = process.get("cwd", "/")
        full = posixpath.join(cwd, arg0)
        target = resolve_in_rootfs(rootfs, full)
        if target is None or not target.is_file():
            raise BundleError(f"exec: {arg0!r}: no such file or directory in the container's rootfs")
        return
    path_value = DEFAULT_PATH
    for entry in process.get("env", []):
        if entry.startswith("PATH="):
            path_value = entry[len("PATH=") :]
    for directory in path_value.split(":"):
        if not directory.startswith("/"):
            continue
        target = resolve_in_rootfs(rootfs, posixpath.join(directory, arg0))
        if target is not None and target.is_file():
            return
    raise BundleError(f"exec: {arg0!r}: executable file not found in $PATH")
