"""The agent's HTTP(S) endpoint: /metrics, a landing page, and /-/healthy and /-/ready.

Standard library only (http.server): a scrape is one small GET every few seconds, so a thread
per connection is plenty and adds no dependency. Two layers:

  AgentHTTPServer  a ThreadingHTTPServer that binds IPv4, IPv6 or all interfaces (":port",
                   dual-stack where the host allows), does the TLS handshake in the connection's
                   own thread (a slow client cannot stall accept), answers plain HTTP sent to a
                   TLS port with a 400, and logs connection errors at debug level only. It takes
                   any handler class, so the OTLP/HTTP receiver can reuse it.
  MetricsServer    the exporter's routes on top of it, with the web config's basic auth and
                   headers applied to every path (as exporter-toolkit does).
"""

from __future__ import annotations

import gzip
import html
import logging
import socket
import socketserver
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gpuphase import __version__
from gpuphase.exporters.registry import AgentRegistry
from gpuphase.exporters.webconfig import BasicAuth, WebConfig
from gpuphase.model.addresses import split_address

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
CONNECTION_IDLE_TIMEOUT_SECONDS = 60.0
_TLS_HANDSHAKE_RECORD = 0x16


class AgentHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with address-family selection, per-thread TLS and quiet error handling."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        listen_address: str,
        handler_class: type[BaseHTTPRequestHandler],
        ssl_context: ssl.SSLContext | None = None,
    ):
        host, port = split_address(listen_address)
        self.address_family, bind_host, self._dual_stack = _address_family(host, port)
        self.ssl_context = ssl_context
        super().__init__((bind_host, port), handler_class)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS lookup that can hang for
        # seconds on hosts without working DNS; the name is not needed.
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    @property
    def port(self) -> int:
        """The bound port; the real one when the listen address asked for port 0."""
        return self.server_address[1]

    def finish_request(self, request, client_address) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        tls = self._handshake(request, client_address)
        if tls is None:
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def _handshake(self, request: socket.socket, client_address) -> ssl.SSLSocket | None:
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_SECONDS)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first[0] != _TLS_HANDSHAKE_RECORD:
                # What Go's net/http answers too: a clear error instead of a closed connection.
                request.sendall(
                    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                    b"Client sent an HTTP request to an HTTPS server.\n"
                )
                return None
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
            return tls
        except (OSError, ssl.SSLError) as err:
            log.debug("TLS handshake with %s failed: %s", client_address[0], err)
            return None

    def handle_error(self, request, client_address) -> None:
        # Clients hanging up mid-response are routine; never print tracebacks to stderr for them.
        log.debug("error serving %s", client_address[0], exc_info=True)


def _address_family(host: str, port: int) -> tuple[socket.AddressFamily, str, bool]:
    """(family, host to bind, dual-stack?) for a host from split_address ('' = all interfaces)."""
    if host == "":
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, "::", True
        return socket.AF_INET, "0.0.0.0", False
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0], False


# serve_forever notices shutdown() only between polls; 0.1 s keeps stopping the agent snappy
# for ten cheap wake-ups a second (the stdlib default of 0.5 s made every stop take half a second).
SHUTDOWN_POLL_INTERVAL_SECONDS = 0.1
# Prometheus asks for gzip on every scrape. Level 1 costs a third of level 6's CPU on the scrape
# path (0.7 vs 2.1 ms for 8 GPUs x 32 processes here) for an answer ~15% larger.
GZIP_LEVEL = 1


def serve_in_background(server: socketserver.BaseServer, name: str) -> threading.Thread:
    """Run serve_forever on a daemon thread; stop it with server.shutdown() then server_close()."""
    thread = threading.Thread(
        target=server.serve_forever, args=(SHUTDOWN_POLL_INTERVAL_SECONDS,), name=name, daemon=True
    )
    thread.start()
    return thread


def authorized(handler: BaseHTTPRequestHandler, auth: BasicAuth | None) -> bool:
    """True if the request may proceed; otherwise a 401 with a Basic challenge has been sent."""
    if auth is None or auth.check_header(handler.headers.get("Authorization")):
        return True
    body = b"Unauthorized\n"
    handler.send_response(HTTPStatus.UNAUTHORIZED)
    handler.send_header("WWW-Authenticate", "Basic")
    handler.send_header("Content-Type", "text/plain; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
    return False


def accepts_gzip(accept_encoding: str | None) -> bool:
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


class MetricsServer:
    """Serves a CollectorRegistry on `telemetry_path`, with / and the health endpoints.

    Binds in the constructor (so 'address in use' surfaces at start-up); start() begins serving.
    `ready` is polled by /-/ready (e.g. "the first complete snapshot exists").
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        listen_address: str,
        *,
        telemetry_path: str = "/metrics",
        ready: Callable[[], bool] = lambda: True,
        web_config: WebConfig | None = None,
    ):
        if not telemetry_path.startswith("/"):
            raise ValueError(f"telemetry path must start with '/', got {telemetry_path!r}")
        self.registry = registry
        self.telemetry_path = telemetry_path
        self.ready = ready
        self.web_config = web_config or WebConfig()
        self._server = AgentHTTPServer(listen_address, _handler_for(self), self.web_config.ssl_context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def scheme(self) -> str:
        return "https" if self.web_config.ssl_context else "http"

    def start(self) -> "MetricsServer":
        self._thread = serve_in_background(self._server, "metrics-http")
        return self

    def shutdown(self) -> None:
        """Stop accepting, close the socket and wait for the serving loop to end."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def encode(registry: CollectorRegistry, accept_header: str) -> tuple[bytes, str]:
    """(body, content type) for one scrape: the agent's registry writes itself (exporters.exposition),
    any other registry (the benchmarks' baseline) is written by prometheus_client."""
    if isinstance(registry, AgentRegistry):
        return registry.exposition(accept_header)
    encoder, content_type = choose_encoder(accept_header)
    return encoder(registry), content_type


def _handler_for(app: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_ExporterHandler):
        server_app = app

    return Handler


class _ExporterHandler(BaseHTTPRequestHandler):
    server_app: MetricsServer
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection every scrape
    # The status line and headers go out in one write and the body in another; with Nagle's
    # algorithm on, a small body then waits for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    server_version = f"gpuphase/{__version__}"
    timeout = CONNECTION_IDLE_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def _route(self) -> None:
        app = self.server_app
        if not authorized(self, app.web_config.auth):
            return
        path = urlsplit(self.path).path
        if path == app.telemetry_path:
            self._metrics()
        elif path == "/":
            self._send(HTTPStatus.OK, _landing_page(app.telemetry_path).encode(), "text/html; charset=utf-8")
        elif path == "/-/healthy":
            self._send(HTTPStatus.OK, b"OK\n")
        elif path == "/-/ready":
            self._ready()
        else:
            self._send(HTTPStatus.NOT_FOUND, b"Not Found\n")

    def _metrics(self) -> None:
        try:
            body, content_type = encode(self.server_app.registry, self.headers.get("Accept", ""))
        except Exception:  # noqa: BLE001 - AgentCollector isolates collectors; this is the last resort
            log.exception("rendering %s failed", self.server_app.telemetry_path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"Internal Server Error\n")
            return
        encoding = None
        if accepts_gzip(self.headers.get("Accept-Encoding")):
            body, encoding = gzip.compress(body, compresslevel=GZIP_LEVEL), "gzip"
        self._send(HTTPStatus.OK, body, content_type, encoding)

    def _ready(self) -> None:
        try:
            ready = bool(self.server_app.ready())
        except Exception:  # noqa: BLE001 - a broken readiness check means "not ready", not a crash
            log.exception("readiness check failed")
            ready = False
        if ready:
            self._send(HTTPStatus.OK, b"OK\n")
        else:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"Not ready: no complete GPU sample yet\n")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8",
              encoding: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Vary", "Accept-Encoding")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self) -> None:
        for name, value in self.server_app.web_config.headers:
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)


def _landing_page(telemetry_path: str) -> str:
    metrics = html.escape(telemetry_path, quote=True)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>gpuphase</title></head>
<body>
<h1>gpuphase</h1>
<p>GPU observability agent for LLM serving, version {html.escape(__version__)}.</p>
<ul>
<li><a href="{metrics}">{metrics}</a> &mdash; Prometheus metrics</li>
<li><a href="/-/healthy">/-/healthy</a> &mdash; liveness</li>
<li><a href="/-/ready">/-/ready</a> &mdash; readiness (a complete GPU sample exists)</li>
</ul>
</body>
</html>
"""
