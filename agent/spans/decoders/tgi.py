"""Hugging Face TGI router batch spans `prefill` and `decode` → one window per batch step.

What the router emits (huggingface/text-generation-inference, router/src/infer/v2/scheduler.rs):
`async fn prefill` and `async fn decode` are `#[instrument(skip_all)]`, so the scheduler's spans
are named `prefill` / `decode` with no fields, running inside a root `batch` span
(`info_span!(parent: None, "batch", batch_size = ...)`). Inside them the sharded gRPC client
(router/client/src/v2|v3/client.rs) opens child spans of the same names with
`#[instrument(skip_all, fields(id = &batch.id, size = &batch.size))]`, where `size` is the number
of requests in the batch. tracing-opentelemetry adds `code.namespace` (the Rust module path,
`text_generation_router::…` / `text_generation_client::…`).

So a batch step arrives as two nested spans of the same phase. Emitting both is harmless for
phase time (a GPU is in a phase while any window of it is open), and tokens are taken only from
`size` on decode spans (each decode step yields one token per request; prefill `size` counts
requests, not prompt tokens, so prefill tokens stay 0), which only the client span carries.

`prefill` and `decode` are common words, so a span is TGI's only when its code.namespace or the
resource's service.name (default `text-generation-inference.router`) says so.
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.decoders.common import ResourceInfo, make_window, span_ids, span_seconds
from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow

NAME = "tgi"
PHASE_BY_NAME = {"prefill": PREFILL, "decode": DECODE}
CODE_NAMESPACE_PREFIX = "text_generation"
SERVICE_PREFIX = "text-generation-inference"

TOKENS_KEYS = ("size",)

KEYS = frozenset({"code.namespace", *TOKENS_KEYS})


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span, name: str,
           found: attrs.Found) -> list[PhaseWindow] | None:
    phase = PHASE_BY_NAME.get(name)
    if phase is None:
        return None
    namespace = attrs.get_string(found, "code.namespace") or ""
    if not (namespace.startswith(CODE_NAMESPACE_PREFIX) or resource.service.startswith(SERVICE_PREFIX)):
        return None
    start, end = span_seconds(span)
    tokens = attrs.first_count(found, TOKENS_KEYS) if phase == DECODE else 0
    return [make_window(phase, start, end, span_ids(span), resource, NAME, tokens)]
