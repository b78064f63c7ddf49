"""OTLP/gRPC trace receiver: opentelemetry.proto.collector.trace.v1.TraceService/Export.

The method is registered through a generic handler with *no* request deserializer (raw bytes)
instead of subclassing trace_service_pb2_grpc.TraceServiceServicer: with the generated servicer,
grpc drops undecodable protobuf itself (INTERNAL, before our code runs) and the refusal could not
be counted. Here we parse, and answer INVALID_ARGUMENT + count rejected{reason="malformed"}.

Status codes (OTLP/gRPC spec, "Failures" and "OTLP/gRPC Throttling"):
 - basic auth configured and the `authorization` metadata wrong or missing → UNAUTHENTICATED
   (the same check and the same rejected{reason="unauthorized"} count as the HTTP receiver's 401)
 - malformed request      → INVALID_ARGUMENT (not retryable)
 - request over the limit → RESOURCE_EXHAUSTED without RetryInfo (not retryable: the same
   request will never fit)
 - queue full             → UNAVAILABLE with a google.rpc.RetryInfo detail: the spec says
   backpressure "MUST" use UNAVAILABLE and MAY carry RetryInfo; RESOURCE_EXHAUSTED is only
   retryable when RetryInfo is present, so UNAVAILABLE is the unambiguous "retry later".
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gpuphase.agent.spans.receiver import (
    MALFORMED,
    RETRY_AFTER_SECONDS,
    TOO_LARGE,
    UNAUTHORIZED,
    MalformedRequest,
    SpanIntake,
    parse_protobuf,
)

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METHOD = "Export"
WORKER_THREADS = 4
# grpc core refuses messages above its limit before any Python runs (RESOURCE_EXHAUSTED, which
# we cannot count). We set the core limit to twice ours so that ordinary oversize batches reach
# the handler, are refused with the same status *and* counted; the 2x core limit still bounds
# memory against anything larger.
CORE_LIMIT_FACTOR = 2


@dataclass
class GrpcServerHandle:
    port: int
    _server: grpc.Server

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()


AuthChecker = Callable[[str | None], bool]  # the `authorization` value -> allowed (webconfig.BasicAuth.check_header)


class _ExportHandler:
    def __init__(self, intake: SpanIntake, auth: AuthChecker | None):
        self._intake = intake
        self._auth = auth

    def export(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        if self._auth is not None and not self._auth(_authorization(context)):
            self._intake.count_rejected(UNAUTHORIZED)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong basic auth credentials")
        if len(body) > self._intake.max_request_bytes:
            self._intake.count_rejected(TOO_LARGE)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"request of {len(body)} bytes exceeds the {self._intake.max_request_bytes} byte limit")
        try:
            request = parse_protobuf(body)
        except MalformedRequest as error:
            self._intake.count_rejected(MALFORMED)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        submission = self._intake.submit(request)
        if submission.queue_full:
            context.set_trailing_metadata((("grpc-status-details-bin", _retry_later_status()),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "span intake queue is full, retry later")
        return submission.response().SerializeToString()


def _authorization(context: grpc.ServicerContext) -> str | None:
    """The `authorization` metadata (gRPC lowercases keys), as an HTTP Authorization header."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _retry_later_status() -> bytes:
    retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="span intake queue is full, retry later")
    status.details.add().Pack(retry)
    return status.SerializeToString()


def start_grpc_server(intake: SpanIntake, address: str, credentials: grpc.ServerCredentials | None = None,
                      auth: AuthChecker | None = None) -> GrpcServerHandle:
    """Serve TraceService/Export on address ("host:port"; port 0 picks one, see handle.port).

    credentials: TLS (webconfig.grpc_server_credentials); None serves plaintext.
    auth: checks each call's `authorization` metadata; None accepts every call.
    """
    core_limit = intake.max_request_bytes * CORE_LIMIT_FACTOR
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="otlp-grpc"),
        options=[("grpc.max_receive_message_length", core_limit)],
    )
    handler = _ExportHandler(intake, auth)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(handler.export),  # raw bytes in and out
    }),))
    try:  # grpcio returns 0 on older versions and raises RuntimeError on newer ones
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as error:
        raise OSError(f"cannot listen for OTLP/gRPC on {address}: {error}") from None
    if port == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {address}")
    server.start()
    log.debug("OTLP/gRPC trace receiver listening on %s (port %d%s)", address, port,
             ", TLS" if credentials is not None else "")
    return GrpcServerHandle(port=port, _server=server)
