"""OTLP/HTTP trace receiver: POST /v1/traces, binary protobuf or OTLP/JSON, optionally gzipped.

Status codes follow the OTLP/HTTP spec: 200 (with partial_success when some spans were
rejected), 400 malformed (body: google.rpc.Status), 401 when the auth checker refuses, 404/405
wrong path/method, 411 no Content-Length, 413 too large (before or after gzip), 415 unsupported
Content-Type or Content-Encoding, and 503 + Retry-After when the intake queue is full. The spec
allows 429 or 503 for throttling; 503 says "the server is overloaded" (our queue), while 429 says
"you, the client, are sending too much", which the agent does not know. Both are retried by the
OTel exporters. Every refusal is counted in gpu_spans_rejected_total{reason}.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gpuphase.agent.spans.receiver import (
    MALFORMED,
    RETRY_AFTER_SECONDS,
    TOO_LARGE,
    UNAUTHORIZED,
    UNSUPPORTED_ENCODING,
    UNSUPPORTED_MEDIA_TYPE,
    MalformedRequest,
    SpanIntake,
    parse_protobuf,
)
from gpuphase.model.addresses import split_address

log = logging.getLogger(__name__)

PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
SOCKET_TIMEOUT_SECONDS = 10  # a sender that stalls mid-body must not hold a thread forever
LENGTH_REQUIRED = "length_required"

AuthChecker = Callable[[str | None], bool]  # Authorization header value -> allowed?


class PayloadTooLarge(ValueError):
    pass


class _Refusal(Exception):
    """An HTTP error answer together with the reason it is counted under."""

    def __init__(self, status: HTTPStatus, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


def gunzip_capped(data: bytes, limit: int) -> bytes:
    """Decompress gzip, refusing output over `limit` bytes without ever producing more (gzip bombs)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise MalformedRequest(f"invalid gzip: {error}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request exceeds the {limit} byte limit")
    if not inflater.eof:
        raise MalformedRequest("truncated gzip stream")
    if inflater.unused_data:
        raise MalformedRequest("trailing data after the gzip stream")
    return out


# OTLP/JSON differs from the proto3 JSON mapping in one way that matters: trace and span ids are
# hex strings, not base64. Convert them before json_format sees them.
def _hex_ids_to_base64(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise MalformedRequest(f"{key} is not hex") from None


def _list(obj: Any, key: str) -> list:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, list) else []


def parse_otlp_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        document = json.loads(body)
        for resource_spans in _list(document, "resourceSpans"):
            for scope_spans in _list(resource_spans, "scopeSpans"):
                for span in _list(scope_spans, "spans"):
                    if isinstance(span, dict):
                        _hex_ids_to_base64(span, ("traceId", "spanId", "parentSpanId"))
                        for link in _list(span, "links"):
                            if isinstance(link, dict):
                                _hex_ids_to_base64(link, ("traceId", "spanId"))
        return json_format.ParseDict(document, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except MalformedRequest:
        raise
    except (ValueError, TypeError, RecursionError, json_format.ParseError) as error:
        raise MalformedRequest(f"invalid OTLP/JSON: {type(error).__name__}") from None


PARSERS = {PROTOBUF: parse_protobuf, JSON: parse_otlp_json}


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


class _OtlpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporters reuse connections
    # The status line and headers go out in one write and the body in another; with Nagle's
    # algorithm on, a small body then waits for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    timeout = SOCKET_TIMEOUT_SECONDS
    server: "_OtlpHttpServer"

    def do_POST(self) -> None:
        if self._path() != PATH:
            return self._send_plain(HTTPStatus.NOT_FOUND, "not found")
        media_type = _media_type(self.headers.get("Content-Type"))
        try:
            body = self._read_checked_body(media_type)
            request = PARSERS[media_type](body)
        except _Refusal as refusal:
            return self._refuse(refusal, media_type)
        except PayloadTooLarge as error:
            return self._refuse(_Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, TOO_LARGE, str(error)), media_type)
        except MalformedRequest as error:
            return self._refuse(_Refusal(HTTPStatus.BAD_REQUEST, MALFORMED, str(error)), media_type)
        submission = self.server.intake.submit(request)
        if submission.queue_full:
            # Already counted by the intake (it knows the span count).
            status = _status_message(HTTPStatus.SERVICE_UNAVAILABLE, "span intake queue is full, retry later")
            return self._send_message(HTTPStatus.SERVICE_UNAVAILABLE, status, media_type,
                                      {"Retry-After": str(RETRY_AFTER_SECONDS)})
        self._send_message(HTTPStatus.OK, submission.response(), media_type)

    def _read_checked_body(self, media_type: str) -> bytes:
        intake = self.server.intake
        checker = self.server.auth_checker
        if checker is not None and not checker(self.headers.get("Authorization")):
            raise _Refusal(HTTPStatus.UNAUTHORIZED, UNAUTHORIZED, "unauthorized",
                           {"WWW-Authenticate": 'Basic realm="gpuphase"'})
        if media_type not in PARSERS:
            raise _Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type must be {PROTOBUF} or {JSON}")
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("gzip", "identity"):
            raise _Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_ENCODING,
                           "Content-Encoding must be gzip or identity")
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.strip().isdecimal():
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, LENGTH_REQUIRED, "Content-Length is required")
        length = int(length_header)
        if length > intake.max_request_bytes:
            raise PayloadTooLarge(f"request of {length} bytes exceeds the {intake.max_request_bytes} byte limit")
        body = self.rfile.read(length)
        if len(body) != length:
            raise MalformedRequest("body shorter than Content-Length")
        return gunzip_capped(body, intake.max_request_bytes) if encoding == "gzip" else body

    def _refuse(self, refusal: _Refusal, media_type: str) -> None:
        self.server.intake.count_rejected(refusal.reason)
        if refusal.status in (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.LENGTH_REQUIRED,
                              HTTPStatus.UNAUTHORIZED, HTTPStatus.UNSUPPORTED_MEDIA_TYPE):
            # The body may be unread; the connection cannot be reused safely.
            self.close_connection = True
            refusal.headers.setdefault("Connection", "close")
        self._send_message(refusal.status, _status_message(refusal.status, refusal.message),
                           media_type, refusal.headers)

    def do_GET(self) -> None:
        self._method_not_allowed()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _method_not_allowed(self) -> None:
        if self._path() != PATH:
            return self._send_plain(HTTPStatus.NOT_FOUND, "not found")
        self._send_plain(HTTPStatus.METHOD_NOT_ALLOWED, "only POST is allowed", {"Allow": "POST"})

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _send_message(self, status: HTTPStatus, message: Message, media_type: str,
                      headers: dict[str, str] | None = None) -> None:
        """Answer in the request's content type (OTLP/HTTP); binary protobuf when it was unusable."""
        if media_type == JSON:
            body = json_format.MessageToJson(message, indent=None).encode()
        else:
            media_type, body = PROTOBUF, message.SerializeToString()
        self._send(status, media_type, body, headers)

    def _send_plain(self, status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        self.close_connection = True  # any request body was left unread
        self._send(status, "text/plain; charset=utf-8", text.encode(), {"Connection": "close", **(headers or {})})

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, headers: dict[str, str] | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("otlp-http %s " + format, self.address_string(), *args)


def _status_message(status: HTTPStatus, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=_GRPC_CODE_BY_HTTP.get(status, 2), message=message)


# google.rpc.Code values for the Status body (the OTLP/HTTP spec's Status carries a gRPC code).
_GRPC_CODE_BY_HTTP = {
    HTTPStatus.BAD_REQUEST: 3,  # INVALID_ARGUMENT
    HTTPStatus.UNAUTHORIZED: 16,  # UNAUTHENTICATED
    HTTPStatus.LENGTH_REQUIRED: 3,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: 8,  # RESOURCE_EXHAUSTED
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: 3,
    HTTPStatus.SERVICE_UNAVAILABLE: 14,  # UNAVAILABLE
}


class _OtlpHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], intake: SpanIntake, auth_checker: AuthChecker | None,
                 ssl_context: ssl.SSLContext | None):
        self.intake = intake
        self.auth_checker = auth_checker
        self.ssl_context = ssl_context
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _OtlpHandler)

    def get_request(self):
        connection, client = super().get_request()
        if self.ssl_context is not None:
            # Handshake lazily, on the connection's own thread (first read), so that a slow or
            # silent client cannot stall the accept loop.
            connection = self.ssl_context.wrap_socket(connection, server_side=True,
                                                      do_handshake_on_connect=False)
        return connection, client


@dataclass
class HttpServerHandle:
    port: int
    _server: _OtlpHttpServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_http_server(intake: SpanIntake, address: str, ssl_context: ssl.SSLContext | None = None,
                      auth_checker: AuthChecker | None = None) -> HttpServerHandle:
    """Serve POST /v1/traces on address ("host:port"; port 0 picks one, see handle.port)."""
    server = _OtlpHttpServer(split_address(address), intake, auth_checker, ssl_context)
    thread = threading.Thread(target=server.serve_forever, name="otlp-http", daemon=True)
    thread.start()
    log.debug("OTLP/HTTP trace receiver listening on %s (port %d)", address, server.server_address[1])
    return HttpServerHandle(port=server.server_address[1], _server=server, _thread=thread)
