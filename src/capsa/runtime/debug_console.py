"""``capsa debug-console``: a shell in the guest, outside the container, for diagnosis.

The guest image has no shell (python3.11 and crun, nothing else: a shell in
every guest would be one more tool for whoever breaks out of a container),
and is not grown for this.  The host's static busybox (Debian's
busybox-static, ``/bin/busybox``) reaches the guest instead, read-only,
through the rootfs share every sandbox already has: when the configuration
allows the debug console (``[runtime] debug_console``), the proxy binds it
at :data:`SHARE_TARGET` in the share as it starts the sandbox
(:func:`tools_bind`), which the guest sees at :data:`GUEST_BUSYBOX` once
its first container mounted the share.  No copy is made, and the bind
lives in the proxy's mount namespace (gone with it).  A container never
sees it: it gets only its own ``ID/rootfs`` of the share.

The agent runs the command (DebugConsole, agent.proto) in the guest's own
namespaces, with a pty when the caller's stdin is a terminal, else pipes;
``capsa debug-console`` then relays it like an exec (container_id ``""``).
Three gates, all of which must say yes: the caller is root; the
configuration allows it now, and allowed it when the sandbox was created
(the agent refuses DebugConsole for the life of a sandbox created
without it); the agent policy does not deny ``DebugConsole``.

Pure: the command line and the environment are data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from capsa.config import RuntimeConfig
from capsa.errors import CapsaError
from capsa.runtime.mounts import GUEST_SHARE_DIR, HostBind

#: The shell the host supplies (Debian's busybox-static): statically linked, so
#: it runs in a guest without the host's libraries.
HOST_BUSYBOX = Path("/bin/busybox")
#: Where it is in the rootfs share.  A ':' is in no container ID (runtime/ids.py),
#: so no container's directory of the share can be named so.
SHARE_TARGET = "capsa:debug/busybox"
GUEST_BUSYBOX = f"{GUEST_SHARE_DIR}/{SHARE_TARGET}"
#: The prompt, so that nobody takes the guest for the container or the host.
PROMPT = r"debug-console:\w# "


class DebugConsoleRefused(CapsaError):
    """The caller or the configuration may not open a debug console."""


def tools_bind(source: Path = HOST_BUSYBOX) -> HostBind:
    """The read-only bind of the host's busybox into the rootfs share."""
    return HostBind(
        source=source,
        target=SHARE_TARGET,
        readonly=True,
        directory=False,
        recursive=False,
        propagation="rprivate",
    )


def check_allowed(config: RuntimeConfig, euid: int) -> None:
    """The host's two gates: root only, and only when the configuration says so."""
    if euid != 0:
        raise DebugConsoleRefused("debug-console: only root may open a debug console")
    if not config.debug_console:
        raise DebugConsoleRefused(
            "debug-console: the configuration does not allow it ([runtime] debug_console = false)"
        )


def console_argv(command: Sequence[str]) -> list[str]:
    """What the guest runs: busybox's shell, interactive without a command.

    With one, the shell execs it: busybox-static's shell runs its applets
    without links (FEATURE_SH_STANDALONE), and anything else the guest has
    is found in PATH (``python3.11``, ``crun``).  Its status is the command's.
    """
    if not command:
        return [GUEST_BUSYBOX, "sh"]
    return [GUEST_BUSYBOX, "sh", "-c", 'exec "$@"', "sh", *command]


def console_env(terminal: bool, term: str | None) -> list[str]:
    """The environment over the agent's PATH and HOME: the caller's TERM on a terminal, and the prompt."""
    env = [f"PS1={PROMPT}"]
    if terminal:
        env.append(f"TERM={term or 'vt100'}")
    return env
