"""OTLP/gRPC trace receiver: opentelemetry.proto.collector.trace.v1.TraceService/Export.

The method is registered through a generic handler with *no* request deserializer (raw bytes)
instead of subclassing trace_service_pb2_grpc.TraceServiceServicer: with the generated servicer,
grpc drops undecodable protobuf itself (INTERNAL, before our code runs) and the refusal could not
be counted. Here we parse, and answer INVALID_ARGUMENT + count rejected{reason="malformed"}.

Status codes (OTLP/gRPC spec, "Failures" and "OTLP/gRPC Throttling"):
 - basic auth configured and the `authorization` metadata wrong or missing → UNAUTHENTICATED
   (the same check and the same rejected{reason="unauthorized"} count as the HTTP receiver's 401)
 - malformed request      → INVALID_ARGUMENT (not retryable)
 - request over the limit, or with more spans or items than the request budget allows →
   RESOURCE_EXHAUSTED without RetryInfo (not retryable: the same request will never fit)
 - queue full, span rate reached, no parse slot free → UNAVAILABLE with a google.rpc.RetryInfo
   detail: the spec says backpressure "MUST" use UNAVAILABLE and MAY carry RetryInfo;
   RESOURCE_EXHAUSTED is only retryable when RetryInfo is present, so UNAVAILABLE is the
   unambiguous "retry later".

Refused by grpc itself, before any of our code runs, and so not counted in
gpu_spans_rejected_total (docs/spans.md):
 - a message over the request limit (the core's receive limit is the request limit, so that it
   never buffers more): RESOURCE_EXHAUSTED "Received message larger than max". Neither a
   handler nor a server interceptor sees it. A stream-unary handler does see that its message
   never came, but exactly as it sees a client that cancels or drops the call while sending, so
   counting there would count those too; we leave it uncounted.
 - a call beyond max_concurrent_rpcs: RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!".
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
    OverBudget,
    SpanIntake,
    parse_protobuf,
)
from gpuphase.web.server import bind_listener

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METHOD = "Export"
WORKER_THREADS = 4
# Calls in progress at once, those waiting for a worker thread included; grpc refuses the next
# with RESOURCE_EXHAUSTED itself (uncounted; OTel exporters do not retry it). A node's senders
# are its model-server processes and maybe a collector, each with one export in flight (the
# SDKs' BatchSpanProcessor): 16 leaves room for 8 GPUs' worth and their retries. Each call
# beyond the workers holds at most its stream's HTTP/2 flow-control window until a worker reads it.
DEFAULT_MAX_CONCURRENT_RPCS = 16
# Connection management (grpc core channel arguments, server side).
KEEPALIVE_OPTIONS = (
    # Ping a connection after a minute without traffic and drop it when 20 s pass without the
    # answer: a sender that vanished (node rebooted, pod deleted) frees its calls and threads.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Clients may ping us every 10 s, with or without calls in flight (an OTel Collector with
    # keepalive configured does): stricter and grpc answers GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # An idle connection is closed after 5 minutes (senders reconnect when they next export).
    ("grpc.max_connection_idle_ms", 300_000),
    # Every connection is closed after ~10 minutes (GOAWAY, then 30 s for calls in flight; an
    # export takes at most the exporters' 10 s timeout). This bounds how long a sender that
    # starts a call and never finishes sending its message can hold a worker thread.
    ("grpc.max_connection_age_ms", 600_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
)
# No bandwidth-delay probing: the stream windows stay at HTTP/2's 64 KiB, so a call waiting for a
# worker thread holds ~64 KiB instead of its whole message (16 waiting 4 MiB calls: ~30 MiB, not
# ~80 MiB; tests/test_grpc_limits.py). Senders are on the node: at loopback round trips a 64 KiB
# window still moves hundreds of MB/s.
FLOW_CONTROL_OPTIONS = (("grpc.http2.bdp_probe", 0),)


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
        if len(body) > self._intake.max_request_bytes:  # the core's limit is the same: a safety net
            self._intake.count_rejected(TOO_LARGE)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"request of {len(body)} bytes exceeds the {self._intake.max_request_bytes} byte limit")
        try:
            submission = self._intake.handle(body, parse_protobuf)  # in a parse slot, within the budget
        except OverBudget as error:
            self._intake.count_rejected(error.reason)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except MalformedRequest as error:
            self._intake.count_rejected(MALFORMED)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if submission.queue_full:
            context.set_trailing_metadata((("grpc-status-details-bin", _retry_later_status(submission.message)),))
            context.abort(grpc.StatusCode.UNAVAILABLE, submission.message)
        return submission.response().SerializeToString()


def _authorization(context: grpc.ServicerContext) -> str | None:
    """The `authorization` metadata (gRPC lowercases keys), as an HTTP Authorization header."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _retry_later_status(message: str) -> bytes:
    retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
    status.details.add().Pack(retry)
    return status.SerializeToString()


def start_grpc_server(intake: SpanIntake, address: str, credentials: grpc.ServerCredentials | None = None,
                      auth: AuthChecker | None = None,
                      max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS) -> GrpcServerHandle:
    """Serve TraceService/Export on address ("host:port"; port 0 picks one, see handle.port).

    credentials: TLS (webconfig.grpc_server_credentials); None serves plaintext.
    auth: checks each call's `authorization` metadata; None accepts every call.
    max_concurrent_rpcs: calls in progress at once; grpc refuses more with RESOURCE_EXHAUSTED.
    Raises OSError naming the address when it cannot listen (in use, also by another agent:
    SO_REUSEPORT is off, so a second agent on the same port fails instead of sharing it).
    """
    if max_concurrent_rpcs < 1:
        raise ValueError("max_concurrent_rpcs must be positive")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="otlp-grpc"),
        options=[
            # The request limit, so that the core never buffers a larger message (see the top).
            ("grpc.max_receive_message_length", intake.max_request_bytes),
            # grpc turns SO_REUSEPORT on by default on Linux: a second process could then bind the
            # same port and silently take half the connections.
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
            *FLOW_CONTROL_OPTIONS,
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    handler = _ExportHandler(intake, auth)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(handler.export),  # raw bytes in and out
    }),))
    # grpc's bind error gives no reason (and its C core logs a line of its own): bind a plain
    # socket first, as the HTTP listeners do, so that the error says why (Address already in use).
    try:
        bind_listener("OTLP/gRPC", address, 1).close()
    except ValueError:
        pass  # an address form only grpc understands: let grpc answer
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
