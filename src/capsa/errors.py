"""The one exception tree of capsa.

Every error that reaches a user is a :class:`CapsaError`; foreign exceptions
(OSError, json, protobuf, qemu.qmp) are converted at the edge where they
happen, chained with ``from``.  The CLI turns a CapsaError into one line on
stderr and :attr:`CapsaError.exit_code`.
"""

from __future__ import annotations


class CapsaError(Exception):
    """Base of every error capsa reports to its user."""

    exit_code: int = 1


class ConfigError(CapsaError):
    """The configuration file is missing, malformed, or has a bad value."""


class InvalidArgument(CapsaError):
    """The caller passed something unusable: a bad ID, flag or path."""


class BundleError(CapsaError):
    """The OCI bundle or its config.json cannot be used."""


class ContainerNotFound(CapsaError):
    """No container with that ID exists under the state root."""


class ContainerExists(CapsaError):
    """A container with that ID already exists under the state root."""


class WrongState(CapsaError):
    """The container is not in a state that allows the operation."""


class HypervisorError(CapsaError):
    """QEMU (or another VMM) could not be started, driven or stopped."""


class GuestImageError(CapsaError):
    """The guest kernel or image is missing or unusable."""


class AgentError(CapsaError):
    """The agent in the guest refused a request or could not be reached."""


class AgentGone(AgentError):
    """The agent's channel closed under a request: the VM (or its proxy) went away."""


class StorageError(CapsaError):
    """Sharing a filesystem with the guest (virtio-fs, 9p) failed."""


class HookError(CapsaError):
    """An OCI hook (config.md "POSIX-platform Hooks") could not run or failed."""


class NetworkError(CapsaError):
    """The sandbox's NIC could not be joined to the engine's network namespace (or parted from it)."""
