"""OTLP span load for the benchmarks: vLLM-shaped requests, sent from a separate process.

The sender runs in its own process (multiprocessing, spawn: the parent may already run gRPC
threads, which do not survive fork) so that its CPU is not charged to the agent being measured.
Each request is re-timed and given fresh span ids before it is sent (see renewed); that encoding
costs the sender ~1 ms per 512 spans, in its own process, far below what the agent takes to decode.
"""

from __future__ import annotations

import http.client
import multiprocessing
import struct
import time
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.spanfactory import request as otlp_request
from tests.spanfactory import span, vllm_attributes

GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
HTTP_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


def vllm_request(spans: int, start: float, service: str = "vllm", request_prefix: str = "cmpl") -> ExportTraceServiceRequest:
    """One OTLP request of `spans` vLLM `llm_request` spans that ended up to ~10 s before `start`.

    Each span has its own request id and a different prefill/decode split, as a busy server's would.
    """
    made = []
    for n in range(spans):
        attributes = vllm_attributes(ttft=0.2 + (n % 7) * 0.01, prefill=0.1 + (n % 5) * 0.01,
                                     decode=1.0 + (n % 11) * 0.05, e2e=1.9, prompt_tokens=400 + n % 300,
                                     completion_tokens=100 + n % 90)
        attributes["gen_ai.request.id"] = f"{request_prefix}-{n}"
        begin = start - 10.0 + (n % 100) * 0.05
        made.append(span("llm_request", begin, begin + 1.9, attributes, kind=Span.SPAN_KIND_SERVER))
    return otlp_request(made, {"service.name": service, "vllm.process_id": 4242})


def payloads(count: int, spans_per_request: int, start: float | None = None) -> list[bytes]:
    """`count` distinct serialised requests (distinct span ids), built once before any timing."""
    start = time.time() if start is None else start
    return [vllm_request(spans_per_request, start, request_prefix=f"cmpl{i}").SerializeToString()
            for i in range(count)]


def spans_in(payload: bytes) -> int:
    request = ExportTraceServiceRequest.FromString(payload)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


@dataclass
class SendResult:
    requests: int = 0
    accepted_spans: int = 0
    refused_requests: int = 0  # 503/UNAVAILABLE: the agent's queue was full ("retry later")
    failed_requests: int = 0
    seconds: float = 0.0


class _HttpSender:
    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def send(self, body: bytes) -> str:
        self._connection.request("POST", HTTP_PATH, body=body, headers={"Content-Type": PROTOBUF})
        response = self._connection.getresponse()
        response.read()
        if response.status == 200:
            return "ok"
        return "refused" if response.status in (429, 503) else "failed"

    def close(self) -> None:
        self._connection.close()


class _GrpcSender:
    def __init__(self, address: str):
        import grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(address)
        self._export = self._channel.unary_unary(GRPC_METHOD)  # bytes in, bytes out

    def send(self, body: bytes) -> str:
        try:
            self._export(body, timeout=30)
            return "ok"
        except self._grpc.RpcError as error:
            return "refused" if error.code() == self._grpc.StatusCode.UNAVAILABLE else "failed"

    def close(self) -> None:
        self._channel.close()


def _sender(protocol: str, address: str) -> _HttpSender | _GrpcSender:
    return _HttpSender(address) if protocol == "http" else _GrpcSender(address)


def flood(protocol: str, address: str, bodies: list[bytes], spans_per_body: int, seconds: float) -> SendResult:
    """Send as fast as the agent answers for `seconds` (one connection, request after request)."""
    templates = [ExportTraceServiceRequest.FromString(body) for body in bodies]
    sender = _sender(protocol, address)
    result = SendResult()
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            outcome = sender.send(renewed(templates[result.requests % len(templates)], result.requests))
            result.requests += 1
            if outcome == "ok":
                result.accepted_spans += spans_per_body
            elif outcome == "refused":
                result.refused_requests += 1
                time.sleep(0.005)  # what a well-behaved sender does on "retry later"
            else:
                result.failed_requests += 1
    finally:
        result.seconds = time.perf_counter() - started
        sender.close()
    return result


def paced(protocol: str, address: str, spans_per_second: float, spans_per_request: int, seconds: float,
          stop_event=None, services: tuple[str, ...] = ("vllm",)) -> SendResult:
    """Send `spans_per_second` of fresh spans (timestamps moved to now) for `seconds` or until stopped,
    each request from the next of `services` in turn."""
    templates = [vllm_request(spans_per_request, time.time(), service=name) for name in services]
    sender = _sender(protocol, address)
    result = SendResult()
    period = spans_per_request / spans_per_second
    started = time.perf_counter()
    next_send = started
    try:
        while time.perf_counter() - started < seconds and not (stop_event and stop_event.is_set()):
            outcome = sender.send(renewed(templates[result.requests % len(templates)], result.requests))
            result.requests += 1
            if outcome == "ok":
                result.accepted_spans += spans_per_request
            elif outcome == "refused":
                result.refused_requests += 1
            else:
                result.failed_requests += 1
            next_send += period
            time.sleep(max(0.0, next_send - time.perf_counter()))
    finally:
        result.seconds = time.perf_counter() - started
        sender.close()
    return result


def renewed(request: ExportTraceServiceRequest, serial: int) -> bytes:
    """The request as new spans, serialised: the newest ending now (the agent refuses spans older
    than its retention) and span ids never sent before (the agent counts a span id once, so
    re-sending the same spans would measure its duplicate check instead of its accounting)."""
    spans = [s for resource in request.resource_spans for scope in resource.scope_spans for s in scope.spans]
    newest = max(s.end_time_unix_nano for s in spans)
    shift = time.time_ns() - newest
    for n, s in enumerate(spans):
        s.start_time_unix_nano += shift
        s.end_time_unix_nano += shift
        s.span_id = struct.pack(">II", serial + 1, n)  # all-zero ids are invalid
    return request.SerializeToString()


# --- running a sender in its own process --------------------------------------------------------------


def _child(function_name: str, kwargs: dict, results) -> None:
    function = {"flood": flood, "paced": paced}[function_name]
    results.put(function(**kwargs))


class SenderProcess:
    """flood() or paced() in a spawned process; `join()` returns its SendResult."""

    def __init__(self, function_name: str, **kwargs):
        context = multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self.stop_event = context.Event() if function_name == "paced" else None
        if self.stop_event is not None:
            kwargs["stop_event"] = self.stop_event
        self._process = context.Process(target=_child, args=(function_name, kwargs, self._results), daemon=True)

    def start(self) -> "SenderProcess":
        self._process.start()
        return self

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    def join(self, timeout: float = 60.0) -> SendResult:
        result = self._results.get(timeout=timeout)
        self._process.join(timeout)
        return result
