"""The state store: one directory per container under the state root.

``<root>/<id>/`` holds ``state.json`` (written atomically: a temporary file
renamed over the old one) and the logs of the container's VM.
Creating the directory is the claim on the ID: ``mkdir`` either makes it or
fails because another container already holds that ID.  An flock on
``<root>/<id>/lock`` serialises the invocations that change one container.

The VM's sockets cannot live there: a unix socket's path holds at most 107
bytes (unix(7), ``sun_path``), and engines choose the root and the ID
(Docker's ``/run/docker/runtime-runc/moby/<64 hex>`` alone is 95 bytes;
runc accepts roots and IDs of any length).  Each container's sockets live
in ``/run/capsa-vm/<key>/`` instead (:meth:`StateStore.socket_dir`), where
the key is a hash of the state directory's absolute path: every process
that knows the root and the ID finds it, and no root or ID makes it longer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capsa.dirs import ensure_dir
from capsa.errors import CapsaError, ContainerExists, ContainerNotFound
from capsa.runtime.ids import validate_id
from capsa.runtime.sockets import SOCKET_ROOT_PATH, socket_key

DEFAULT_ROOT = Path("/run/capsa")
STATE_FILE = "state.json"

#: Where every container's socket directory lives (runtime/sockets.py).
SOCKET_ROOT = Path(SOCKET_ROOT_PATH)
#: In each socket directory: a symbolic link to its state directory.
OWNER_LINK = "state"

#: How long a state directory without state.json counts as a create at work.
CLAIM_GRACE_SECONDS = 5.0


class Status:
    """OCI runtime-spec states (runtime.md, "State")."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"


@dataclass
class ContainerState:
    id: str
    bundle: str
    rootfs: str
    status: str = Status.CREATING
    pid: int = 0  # the host process standing for the container: its capsa-shim
    pid_start: int = 0  # its start time (runtime/pids.py), against PID reuse
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    owner: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    proxy_pid: int = 0
    proxy_start: int = 0
    # The `capsa create` at work while the status is "creating": if it died,
    # the container never came to be (runtime/container.current_status).
    creator_pid: int = 0
    creator_start: int = 0
    hypervisor_pid: int = 0
    virtiofsd_pid: int = 0
    # The host cgroup made for the VM's processes (runtime/hostcgroup.HostCgroup.to_dict), removed by delete.
    host_cgroup: dict[str, Any] = field(default_factory=dict)
    # The engine's network namespace the VM's NICs are in ("" for none): where
    # delete sweeps after a proxy that died without taking them down.
    netns: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ContainerState:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StateStore:
    def __init__(self, root: Path, socket_root: Path = SOCKET_ROOT) -> None:
        # Absolute, so the helpers it starts (whatever their cwd) and every
        # later command derive the same socket directory from it.
        self.root = Path(os.path.abspath(root))
        self.socket_root = socket_root

    def dir(self, container_id: str) -> Path:
        return self.root / validate_id(container_id)

    def socket_dir(self, container_id: str) -> Path:
        """Where the container's VM keeps its sockets (see the module's docstring)."""
        return self.socket_root / socket_key(self.dir(container_id))

    def claim(self, container_id: str) -> Path:
        """Make the container's state directory and its socket directory; fail if the ID is taken.

        A socket directory already there belongs to an earlier container of
        the same root and ID that was never deleted (its state directory is
        gone, or this claim would have failed): what it holds is stale.
        """
        path = self.dir(container_id)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        except OSError as exc:
            # FileExistsError too: the root is there but is not a directory.
            raise CapsaError(f"cannot use {self.root} as the state root: {exc.strerror}") from exc
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(f"container with id {container_id!r} already exists") from None
        except OSError as exc:
            raise CapsaError(f"cannot create state directory {path}: {exc.strerror}") from exc
        sockets = self.socket_dir(container_id)
        try:
            ensure_dir(self.socket_root, 0o711)
            shutil.rmtree(sockets, ignore_errors=True)
            sockets.mkdir(mode=0o700)
            os.chmod(sockets, 0o700)
            # For people and sweeps: whose sockets these are.
            os.symlink(path, sockets / OWNER_LINK)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise CapsaError(f"cannot create socket directory {sockets}: {exc.strerror}") from exc
        return path

    def save(self, state: ContainerState) -> None:
        """Replace the container's state.json at once; CapsaError (say, a full filesystem) leaves the old one."""
        path = self.dir(state.id)
        try:
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".state.")
        except OSError as exc:
            raise CapsaError(f"cannot save the state of container {state.id!r} in {path}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "w") as f:
                f.write(state.to_json())
            os.replace(tmp, path / STATE_FILE)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise CapsaError(f"cannot save the state of container {state.id!r} in {path}: {exc.strerror}") from exc
            raise

    def load(self, container_id: str) -> ContainerState:
        path = self.dir(container_id) / STATE_FILE
        try:
            return ContainerState.from_json(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            if self.dir(container_id).is_dir() and not self._being_claimed(container_id):
                # A create killed between its claim and its first save: the
                # ID is taken by nothing, and delete must be able to free it.
                return ContainerState(id=container_id, bundle="", rootfs="", status=Status.STOPPED)
            raise ContainerNotFound(f"container {container_id!r} does not exist") from None
        except (OSError, ValueError, TypeError) as exc:
            raise CapsaError(f"{path}: unreadable state: {exc}") from exc

    def _being_claimed(self, container_id: str) -> bool:
        """A claim younger than a few seconds may still be about to write its first state."""
        try:
            age = time.time() - self.dir(container_id).stat().st_mtime
        except OSError:
            return False
        return age < CLAIM_GRACE_SECONDS

    def remove(self, container_id: str) -> None:
        """Remove the container's directory, but never through a mount point.

        ``shared/`` and ``volumes/`` hold bind mounts of the container's
        rootfs and volumes in the proxy's own mount namespace only (a slave:
        nothing in it reaches the host); should one ever be visible here,
        deleting through it would delete the user's files.
        """
        path = self.dir(container_id)
        for dirpath, dirnames, _ in os.walk(path):
            if any(os.path.ismount(os.path.join(dirpath, name)) for name in dirnames):
                raise CapsaError(f"{dirpath} holds a mount point: not removing {path}")
        shutil.rmtree(self.socket_dir(container_id), ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """Hold the container's lock for the duration of one operation."""
        path = self.dir(container_id)
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            raise ContainerNotFound(f"container {container_id!r} does not exist") from None
        except OSError as exc:
            raise CapsaError(f"cannot lock {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
