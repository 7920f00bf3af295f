"""``containerd-shim-capsa-v2``: containerd's shim v2 command-line contract.

containerd (1.6) runs the binary named for the runtime (``io.containerd.capsa.v2``
→ ``containerd-shim-capsa-v2``, found on its PATH) with Go-style flags::

    -namespace NS -address A -publish-binary P -id ID [-debug] start
    -namespace NS -address A -publish-binary P -id ID -bundle B [-debug] delete

``start`` runs in the bundle directory with ``TTRPC_ADDRESS`` (containerd's
ttrpc socket, for events) in the environment and the runtime options on
stdin.  It starts the long-lived server (this program without an action),
prints the server's socket address (``unix:///run/capsa-v2/s/<hash>``), writes
it to ``address`` in the bundle, and exits.  A CRI container whose
annotations name a sandbox joins that sandbox's shim instead: ``start``
prints the address in the sandbox's bundle, so every container of a pod is
served by one shim and runs in one VM.

``delete`` cleans up after a shim that died (its VM died with it:
PR_SET_PDEATHSIG; its mounts lived in its own namespace) and prints a
``DeleteResponse``.  The server logs to the ``log`` FIFO that containerd
reads in the bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from capsa.config import Config, load_config
from capsa.dirs import ensure_dir
from capsa.errors import CapsaError
from capsa.protocols.containerd.events import task_pb2 as events
from capsa.protocols.containerd.task.v2 import shim_pb2 as pb
from capsa.runtime import daemon
from capsa.runtime.hostcgroup import HostCgroup
from capsa.runtime.ready import ReadyPipe, set_process_name
from capsa.runtime.sandbox import sweep_clone_memory
from capsa.shim.v2.events import Publisher
from capsa.shim.v2.pod import HOST_CGROUP_FILE, Pod, Process
from capsa.shim.v2.task import TaskService, exit_event, register
from capsa.shim.v2.wire import TTRPC_ADDRESS_ENV, timestamp
from capsa.storage.shared import enter_mount_namespace
from capsa.ttrpc.server import Server

log = logging.getLogger("capsa.shimv2")

#: Where the shims' sockets and VM state directories live (short: unix socket paths).
SOCKET_DIR = Path("/run/capsa-v2/s")
STATE_DIR = Path("/run/capsa-v2/pods")
ADDRESS_FILE = "address"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
#: SIGKILL's status: what a task whose shim vanished is reported as.
KILLED_STATUS = 128 + signal.SIGKILL


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    # Go's flag package: -flag value, --flag value, -flag=value.
    parser = argparse.ArgumentParser(prog="containerd-shim-capsa-v2")
    for flag in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        parser.add_argument(f"-{flag}", f"--{flag}", default="")
    parser.add_argument("-debug", "--debug", action="store_true")
    parser.add_argument("-v", "--version", action="store_true")
    parser.add_argument("-ready-fd", "--ready-fd", type=int, default=-1)
    parser.add_argument("action", nargs="?", default="", choices=("", "start", "delete"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from capsa import __version__

        print(f"containerd-shim-capsa-v2:\n  Version: {__version__}")
        return 0
    try:
        if args.action == "start":
            print(start(args))
            return 0
        if args.action == "delete":
            sys.stdout.buffer.write(delete(args).SerializeToString())
            return 0
    except CapsaError as exc:
        print(f"containerd-shim-capsa-v2: {exc}", file=sys.stderr)
        return 1
    return serve(args)


def shim_key(args: argparse.Namespace, task_id: str) -> str:
    """One shim per (containerd, namespace, task): hashed so the socket path stays short."""
    return hashlib.sha256(f"{args.address}\0{args.namespace}\0{task_id}".encode()).hexdigest()[:32]


def start(args: argparse.Namespace) -> str:
    bundle = Path.cwd()
    annotations = _annotations(bundle)
    if annotations.get(CONTAINER_TYPE) == "container" and annotations.get(SANDBOX_ID):
        # A pod's later container: its sandbox's shim serves it, in the pod's VM.
        sandbox_bundle = bundle.parent / annotations[SANDBOX_ID]
        try:
            address = (sandbox_bundle / ADDRESS_FILE).read_text().strip()
        except OSError as exc:
            raise CapsaError(f"the pod's sandbox {annotations[SANDBOX_ID]} has no shim: {exc}") from exc
        (bundle / ADDRESS_FILE).write_text(address)
        return address
    key = shim_key(args, args.id)
    ensure_dir(SOCKET_DIR, 0o700)
    socket_path = SOCKET_DIR / key
    server_args = ["-namespace", args.namespace, "-address", args.address, "-id", args.id, "-socket", str(socket_path)]
    if args.publish_binary:
        server_args += ["-publish-binary", args.publish_binary]
    if args.debug:
        server_args.append("-debug")
    started = daemon.start("capsa.shim.v2", server_args, output=bundle / "shim.out", timeout=30)
    address = f"unix://{socket_path}"
    (bundle / ADDRESS_FILE).write_text(address)
    log.debug("shim %d serves %s", started.pid, address)
    return address


def delete(args: argparse.Namespace) -> pb.DeleteResponse:
    """After a shim's death: remove what it left; its tasks count as killed."""
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    key = shim_key(args, args.id)
    with contextlib.suppress(OSError):
        (SOCKET_DIR / key).unlink()
    # The dead shim's VM dies with it (PR_SET_PDEATHSIG); then the pod's host cgroup can go.
    HostCgroup.load(STATE_DIR / key / HOST_CGROUP_FILE).remove()
    sweep_clone_memory(STATE_DIR / key)
    shutil.rmtree(STATE_DIR / key, ignore_errors=True)
    with contextlib.suppress(OSError):
        (bundle / ADDRESS_FILE).unlink()
    return pb.DeleteResponse(exit_status=KILLED_STATUS, exited_at=timestamp(time.time_ns()))


def serve(args: argparse.Namespace) -> int:
    set_process_name("capsa-shim-v2")
    ready = ReadyPipe(args.ready_fd)
    try:
        _log_to_fifo(Path.cwd() / "log", args.debug)
        config = load_config(None)
        # Before any thread: our rootfs mounts and binds live in a namespace of our own.
        enter_mount_namespace()
    except CapsaError as exc:
        ready.fail(str(exc))
        return 1
    return asyncio.run(_serve(args, config, ready))


async def _serve(args: argparse.Namespace, config: Config, ready: ReadyPipe) -> int:
    key = shim_key(args, args.id)
    socket_path = Path(args.socket) if args.socket else SOCKET_DIR / key
    publisher = Publisher(os.environ.get(TTRPC_ADDRESS_ENV, ""), args.namespace)
    done = asyncio.Event()
    pod: Pod

    def on_exit(process: Process) -> None:
        publisher.publish(exit_event(process, pod.pid))

    def on_oom(container_id: str) -> None:
        publisher.publish(events.TaskOOM(container_id=container_id))

    pod = Pod(config, args.id, STATE_DIR / key, on_exit, debug=args.debug, on_oom=on_oom)
    server = Server()
    register(server, TaskService(pod, publisher, done.set))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)
    with contextlib.suppress(OSError):
        socket_path.unlink()
    try:
        listener = await server.serve_unix(str(socket_path))
    except OSError as exc:
        ready.fail(f"cannot listen on {socket_path}: {exc.strerror}")
        return 1
    publisher.start()
    ready.ok()
    try:
        await done.wait()
    finally:
        listener.close()
        await pod.shutdown()
        await publisher.drain()
        await publisher.aclose()
        with contextlib.suppress(OSError):
            socket_path.unlink()
        shutil.rmtree(STATE_DIR / key, ignore_errors=True)
    return 0


def _annotations(bundle: Path) -> dict[str, str]:
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CapsaError(f"{bundle}/config.json: {exc}") from exc
    annotations = spec.get("annotations") or {}
    return {str(k): str(v) for k, v in annotations.items()}


def _log_to_fifo(path: Path, debug: bool) -> None:
    """containerd copies what we write to the ``log`` FIFO into its own log."""
    root = logging.getLogger("capsa")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no reader (not run by containerd): no log
    stream = os.fdopen(fd, "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("time=%(asctime)s level=%(levelname)s msg=%(message)r"))
    root.addHandler(handler)
