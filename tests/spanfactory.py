"""Build OTLP protobuf spans shaped like each model server's, for decoder and receiver tests."""

from __future__ import annotations

import itertools
from typing import Any, Iterable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

T0 = 1_700_000_000.0  # a plausible wall-clock time (2023-11-14)
_ids = itertools.count(1)


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, (list, tuple)):
        out = AnyValue()
        out.array_value.values.extend(any_value(item) for item in value)
        return out
    raise TypeError(type(value))


def key_values(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


def span(name: str, start: float, end: float, attributes: dict[str, Any] | None = None,
         kind: int = Span.SPAN_KIND_INTERNAL, trace_id: bytes | None = None, span_id: bytes | None = None) -> Span:
    n = next(_ids)
    return Span(
        name=name, kind=kind,
        trace_id=trace_id if trace_id is not None else n.to_bytes(16, "big"),
        span_id=span_id if span_id is not None else n.to_bytes(8, "big"),
        start_time_unix_nano=round(start * 1e9), end_time_unix_nano=round(end * 1e9),
        attributes=key_values(attributes or {}),
    )


def vllm_attributes(ttft=0.3, prefill=0.2, decode=1.5, queue=0.05, e2e=1.8,
                    prompt_tokens=512, completion_tokens=128) -> dict[str, Any]:
    attrs = {
        "gen_ai.latency.time_in_queue": queue,
        "gen_ai.latency.time_to_first_token": ttft,
        "gen_ai.latency.e2e": e2e,
        "gen_ai.latency.time_in_model_prefill": prefill,
        "gen_ai.latency.time_in_model_decode": decode,
        "gen_ai.latency.time_in_model_inference": None if prefill is None or decode is None else prefill + decode,
        "gen_ai.usage.prompt_tokens": prompt_tokens,
        "gen_ai.usage.completion_tokens": completion_tokens,
        "gen_ai.request.id": "cmpl-1234",
        "gen_ai.request.max_tokens": 256,
    }
    return {key: value for key, value in attrs.items() if value is not None}


def vllm_span(start: float = T0, duration: float = 1.8, **overrides: Any) -> Span:
    """A vLLM V1 `llm_request` SERVER span (vllm/tracing.py attribute names)."""
    return span("llm_request", start, start + duration, vllm_attributes(**overrides), kind=Span.SPAN_KIND_SERVER)


def sglang_span(slice_name: str, start: float = T0, duration: float = 0.2, pid: int = 4242,
                tp_rank: int = 0, host_id: str = "node-a", **extra: Any) -> Span:
    """An SGLang slice span with the per-thread attributes SGLang's tracer sets."""
    return span(slice_name, start, start + duration, {"pid": pid, "tp_rank": tp_rank, "host_id": host_id, **extra})


def tgi_span(phase: str, start: float = T0, duration: float = 0.05, client: bool = True, size: int = 8) -> Span:
    """A TGI router `prefill`/`decode` span: the client's carries id/size, the scheduler's nothing."""
    if client:
        attrs = {"code.namespace": "text_generation_client::v3::sharded_client", "id": 7, "size": size}
    else:
        attrs = {"code.namespace": "text_generation_router::infer::v3::scheduler"}
    return span(phase, start, start + duration, attrs)


def request(spans: Iterable[Span], resource: dict[str, Any] | None = None,
            scope_name: str = "test") -> ExportTraceServiceRequest:
    resource_attrs = {"service.name": "test-service"} if resource is None else resource
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=key_values(resource_attrs)),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope_name), spans=list(spans))],
    )])
