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


# --- SGLang (sgl-project/sglang, python/sglang/srt/observability/trace.py and req_time_stats.py) ---

SGLANG_SCOPE = "sglang server"  # trace.get_tracer("sglang server")


def _sg_span(name: str, start: float, end: float, trace_id: bytes, parent: bytes,
             attributes: dict[str, Any] | None = None) -> Span:
    s = span(name, start, end, attributes, trace_id=trace_id, span_id=next(_ids).to_bytes(8, "big"))
    s.parent_span_id = parent
    return s


def sglang_request(rid: str, arrive: float, prefill: tuple[float, float], decode: tuple[float, float],
                   steps: int, prompt: int, completion: int, cached: int = 0, chunks: int = 1,
                   ranks: dict[int, int] | None = None, api_pid: int = 1000, level: int = 3,
                   names: str = "0.5.23") -> dict[int | str, list[Span]]:
    """One request as SGLang traces it, spans by the process that sends them ("api" or the TP rank).

    Shapes (observability/trace.py, TraceReqContext): root `" Req <rid[:8]>"` (role "" when not
    disaggregated) with `rid`, `module`, and at finish gen_ai.usage.* / gen_ai.latency.*
    (tokenizer side, make_span_attrs / convert_to_gen_ai_span_attrs); the API thread span (no
    tp_rank) ends at dispatch; per rank a thread span `Scheduler [TP r] [PP 0] (host:… | pid:N)`
    with tp_rank, pp_rank, host_id, pid, thread_label, ending at completion; slices under it
    (req_time_stats.py, SchedulerReqTimeStats): request_process, prefill_waiting, prefill_forward
    (level 1, forward entry → prefill finished) with `chunks` chunked_prefill children when
    chunks > 1 (level 3), decode_waiting, decode_forward (level 1, first decode scheduled →
    completion) with `steps` decode_loop children (level 3). `names="0.5.3"`: the old `prefill` /
    `decode loop` slices straight under the thread span.
    """
    trace_id = bytes.fromhex(f"{abs(hash(rid)) % 2**64:016x}") + next(_ids).to_bytes(8, "big")
    ranks = ranks if ranks is not None else {0: 1001, 1: 1002}
    root_id = next(_ids).to_bytes(8, "big")
    (p0, p1), (d0, d1) = prefill, decode
    end = d1 + 0.002  # the tokenizer finishes a little after the scheduler's completion
    root_attrs = {"rid": rid, "module": "sglang::request",
                  "gen_ai.usage.prompt_tokens": prompt, "gen_ai.usage.completion_tokens": completion,
                  "gen_ai.usage.cached_tokens": cached, "gen_ai.request.id": rid,
                  "gen_ai.latency.time_to_first_token": p1 - arrive, "gen_ai.latency.e2e": end - arrive,
                  "gen_ai.latency.time_in_model_prefill": p1 - (arrive + 0.003),
                  "gen_ai.latency.time_in_model_decode": end - p1,
                  "gen_ai.latency.time_in_model_inference": end - (arrive + 0.003)}
    root = span(f" Req {rid[:8]}", arrive, end, root_attrs, trace_id=trace_id, span_id=root_id)
    out: dict[int | str, list[Span]] = {}
    api_thread = _sg_span(f"Tokenizer (host:0badcafe | pid:{api_pid})", arrive, arrive + 0.003, trace_id,
                          root_id, {"host_id": "0badcafe" * 4, "pid": api_pid, "thread_label": "Tokenizer"})
    api = [_sg_span("tokenize", arrive, arrive + 0.002, trace_id, api_thread.span_id),
           _sg_span("api_server_dispatch", arrive + 0.002, arrive + 0.003, trace_id, api_thread.span_id),
           api_thread, root]
    out["api"] = sorted(api, key=lambda s: s.end_time_unix_nano)
    for rank, pid in ranks.items():
        thread = _sg_span(f"Scheduler [TP {rank}] [PP 0] (host:0badcafe | pid:{pid})", arrive + 0.003, d1,
                          trace_id, root_id, {"tp_rank": rank, "pp_rank": 0, "host_id": "0badcafe" * 4,
                                              "pid": pid, "thread_label": "Scheduler"})
        tid = thread.span_id
        spans = [_sg_span("request_process", arrive + 0.003, arrive + 0.004, trace_id, tid),
                 _sg_span("prefill_waiting", arrive + 0.004, p0, trace_id, tid)]
        step = (d1 - d0) / steps
        if names == "0.5.3":
            spans.append(_sg_span("prefill", p0, p1, trace_id, tid))
            spans += [_sg_span("decode loop", d0 + i * step, d0 + (i + 1) * step, trace_id, tid) for i in range(steps)]
        else:
            pf = _sg_span("prefill_forward", p0, p1, trace_id, tid)
            if chunks > 1 and level >= 3:
                size = (p1 - p0) / chunks
                spans += [_sg_span("chunked_prefill", p0 + i * size, p0 + (i + 1) * size, trace_id, pf.span_id)
                          for i in range(chunks)]
            spans.append(pf)
            spans.append(_sg_span("decode_waiting", p1, d0, trace_id, tid))
            df = _sg_span("decode_forward", d0, d1, trace_id, tid)
            if level >= 3:
                spans += [_sg_span("decode_loop", d0 + i * step, d0 + (i + 1) * step, trace_id, df.span_id,
                                   {"decode_ct": i}) for i in range(steps)]
            spans.append(df)
        spans.append(thread)
        out[rank] = spans
    return out


def sglang_exports(requests: list[dict[int | str, list[Span]]], service: str = "sglang",
                   batch: int = 64, order=None) -> list[ExportTraceServiceRequest]:
    """What the processes' BatchSpanProcessors send: each process's spans in end order, in batches of
    `batch` (SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE, 64), resource {service.name} only
    (Resource.create({SERVICE_NAME: server_name}): no process.pid). `order` (a random.Random)
    shuffles the batches of different processes against each other, keeping each one's order."""
    by_process: dict[int | str, list[Span]] = {}
    for req in requests:
        for process, spans in req.items():
            by_process.setdefault(process, []).extend(spans)
    queues = []
    for process, spans in by_process.items():
        spans.sort(key=lambda s: s.end_time_unix_nano)
        queues.append([request(spans[i:i + batch], {"service.name": service}, scope_name=SGLANG_SCOPE)
                       for i in range(0, len(spans), batch)])
    out = []
    while any(queues):
        live = [q for q in queues if q]
        q = order.choice(live) if order is not None else live[0]
        out.append(q.pop(0))
    return out


# --- TGI v3 (huggingface/text-generation-inference @ db931fc), as tracing-opentelemetry 0.21 and the
# shards' Python SDK export them; tests/fixtures/tgi/schedules.py builds whole steps from these.

# router level -> (code.namespace, code.filepath, code.lineno of the #[instrument] fn per RPC name)
TGI_ROUTER_LEVELS = {
    "backend": ("text_generation_router_v3::backend", "backends/v3/src/backend.rs",
                {"prefill": 296, "decode": 341}),
    "sharded": ("text_generation_router_v3::client::sharded_client", "backends/v3/src/client/sharded_client.rs",
                {"prefill": 141, "decode": 175}),
    "grpc": ("text_generation_router_v3::client::grpc_client", "backends/v3/src/client/grpc_client.rs",
             {"prefill": 229, "decode": 257}),
}
TGI_SHARD_SCOPE = "text_generation_server.models.flash_causal_lm"  # trace.get_tracer(__name__), :84
TGI_SERVER_SCOPE = "text_generation_server.tracing"  # UDSOpenTelemetryAioServerInterceptor, tracing.py:18


def tgi_id(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def tgi_router_span(name: str, start: float, end: float, level: str, trace_id: bytes, span_id: bytes,
                    parent_span_id: bytes = b"", fields: dict[str, Any] | None = None) -> Span:
    """A router span as tracing-opentelemetry 0.21 exports it: INTERNAL (no `otel.kind` field),
    location and thread attributes, `busy_ns`/`idle_ns`, and the #[instrument] fields, whose
    unsigned values arrive as decimal strings (pass them as str)."""
    attributes: dict[str, Any] = {}
    if level in TGI_ROUTER_LEVELS:
        namespace, path, lines = TGI_ROUTER_LEVELS[level]
        attributes.update({"code.filepath": path, "code.namespace": namespace, "code.lineno": lines.get(name, 1)})
    elif level == "batch":  # info_span!(parent: None, "batch", batch_size = ...)
        attributes.update({"code.filepath": "backends/v3/src/backend.rs",
                           "code.namespace": "text_generation_router_v3::backend", "code.lineno": 274})
    attributes.update({"thread.id": 3, "thread.name": "tokio-runtime-worker"})
    attributes.update(fields or {})
    duration_ns = round((end - start) * 1e9)
    attributes.update({"busy_ns": duration_ns // 10, "idle_ns": duration_ns - duration_ns // 10})
    return Span(name=name, kind=Span.SPAN_KIND_INTERNAL, trace_id=trace_id, span_id=span_id,
                parent_span_id=parent_span_id, start_time_unix_nano=round(start * 1e9),
                end_time_unix_nano=round(end * 1e9), attributes=key_values(attributes))


def tgi_shard_span(name: str, start: float, end: float, trace_id: bytes, span_id: bytes, parent_span_id: bytes,
                   kind: int = Span.SPAN_KIND_INTERNAL, attributes: dict[str, Any] | None = None) -> Span:
    """A shard span from the Python SDK: the gRPC SERVER span or a model method's INTERNAL span."""
    return Span(name=name, kind=kind, trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id,
                start_time_unix_nano=round(start * 1e9), end_time_unix_nano=round(end * 1e9),
                attributes=key_values(attributes or {}))


def tgi_server_attributes(method: str) -> dict[str, Any]:
    """UDSOpenTelemetryAioServerInterceptor._start_span's attributes (tracing.py:26-47)."""
    return {"rpc.system": "grpc", "rpc.grpc.status_code": 0, "rpc.method": method,
            "rpc.service": "generate.v3.TextGenerationService", "net.transport": "unix"}


def tgi_request(spans: Iterable[Span], service: str = "text-generation-inference.router",
                scope_name: str = "opentelemetry-otlp") -> ExportTraceServiceRequest:
    """One export of the router (its tracer is opentelemetry-otlp's pipeline tracer; the decoder
    does not look at it) or, with the shard's scope, of one shard."""
    return request(spans, {"service.name": service}, scope_name=scope_name)
