"""``capsa-monitor``: one per host, Prometheus metrics of every capsa sandbox at ``/metrics``.

    capsa-monitor [--listen-address HOST:PORT] [--root DIR]... [--cache-seconds S]
                  [--agent-timeout S] [--max-concurrency N] [--scrape-timeout S] [--debug]

``--listen-address`` is kata-monitor's flag (default ``127.0.0.1:8090``;
port 0 picks a free one, which the first line on stderr names).  It runs
as root (the proxies' and shims' sockets are root's, 0600, and reading
another process's ``smaps_rollup`` takes ptrace read access) until SIGTERM
or SIGINT.  The server answers ``/metrics`` (the Prometheus
text format, or OpenMetrics when asked) and nothing else but ``/``, a
pointer to it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from capsa.errors import CapsaError, InvalidArgument
from capsa.monitor.collector import Monitor, Settings
from capsa.runtime.ready import set_process_name

log = logging.getLogger("capsa.monitor")

DEFAULT_LISTEN_ADDRESS = "127.0.0.1:8090"
METRICS_PATH = "/metrics"

WSGIEnviron = dict[str, Any]
StartResponse = Any


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, or ``:PORT`` (every address); InvalidArgument otherwise."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidArgument(f"--listen-address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidArgument(f"--listen-address {text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    return host, int(port_text)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capsa-monitor", description="Prometheus metrics of capsa's sandboxes.")
    parser.add_argument(
        "--listen-address",
        default=DEFAULT_LISTEN_ADDRESS,
        help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN_ADDRESS})",
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        type=Path,
        help="a state root to search besides the defaults (repeatable)",
    )
    parser.add_argument("--no-default-roots", action="store_true", help="search only the roots given")
    parser.add_argument("--cache-seconds", type=float, default=5.0, help="serve a reading this long (default 5)")
    parser.add_argument(
        "--agent-timeout", type=float, default=2.0, help="bound on one sandbox's agent figures (default 2)"
    )
    parser.add_argument("--max-concurrency", type=int, default=4, help="agents asked at once (default 4)")
    parser.add_argument(
        "--scrape-timeout", type=float, default=5.0, help="bound on asking every agent, per reading (default 5)"
    )
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.cache_seconds < 0 or args.agent_timeout <= 0 or args.max_concurrency < 1:
        raise InvalidArgument("--cache-seconds must be >= 0, --agent-timeout > 0 and --max-concurrency >= 1")
    if args.scrape_timeout < args.agent_timeout:
        raise InvalidArgument("--scrape-timeout must be at least --agent-timeout")
    return Settings(
        roots=tuple(Path(root).absolute() for root in args.root),
        default_roots=not args.no_default_roots,
        cache_seconds=args.cache_seconds,
        agent_timeout=args.agent_timeout,
        concurrency=args.max_concurrency,
        deadline=args.scrape_timeout,
    )


def routes(metrics_app: Any) -> Any:
    """``/metrics`` to Prometheus' WSGI app; ``/`` a pointer to it; anything else 404."""

    def app(environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"capsa-monitor: metrics at /metrics\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request: a slow scrape does not hold up another (they share one reading)."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def make_server(host: str, port: int, monitor: Monitor) -> WSGIServer:
    """Bind ``host:port`` (CapsaError if it cannot) and return the server, not yet serving."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_Server):
        address_family = family

    try:
        server = Server((host, port), _QuietHandler)
    except OSError as exc:
        raise CapsaError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    server.set_app(routes(make_wsgi_app(registry)))
    return server


def url_of(server: WSGIServer) -> str:
    host, port = server.server_address[:2]
    name = host.decode() if isinstance(host, bytes) else str(host)
    shown = f"[{name}]" if ":" in name else name
    return f"http://{shown}:{port}{METRICS_PATH}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="capsa-monitor: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        host, port = parse_listen_address(args.listen_address)
        server = make_server(host, port, Monitor(settings_from(args)))
    except CapsaError as exc:
        print(f"capsa-monitor: {exc}", file=sys.stderr)
        return exc.exit_code if not isinstance(exc, InvalidArgument) else 2
    set_process_name("capsa-monitor")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    print(f"capsa-monitor: serving {url_of(server)}", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
    return 0
