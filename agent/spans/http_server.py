"""OTLP/HTTP trace receiver: POST /v1/traces, binary protobuf or OTLP/JSON, optionally gzipped.

Status codes follow the OTLP/HTTP spec: 200 (with partial_success when some spans were
rejected), 400 malformed (body: google.rpc.Status), 401 when the auth checker refuses, 404/405
wrong path/method, 411 no Content-Length, 413 too large (in bytes before or after gzip, or in
spans or items: the intake's budget), 415 unsupported Content-Type or Content-Encoding, and 503 +
Retry-After when the intake is saturated (queue full, span rate reached, no parse slot). The spec
allows 429 or 503 for throttling; 503 says "the server is overloaded" (our queue), while 429 says
"you, the client, are sending too much", which the agent does not know. Both are retried by the
OTel exporters. Every refusal is counted in gpu_spans_rejected_total{reason}. Authentication,
media type and length are checked on the request head, before the body is read (gpuphase.web).
"""

from __future__ import annotations

import logging
import ssl
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gpuphase.agent.spans.otlp_json import parse_otlp_json
from gpuphase.agent.spans.receiver import (
    MALFORMED,
    RETRY_AFTER_SECONDS,
    TOO_LARGE,
    UNAUTHORIZED,
    UNSUPPORTED_ENCODING,
    UNSUPPORTED_MEDIA_TYPE,
    MalformedRequest,
    OverBudget,
    SpanIntake,
    parse_protobuf,
)
from gpuphase.web.http1 import RequestHead, Response
from gpuphase.web.server import HttpServer, Limits, ListenerStats

log = logging.getLogger(__name__)

PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
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


PARSERS = {PROTOBUF: parse_protobuf, JSON: parse_otlp_json}


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


class OtlpHttpApp:
    """The receiver's routes, an Application of gpuphase.web.server (run on its worker threads)."""

    def __init__(self, intake: SpanIntake, auth_checker: AuthChecker | None):
        self.intake = intake
        self.auth_checker = auth_checker

    @property
    def max_body_bytes(self) -> int:
        return self.intake.max_request_bytes

    def admit(self, head: RequestHead, client: str) -> Response | None:
        """Everything that can be refused from the head alone, so a refused body is never read."""
        if head.path != PATH:
            return _plain(HTTPStatus.NOT_FOUND, "not found")
        if head.method != "POST":
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED, "only POST is allowed", [("Allow", "POST")])
        media_type = _media_type(head.headers.get("content-type"))
        try:
            self._check_head(head, media_type)
        except _Refusal as refusal:
            return self._refuse(refusal, media_type)
        return None

    def _check_head(self, head: RequestHead, media_type: str) -> None:
        checker = self.auth_checker
        if checker is not None and not checker(head.headers.get("authorization")):
            raise _Refusal(HTTPStatus.UNAUTHORIZED, UNAUTHORIZED, "unauthorized",
                           {"WWW-Authenticate": 'Basic realm="gpuphase"'})
        if media_type not in PARSERS:
            raise _Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type must be {PROTOBUF} or {JSON}")
        encoding = (head.headers.get("content-encoding") or "identity").strip().lower()
        if encoding not in ("gzip", "identity"):
            raise _Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_ENCODING,
                           "Content-Encoding must be gzip or identity")
        if head.length is None:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, LENGTH_REQUIRED, "Content-Length is required")
        if head.length > self.intake.max_request_bytes:
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, TOO_LARGE,
                           f"request of {head.length} bytes exceeds the {self.intake.max_request_bytes} byte limit")

    def respond(self, head: RequestHead, body: bytes, client: str) -> Response:
        media_type = _media_type(head.headers.get("content-type"))
        encoding = (head.headers.get("content-encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gunzip_capped(body, self.intake.max_request_bytes)
            submission = self.intake.handle(body, PARSERS[media_type])
        except PayloadTooLarge as error:
            return self._refuse(_Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, TOO_LARGE, str(error)), media_type)
        except OverBudget as error:  # before MalformedRequest, its base class
            return self._refuse(_Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, error.reason, str(error)), media_type)
        except MalformedRequest as error:
            return self._refuse(_Refusal(HTTPStatus.BAD_REQUEST, MALFORMED, str(error)), media_type)
        if submission.queue_full:
            # Already counted by the intake (it knows the span count and why).
            status = _status_message(HTTPStatus.SERVICE_UNAVAILABLE, submission.message)
            return _message(HTTPStatus.SERVICE_UNAVAILABLE, status, media_type,
                            {"Retry-After": str(RETRY_AFTER_SECONDS)})
        return _message(HTTPStatus.OK, submission.response(), media_type)

    def _refuse(self, refusal: _Refusal, media_type: str) -> Response:
        self.intake.count_rejected(refusal.reason)
        return _message(refusal.status, _status_message(refusal.status, refusal.message), media_type,
                        refusal.headers)


def _message(status: HTTPStatus, message: Message, media_type: str, headers: dict[str, str] | None = None) -> Response:
    """Answer in the request's content type (OTLP/HTTP); binary protobuf when it was unusable."""
    if media_type == JSON:
        body = json_format.MessageToJson(message, indent=None).encode()
    else:
        media_type, body = PROTOBUF, message.SerializeToString()
    return Response(status, body, media_type, list((headers or {}).items()))


def _plain(status: HTTPStatus, text: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, text.encode(), headers=headers or [], close=True)  # any body was left unread


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


@dataclass
class HttpServerHandle:
    port: int
    _server: HttpServer

    def stats(self) -> ListenerStats:
        return self._server.stats()

    def stop(self) -> None:
        self._server.shutdown()


def start_http_server(intake: SpanIntake, address: str, ssl_context: ssl.SSLContext | None = None,
                      auth_checker: AuthChecker | None = None, limits: Limits = Limits()) -> HttpServerHandle:
    """Serve POST /v1/traces on address ("host:port"; port 0 picks one, see handle.port)."""
    server = HttpServer("OTLP/HTTP receiver", address, OtlpHttpApp(intake, auth_checker), ssl_context=ssl_context,
                        limits=limits).start()
    log.debug("OTLP/HTTP trace receiver listening on %s (port %d)", address, server.port)
    return HttpServerHandle(port=server.port, _server=server)
