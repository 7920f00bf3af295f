"""crun command lines and crun's answers, as pure functions.

The agent drives crun through the OCI runtime command line (runtime-spec
"runtime.md": create, start, kill, delete, plus the runc extensions exec,
pause, resume that crun implements).  Every command gets
``--log=file:PATH --log-format=json`` because crun's stdio during ``create``
and ``exec`` is the container's own stdio: crun's error would otherwise land
in the container's stderr stream instead of in the RPC error the host shows
the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from capsa.errors import BundleError


@dataclass(frozen=True)
class Crun:
    """Where crun is and where it keeps its state."""

    binary: str = "/usr/bin/crun"
    root: str = "/run/crun"

    def base(self, log_file: str) -> list[str]:
        return [self.binary, "--root", self.root, f"--log=file:{log_file}", "--log-format=json"]


def create_argv(
    crun: Crun,
    log_file: str,
    container_id: str,
    bundle: str,
    pid_file: str,
    console_socket: str | None = None,
    no_pivot: bool = False,
) -> list[str]:
    """``crun create``: returns once the container init waits on crun's exec fifo."""
    argv = [*crun.base(log_file), "create", "--bundle", bundle, "--pid-file", pid_file]
    if console_socket is not None:
        argv += ["--console-socket", console_socket]
    if no_pivot:
        # pivot_root(2) fails with EINVAL when the current root is the
        # initramfs (rootfs cannot be unmounted); crun then moves the rootfs
        # over / and chroots instead.  The VM is the isolation boundary.
        argv.append("--no-pivot")
    argv += ["--", container_id]
    return argv


# Every builder ends its options with "--": runc's IDs may begin with "-",
# which crun's getopt would take for an option.


def start_argv(crun: Crun, log_file: str, container_id: str) -> list[str]:
    return [*crun.base(log_file), "start", "--", container_id]


def exec_argv(
    crun: Crun,
    log_file: str,
    container_id: str,
    process_file: str,
    pid_file: str,
    console_socket: str | None = None,
) -> list[str]:
    """``crun exec --detach``: crun exits once the process runs; the agent reaps it."""
    argv = [*crun.base(log_file), "exec", "--process", process_file, "--detach", "--pid-file", pid_file]
    if console_socket is not None:
        argv += ["--console-socket", console_socket]
    argv += ["--", container_id]
    return argv


def kill_argv(crun: Crun, log_file: str, container_id: str, signal: int, all_processes: bool = False) -> list[str]:
    argv = [*crun.base(log_file), "kill"]
    if all_processes:
        argv.append("--all")
    return [*argv, "--", container_id, str(signal)]


def delete_argv(crun: Crun, log_file: str, container_id: str, force: bool = True) -> list[str]:
    argv = [*crun.base(log_file), "delete"]
    if force:
        argv.append("--force")
    return [*argv, "--", container_id]


def pause_argv(crun: Crun, log_file: str, container_id: str) -> list[str]:
    return [*crun.base(log_file), "pause", "--", container_id]


def resume_argv(crun: Crun, log_file: str, container_id: str) -> list[str]:
    return [*crun.base(log_file), "resume", "--", container_id]


def update_argv(crun: Crun, log_file: str, container_id: str, resources_file: str) -> list[str]:
    """``crun update --resources FILE``: new cgroup limits from an OCI ``linux.resources`` JSON.

    The file, not crun's per-value flags: crun reads only the file when one
    is given, and its flags cannot say -1 (unlimited) or every field.
    """
    return [*crun.base(log_file), "update", f"--resources={resources_file}", "--", container_id]


def load_resources(resources_json: bytes) -> dict[str, Any]:
    """Parse the OCI ``linux.resources`` object (config-linux.md "Control groups") the host sent."""
    try:
        resources = json.loads(resources_json)
    except ValueError as exc:
        raise BundleError(f"the resources are not valid JSON: {exc}") from exc
    if not isinstance(resources, dict):
        raise BundleError("the resources must be a JSON object (an OCI linux.resources)")
    return resources


def version_argv(crun: Crun) -> list[str]:
    return [crun.binary, "--version"]


def parse_version(output: str) -> str:
    """``crun version 1.8.1`` (first line of ``crun --version``) -> ``1.8.1``."""
    first = output.strip().splitlines()[0] if output.strip() else ""
    prefix = "crun version "
    return first[len(prefix) :].strip() if first.startswith(prefix) else first.strip()


def error_message(log_text: str, stderr_text: str, command: str, wait_status: str) -> str:
    """The line to show the user for a failed crun command.

    crun's own words are the best explanation ("executable file `nosuch`
    not found in $PATH: No such file or directory"), so the last error
    record of its JSON log wins, then its last stderr line, and only then a
    generic message naming the command and how it ended.
    """
    last_error = ""
    for line in log_text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            last_error = line
            continue
        if isinstance(record, dict) and record.get("level", "error") == "error":
            msg = record.get("msg")
            if isinstance(msg, str) and msg:
                last_error = msg
    if last_error:
        return last_error
    stderr_lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    if stderr_lines:
        return stderr_lines[-1]
    return f"crun {command} failed ({wait_status})"


def load_spec(spec_json: bytes) -> dict[str, Any]:
    """Parse an OCI runtime spec (config.json) the host sent."""
    try:
        spec = json.loads(spec_json)
    except ValueError as exc:
        raise BundleError(f"the OCI spec is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise BundleError("the OCI spec must be a JSON object")
    process = spec.get("process")
    if process is not None and not isinstance(process, dict):
        raise BundleError("the OCI spec's process must be an object")
    return spec


def bundle_config(spec: dict[str, Any], rootfs: str, join_pid: int = 0) -> bytes:
    """The config.json for the guest bundle: :func:`guest_spec` of ``spec``, as JSON."""
    return json.dumps(guest_spec(spec, rootfs, join_pid)).encode()


# OCI namespace type -> its name under /proc/<pid>/ns (namespaces(7)).
_PROC_NS = {"pid": "pid", "ipc": "ipc", "uts": "uts", "mount": "mnt", "user": "user", "cgroup": "cgroup"}


#: The guest's network namespace, where the NICs of the engine's network are
#: (the agent is PID 1): every container's network in the VM.
GUEST_NETNS = "/proc/1/ns/net"


def guest_spec(spec: dict[str, Any], rootfs: str, join_pid: int = 0) -> dict[str, Any]:
    """The engine's spec, made to mean in the guest what it meant on the host.

    - ``root.path`` is the guest rootfs (config.md "Root": may be absolute).
    - ``hooks`` are dropped: config.md "POSIX-platform Hooks" run in the
      runtime namespace, which for capsa is the host; they name host
      binaries (dockerd's libnetwork-setkey, say) the guest does not have.
    - The ``network`` entry joins the guest's own network namespace
      (PID 1's, :data:`GUEST_NETNS`): that is the VM's mirror of the
      network namespace the container has on the host (DESIGN.md 7),
      whether the spec names one (Podman, CNI) or asks for a new one that
      an engine configures between create and start (Docker 28, through
      the shim's namespace; the NIC arrives after crun create).  Without a
      NIC the guest's network is loopback only, as a new namespace would
      be.  The entry stays (with that path) because crun applies
      ``net.*`` sysctls only to a container with a network namespace
      entry, and they then apply to the guest's network.
    - Another entry with a ``path`` joins a host namespace
      (config-linux.md "Namespaces"): the host path means nothing in the
      guest and the container gets a namespace of its own, unless
      ``join_pid`` names the guest process of the pod's sandbox: then the
      container joins that process's namespace of the type, as it would
      have joined the sandbox's on the host.
    - LSM labels (``process.apparmorProfile``, ``process.selinuxLabel``,
      ``linux.mountLabel``) are dropped: the guest kernel has no AppArmor or
      SELinux, and the VM is the security boundary.

    The input is not modified.
    """
    out = dict(spec)
    root = out.get("root")
    out["root"] = {**(root if isinstance(root, dict) else {}), "path": rootfs}
    out.pop("hooks", None)
    process = out.get("process")
    if isinstance(process, dict):
        out["process"] = {k: v for k, v in process.items() if k not in ("apparmorProfile", "selinuxLabel")}
    linux = out.get("linux")
    if isinstance(linux, dict):
        linux = {k: v for k, v in linux.items() if k != "mountLabel"}
        namespaces = linux.get("namespaces")
        if isinstance(namespaces, list):
            kept: list[Any] = []
            for entry in namespaces:
                if isinstance(entry, dict) and entry.get("type") == "network":
                    kept.append({"type": "network", "path": GUEST_NETNS})
                    continue
                if isinstance(entry, dict) and entry.get("path"):
                    proc_name = _PROC_NS.get(str(entry.get("type")))
                    if join_pid and proc_name:
                        entry = {**entry, "path": f"/proc/{join_pid}/ns/{proc_name}"}
                    else:
                        entry = {k: v for k, v in entry.items() if k != "path"}
                kept.append(entry)
            linux["namespaces"] = kept
        out["linux"] = linux
    return out


def load_process(process_json: bytes) -> dict[str, Any]:
    """Parse an OCI "process" object (runtime-spec config.md "Process") for exec."""
    try:
        process = json.loads(process_json)
    except ValueError as exc:
        raise BundleError(f"the process is not valid JSON: {exc}") from exc
    if not isinstance(process, dict):
        raise BundleError("the process must be a JSON object")
    return process


def wants_terminal(process: dict[str, Any] | None) -> bool:
    """runtime-spec config.md "Process": ``terminal`` defaults to false."""
    return bool(process and process.get("terminal") is True)
