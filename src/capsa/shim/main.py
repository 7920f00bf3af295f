"""``capsa-shim``: the host process that stands for one process in the guest.

``capsa-shim --root R --id ID [--exec-id E --process FILE] [--terminal]
[--console-socket PATH] [--new-netns] --ready-fd N``

Started by ``capsa create`` (the container's init) or ``capsa exec`` (an
extra process), never by hand.  Engines treat the PID in ``--pid-file`` as
the container's process: conmon and containerd's runc shim are child
subreapers, so when ``capsa create`` exits the shim becomes their child,
and its exit status is what they report.  Hence the shim:

- keeps the stdio it inherited from ``capsa create``/``exec`` (the engine's
  pipes), or with ``--console-socket`` makes a host pty, sends its master to
  the engine exactly as runc does and takes the slave side;
- lives exactly as long as the guest process, exits with its status (the
  exit code, or 128+N for signal N; 255 when the VM itself went away), and
  forwards the signals it receives to it.

The relaying itself is the VM's proxy's (shim/link.py, proxy/shims.py): the
shim hands it its stdio over ``shim.sock`` and then only passes on its
signals and window changes and waits for the status.  There is a shim per
container and per ``exec``, each living as long as its process, so it
imports only what that needs (no asyncio, no protobuf, no configuration):
about 5 MiB of memory of its own where relaying by itself took 16.

With ``--new-netns`` (a spec that wants a network namespace of its own
without naming one) the shim lives in a new, empty network namespace:
engines that configure ``/proc/<container pid>/ns/net`` after ``create``
(Docker) configure that one, not the host's, and ``capsa start`` puts the
VM on whatever they put there (:mod:`capsa.network.attach`).

What goes wrong before the process is handed over goes back to the starter
on the ready pipe; the proxy's log (``proxy.log`` in the container's state
directory) has the relay's story.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

from capsa.errors import CapsaError
from capsa.runtime.ids import validate_id
from capsa.runtime.ready import ReadyPipe, set_process_name, wait_go
from capsa.runtime.sockets import SOCKET_ROOT_PATH, socket_key
from capsa.shim import console, link

CLONE_NEWNET = 0x40000000


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capsa-shim")
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-id", default="")
    parser.add_argument("--process", default=None, help="the exec's OCI process JSON")
    parser.add_argument("--terminal", action="store_true")
    parser.add_argument("--console-socket", default=None)
    parser.add_argument("--new-netns", action="store_true")
    # Given to every helper (Runtime.helper_args); the proxy holds the configuration and the log.
    parser.add_argument("--config", default=None)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--go-fd", type=int, default=-1, help="wait for one byte here first (runtime/daemon.py)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_process_name("capsa-shim")
    ready = ReadyPipe(args.ready_fd)
    try:
        state_dir = os.path.join(os.path.abspath(args.root), validate_id(args.id))
        process: object = None
        if args.process:
            with open(args.process, encoding="utf-8") as f:
                process = json.load(f)
        if args.new_netns:
            # Only here: ctypes and libc are memory the other shims need not hold.
            from capsa.agent import libc

            # Before any thread: unshare moves only the calling thread.
            libc.unshare(CLONE_NEWNET)
    except (CapsaError, OSError, ValueError) as exc:
        ready.fail(str(exc))
        return 1
    if os.getsid(0) != os.getpid():
        os.setsid()  # no signals from the caller's terminal; a session to own a pty
    if not wait_go(args.go_fd):
        return 0  # the create that started us failed: nothing to stand for
    try:
        stdio, terminal, winch = _stdio(args)
        proxy = ProxyLine.hand_over(
            os.path.join(SOCKET_ROOT_PATH, socket_key(state_dir), link.SOCKET_NAME),
            {"id": args.id, "exec_id": args.exec_id, "process": process, "terminal": terminal, "winch": winch},
            stdio,
        )
    except (CapsaError, OSError) as exc:
        ready.fail(str(exc))
        return 1
    ready.ok()
    # `capsa run -t` in the foreground: the caller's terminal is ours, raw (the guest's pty is the real one).
    with console.raw_terminal(0 if terminal and not args.console_socket else None):
        return proxy.stand_in(winch)


def _stdio(args: argparse.Namespace) -> tuple[list[int], bool, bool]:
    """The process's stdin, stdout and stderr on the host; whether it is a terminal; whether its size is."""
    if args.console_socket:
        master, slave = console.open_pty()
        try:
            console.send_console(args.console_socket, master)
        finally:
            os.close(master)
        # The kernel sends SIGWINCH to the session of a pty's controlling
        # process when the engine resizes the master.
        console.take_controlling_terminal(slave)
        return [slave, slave, slave], True, True
    if args.terminal:
        return [0, 1, 2], True, os.isatty(0)
    return [0, 1, 2], False, False


class ProxyLine:
    """Our connection to the VM's proxy (shim/link.py), blocking: we have nothing else to do."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lines = link.Lines()
        self._pending: list[link.Message] = []

    @classmethod
    def hand_over(cls, path: str, request: link.Message, stdio: list[int]) -> ProxyLine:
        """Give the proxy the process and its stdio; return once it relays (CapsaError: why not)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.connect(path)
            except OSError as exc:
                raise CapsaError(f"cannot reach the VM's proxy at {path}: {exc.strerror}") from exc
            message = link.encode(request)
            sent = socket.send_fds(sock, [message], stdio)
            sock.sendall(message[sent:])
            line = cls(sock)
            reply = line.receive()
            if reply is None:
                raise CapsaError("the VM's proxy went away")
            if "error" in reply:
                raise CapsaError(str(reply["error"]))
        except BaseException:
            sock.close()
            raise
        return line

    def receive(self) -> link.Message | None:
        """The proxy's next message; None once it is gone."""
        while not self._pending:
            try:
                data = self._sock.recv(65536)
                if not data:
                    return None
                self._pending += self._lines.feed(data)
            except (OSError, ValueError):
                return None
        return self._pending.pop(0)

    def send(self, message: link.Message) -> None:
        with contextlib.suppress(OSError):  # the proxy is gone: receive() says so
            self._sock.sendall(link.encode(message))

    def stand_in(self, winch: bool) -> int:
        """Pass on our signals (and window changes) until the proxy sends the process's status."""

        def forward(signum: int, frame: FrameType | None) -> None:
            self.send({"signal": signum})

        def resized(signum: int, frame: FrameType | None) -> None:
            self.send({"winch": True})

        for sig in link.FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        if winch:
            signal.signal(signal.SIGWINCH, resized)
        while True:
            message = self.receive()
            if message is None:
                return link.VM_LOST_STATUS
            status = message.get("status")
            if isinstance(status, int):
                return status
