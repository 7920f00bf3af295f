"""What the agent is told at start: the kernel command line, or argv on a host.

In the guest the host speaks through the kernel command line (shared
convention of capsa's parts):

- ``capsa.channel=serial|vsock`` (default serial): the agent channel.
- ``capsa.vsock_port=N`` (default 1024): the AF_VSOCK port to listen on.
- ``capsa.debug=1``: log at debug level to the console (else warnings).
- ``capsa.template=1``: this VM is booted to be saved as a VM template
  (:mod:`capsa.hypervisor.template`): before serving, the agent loads what
  its clones would otherwise load on first use (the network modules).

Outside a guest (tests on the host, not PID 1) argv says the same with
``--listen unix:PATH``, ``--crun PATH`` and friends.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsa.errors import InvalidArgument

CHANNELS = ("serial", "vsock", "unix")
DEFAULT_VSOCK_PORT = 1024
AGENT_PORT_NAME = "capsa.agent"


@dataclass(frozen=True)
class AgentOptions:
    channel: str = "serial"
    vsock_port: int = DEFAULT_VSOCK_PORT
    listen_path: str = ""  # the unix socket, channel "unix" only
    debug: bool = False
    crun: str = "/usr/bin/crun"
    crun_root: str = "/run/crun"
    # Bundles, console sockets and crun logs live under here.
    state_dir: str = "/run/capsa"
    port_name: str = AGENT_PORT_NAME
    # PID 1 in a guest mounts, reaps every orphan and powers off at the end;
    # on a host the agent does none of that.
    guest: bool = True
    # Booted to be saved as a template: preload for the clones.
    template: bool = False


def split_kernel_cmdline(text: str) -> dict[str, str]:
    """``key=value`` words of /proc/cmdline; a bare word maps to "".

    Double quotes group a value with spaces, as the kernel's own parser
    (lib/cmdline.c next_arg) allows; a later word overrides an earlier one.
    """
    params: dict[str, str] = {}
    word: list[str] = []
    quoted = False
    for char in text.strip() + " ":
        if char == '"':
            quoted = not quoted
        elif char.isspace() and not quoted:
            if word:
                key, _, value = "".join(word).partition("=")
                params[key] = value
                word = []
        else:
            word.append(char)
    return params


def from_kernel_cmdline(text: str) -> AgentOptions:
    params = split_kernel_cmdline(text)
    channel = params.get("capsa.channel", "serial") or "serial"
    if channel not in ("serial", "vsock"):
        raise InvalidArgument(f"capsa.channel={channel!r}: expected serial or vsock")
    raw_port = params.get("capsa.vsock_port", str(DEFAULT_VSOCK_PORT))
    try:
        port = int(raw_port)
    except ValueError:
        port = -1
    if not 0 < port < 2**32:
        raise InvalidArgument(f"capsa.vsock_port={raw_port!r}: expected a port number")
    debug = _flag(params.get("capsa.debug", "0"))
    template = _flag(params.get("capsa.template", "0"))
    return AgentOptions(channel=channel, vsock_port=port, debug=debug, template=template)


def _flag(value: str) -> bool:
    return value not in ("0", "", "false", "no", "off")


def from_argv(argv: list[str]) -> AgentOptions:
    """Options for running on a host (not PID 1): tests drive the real service."""
    import argparse

    parser = argparse.ArgumentParser(prog="capsa-agent", description="capsa guest agent (host mode)")
    parser.add_argument("--listen", required=True, help="unix:PATH, or vsock:PORT")
    parser.add_argument("--crun", default="/usr/bin/crun", help="the crun binary")
    parser.add_argument("--crun-root", default="/run/crun", help="crun's --root")
    parser.add_argument("--state-dir", default="/run/capsa", help="bundles, console sockets, logs")
    parser.add_argument("--debug", action="store_true", help="log at debug level to stderr")
    args = parser.parse_args(argv)
    scheme, _, where = str(args.listen).partition(":")
    if scheme == "unix" and where:
        return AgentOptions(
            channel="unix",
            listen_path=where,
            debug=bool(args.debug),
            crun=str(args.crun),
            crun_root=str(args.crun_root),
            state_dir=str(args.state_dir),
            guest=False,
        )
    if scheme == "vsock" and where.isdigit():
        return AgentOptions(
            channel="vsock",
            vsock_port=int(where),
            debug=bool(args.debug),
            crun=str(args.crun),
            crun_root=str(args.crun_root),
            state_dir=str(args.state_dir),
            guest=False,
        )
    parser.error(f"--listen {args.listen!r}: expected unix:PATH or vsock:PORT")
    raise AssertionError("unreachable")  # parser.error exits
