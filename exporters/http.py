"""The agent's HTTP(S) endpoint: /metrics, a landing page, and /-/healthy and /-/ready.

MetricsServer is the exporter's routes (an Application of gpuphase.web.server, which bounds
connections, deadlines and headers for every listener of the agent), with the web config's basic
auth and headers applied to every path as exporter-toolkit does, except the two probe paths:
a kubelet's httpGet probe cannot send credentials from a Secret, and a probe answer says only
"alive" or "ready", so /-/healthy and /-/ready are answered without authentication.
"""

from __future__ import annotations

import gzip
import html
import logging
from http import HTTPStatus
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gpuphase import __version__
from gpuphase.exporters.registry import AgentRegistry
from gpuphase.exporters.webconfig import BasicAuth, WebConfig
from gpuphase.web.http1 import RequestHead, Response
from gpuphase.web.server import HttpServer, Limits, ListenerStats

log = logging.getLogger(__name__)

# Prometheus asks for gzip on every scrape. Level 1 costs a third of level 6's CPU on the scrape
# path (0.7 vs 2.1 ms for 8 GPUs x 32 processes here) for an answer ~15% larger.
GZIP_LEVEL = 1
PROBE_PATHS = ("/-/healthy", "/-/ready")
SERVER_HEADER = f"gpuphase/{__version__}"


def unauthorized() -> Response:
    """401 with a Basic challenge."""
    return Response(HTTPStatus.UNAUTHORIZED, b"Unauthorized\n", headers=[("WWW-Authenticate", "Basic")])


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

    max_body_bytes = 0  # GET and HEAD only: a request with a body is refused before it is read

    def __init__(
        self,
        registry: CollectorRegistry,
        listen_address: str,
        *,
        telemetry_path: str = "/metrics",
        ready: Callable[[], bool] = lambda: True,
        web_config: WebConfig | None = None,
        limits: Limits = Limits(),
    ):
        if not telemetry_path.startswith("/"):
            raise ValueError(f"telemetry path must start with '/', got {telemetry_path!r}")
        self.registry = registry
        self.telemetry_path = telemetry_path
        self.ready = ready
        self.web_config = web_config or WebConfig()
        self._server = HttpServer("web listener", listen_address, self, ssl_context=self.web_config.ssl_context,
                                  limits=limits, server_header=SERVER_HEADER)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def scheme(self) -> str:
        return "https" if self.web_config.ssl_context else "http"

    def stats(self) -> ListenerStats:
        return self._server.stats()

    def start(self) -> "MetricsServer":
        self._server.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, close the socket and wait for the serving loop to end."""
        self._server.shutdown()

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- the Application the server calls, on its worker threads --------------------------------

    def admit(self, head: RequestHead, client: str) -> Response | None:
        if head.method not in ("GET", "HEAD"):
            return self._with_headers(Response(HTTPStatus.METHOD_NOT_ALLOWED, b"Method Not Allowed\n",
                                               headers=[("Allow", "GET, HEAD")], close=True))
        auth: BasicAuth | None = self.web_config.auth
        if head.path in PROBE_PATHS or auth is None or auth.check_header(head.headers.get("authorization")):
            return None
        return self._with_headers(unauthorized())

    def respond(self, head: RequestHead, body: bytes, client: str) -> Response:
        path = head.path
        if path == self.telemetry_path:
            response = self._metrics(head)
        elif path == "/":
            response = Response(HTTPStatus.OK, _landing_page(self.telemetry_path).encode(),
                                "text/html; charset=utf-8")
        elif path == "/-/healthy":
            response = Response(HTTPStatus.OK, b"OK\n")
        elif path == "/-/ready":
            response = self._ready()
        else:
            response = Response(HTTPStatus.NOT_FOUND, b"Not Found\n")
        return self._with_headers(response)

    def _metrics(self, head: RequestHead) -> Response:
        try:
            body, content_type = encode(self.registry, head.headers.get("accept") or "")
        except Exception:  # noqa: BLE001 - AgentCollector isolates collectors; this is the last resort
            log.exception("rendering %s failed", self.telemetry_path)
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"Internal Server Error\n")
        headers = [("Vary", "Accept-Encoding")]
        if accepts_gzip(head.headers.get("accept-encoding")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        return Response(HTTPStatus.OK, body, content_type, headers)

    def _ready(self) -> Response:
        try:
            ready = bool(self.ready())
        except Exception:  # noqa: BLE001 - a broken readiness check means "not ready", not a crash
            log.exception("readiness check failed")
            ready = False
        if ready:
            return Response(HTTPStatus.OK, b"OK\n")
        return Response(HTTPStatus.SERVICE_UNAVAILABLE, b"Not ready: no complete GPU sample yet\n")

    def _with_headers(self, response: Response) -> Response:
        response.headers.extend(self.web_config.headers)
        return response


def encode(registry: CollectorRegistry, accept_header: str) -> tuple[bytes, str]:
    """(body, content type) for one scrape: the agent's registry writes itself (exporters.exposition),
    any other registry (the benchmarks' baseline) is written by prometheus_client."""
    if isinstance(registry, AgentRegistry):
        return registry.exposition(accept_header)
    encoder, content_type = choose_encoder(accept_header)
    return encoder(registry), content_type


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
