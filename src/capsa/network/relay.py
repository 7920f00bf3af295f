"""The loopback relay: connections to localhost in the engine's namespace, carried to the guest's loopback.

Why, and the rules that bring the connections here: :mod:`capsa.network.loopback`.
The relay lives in the VM's owner (capsa-proxy, or the shim v2's pod
process), which already holds the agent connection:

* :func:`listen_and_redirect`, in a thread inside the namespace
  (:func:`capsa.network.netns.run_in_netns`): a listening socket on
  127.0.0.1 and one on ``::1``, ports the kernel picks (a socket belongs to
  the namespace it was made in, whoever uses it later), and the NAT rules
  that send every loopback TCP connection of the namespace to them;
* :meth:`LoopbackRelay.serve`, on the event loop: each accepted connection's
  original port (``SO_ORIGINAL_DST``) is opened on the guest's loopback
  (agent ``OpenTcpStream``), and bytes are pumped both ways
  (``WriteTcpStream``/``ReadTcpStream``), a half-close passed on as one
  (``CloseTcpStream`` ``write_only``, a FIN to the host's peer).  A port
  nothing listens on in the guest, or a connection the guest resets, is
  reset on the host side (``SO_LINGER`` 0): the one who dialled reads
  ECONNRESET, as promptly as runc's refused connection;
* :func:`remove_rules`, back in the namespace, when the VM leaves it.

The listeners are bound to the namespace's loopback only: only processes in
that namespace (the engine's port-forwarding, root) reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Sequence
from typing import Protocol

from capsa.errors import CapsaError, NetworkError
from capsa.network.loopback import FAMILIES, Family, install_rules, original_port, removal_rules

log = logging.getLogger("capsa.network")

#: Where the iptables tools are looked for after PATH (an engine may start us with a short one).
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
TOOL_TIMEOUT = 30.0
#: Bytes per WriteTcpStream/ReadTcpStream (well under ttrpc's 4 MiB message limit).
CHUNK = 65536
LISTEN_BACKLOG = 128


class StreamAgent(Protocol):
    """The agent calls the relay makes (capsa.runtime.agent_client.AgentClient has them)."""

    async def open_tcp_stream(self, port: int) -> int: ...

    async def write_tcp_stream(self, stream_id: int, data: bytes) -> None: ...

    async def read_tcp_stream(self, stream_id: int, size: int = CHUNK) -> bytes: ...

    async def close_tcp_stream(self, stream_id: int, write_only: bool = False) -> None: ...


Listeners = list[tuple[Family, socket.socket]]


def _tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *TOOL_DIRS])
    return shutil.which(name, path=path)


def _run(argv: list[str], text: str = "") -> str:
    try:
        done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{os.path.basename(argv[0])}: {exc}") from exc
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise NetworkError(f"{os.path.basename(argv[0])} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout


def listen_and_redirect() -> Listeners:
    """In the namespace: the relay's listeners, and the rules that bring its loopback TCP to them.

    A family whose loopback address the namespace lacks (IPv6 turned off)
    is left out.  All or nothing: on failure nothing is left and the error
    says what failed (a host without iptables is told to install it).
    """
    made: Listeners = []
    try:
        for family in FAMILIES:
            sock = socket.socket(family.af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.bind((family.address, 0))
                sock.listen(LISTEN_BACKLOG)
            except OSError as exc:
                sock.close()
                log.info("no %s loopback relay in the namespace (%s %s)", family.name, family.address, exc.strerror)
                continue
            made.append((family, sock))
            restore = _tool(family.restore)
            if restore is None:
                raise NetworkError(f"{family.restore} not found: install iptables (scripts/setup.sh does)")
            _run([restore, "--noflush"], install_rules(family, sock.getsockname()[1]))
    except BaseException:
        remove_rules([family for family, _ in made])
        for _, sock in made:
            sock.close()
        raise
    return made


def remove_rules(families: Sequence[Family] = FAMILIES) -> list[str]:
    """In the namespace: remove the relay's rules of ``families``; the problems as messages, never raises."""
    problems: list[str] = []
    for family in families:
        save, restore = _tool(family.save), _tool(family.restore)
        if save is None or restore is None:
            continue  # without the tools no rule of ours was ever made
        try:
            text = removal_rules(_run([save, "-t", "nat"]))
            if text is not None:
                _run([restore, "--noflush"], text)
        except NetworkError as exc:
            problems.append(f"cannot remove the {family.name} loopback relay's rules: {exc}")
    return problems


def _linger_zero(sock: socket.socket) -> None:
    """Make the socket's close a RST (SO_LINGER on, 0 s: socket(7)): the peer reads ECONNRESET, not an end of data."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset(sock: socket.socket) -> None:
    _linger_zero(sock)
    sock.close()


class LoopbackRelay:
    """The relay of one network namespace's loopback to one VM's (see the module docstring)."""

    def __init__(self, agent: StreamAgent) -> None:
        self._agent = agent
        self._listeners: Listeners = []
        self._serving: asyncio.Task[None] | None = None

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(family for family, _ in self._listeners)

    def describe(self) -> str:
        """``127.0.0.1:40123, [::1]:40125``, for logs."""
        return ", ".join(
            f"{'[' + f.address + ']' if f.af == socket.AF_INET6 else f.address}:{s.getsockname()[1]}"
            for f, s in self._listeners
        )

    def serve(self, listeners: Listeners) -> None:
        """Accept on ``listeners`` (from :func:`listen_and_redirect`) until :meth:`close`; they are the relay's now."""
        self._listeners = listeners
        self._serving = asyncio.ensure_future(self._serve())

    async def close(self) -> None:
        """Stop accepting and drop every relayed connection (with a RST); safe to call twice."""
        serving, self._serving = self._serving, None
        if serving is not None:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        listeners, self._listeners = self._listeners, []
        for _, sock in listeners:
            sock.close()

    async def _serve(self) -> None:
        # Every connection is a child of this group: cancelling the serving task ends them all.
        async with asyncio.TaskGroup() as connections:
            for family, sock in self._listeners:
                connections.create_task(self._accept(family, sock, connections))

    async def _accept(self, family: Family, listener: socket.socket, connections: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: the connection waits in the backlog
                log.warning("loopback relay (%s): cannot accept: %s", family.name, exc.strerror)
                await asyncio.sleep(0.5)
                continue
            connections.create_task(self._guarded(family, conn))

    async def _guarded(self, family: Family, conn: socket.socket) -> None:
        # A child of the serving group must not fail: that would end every other connection.
        try:
            await self._forward(family, conn)
        except Exception as exc:
            log.error("loopback relay: a connection failed: %r", exc)
            _reset(conn)

    async def _forward(self, family: Family, conn: socket.socket) -> None:
        """One connection, to its end; always closes ``conn``."""
        try:
            port = self._original_port(family, conn)
        except (OSError, NetworkError) as exc:
            # Not redirected (no conntrack entry): nothing to forward it to.
            log.warning("loopback relay: a connection without its original port (%s): reset", exc)
            _reset(conn)
            return
        try:
            stream = await self._agent.open_tcp_stream(port)
        except BaseException as exc:
            _reset(conn)
            if not isinstance(exc, CapsaError):
                raise
            log.info("port %d of the guest: %s", port, exc)
            return
        log.debug("port %d of the guest: connected (stream %d)", port, stream)
        await self._pump(port, stream, conn)

    def _original_port(self, family: Family, conn: socket.socket) -> int:
        """The port the connection was made to, before REDIRECT (conntrack's record of it)."""
        return original_port(family, conn.getsockopt(family.level, family.option, family.size))

    async def _pump(self, port: int, stream: int, conn: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=conn)
        broken: BaseException | None = None
        try:
            try:
                async with asyncio.TaskGroup() as pumps:
                    pumps.create_task(self._to_guest(reader, stream))
                    pumps.create_task(self._to_host(writer, stream))
            except* (CapsaError, OSError) as failures:
                broken = failures.exceptions[0]
                log.info("port %d of the guest: connection broken: %s", port, broken)
        except BaseException as exc:  # cancelled (the VM leaves the namespace), or a bug
            broken = exc
            raise
        finally:
            if broken is None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            else:
                _linger_zero(conn)
                writer.transport.abort()
            if not isinstance(broken, asyncio.CancelledError):
                with contextlib.suppress(CapsaError):
                    await self._agent.close_tcp_stream(stream)

    async def _to_guest(self, reader: asyncio.StreamReader, stream: int) -> None:
        while data := await reader.read(CHUNK):
            await self._agent.write_tcp_stream(stream, data)
        # The host's peer shut its sending side down: so does the guest's end.
        await self._agent.close_tcp_stream(stream, write_only=True)

    async def _to_host(self, writer: asyncio.StreamWriter, stream: int) -> None:
        while data := await self._agent.read_tcp_stream(stream, CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
