"""SGLang slice spans (`--enable-trace`) → one window per forward slice, wall-clock start/end.

SGLang traces each request as a root `Req <rid>` with per-thread spans carrying `pid`, `host_id`
and `tp_rank` and slice spans named after the scheduler step (docs/spans.md). Only the slices that
run the model count as GPU work: `prefill_forward` and `chunked_prefill` are prefill, `decode_loop`
is decode; the waiting/tokenize slices are not work and are left to the other decoders (and end as
unknown_span). Each TP rank is its own process, so the span's `pid` (preferred over the
resource's) is what ties a slice to its GPU; `tp_rank` and `host_id` are not read: PhaseWindow
has no field for them (see docs/spans.md).
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.decoders.common import ResourceInfo, make_window, span_ids, span_seconds
from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow

NAME = "sglang"
PHASE_BY_SLICE = {"prefill_forward": PREFILL, "chunked_prefill": PREFILL, "decode_loop": DECODE}
# SGLang slices carry no token counts today; accept the GenAI convention names if they appear.
TOKENS_BY_PHASE = {PREFILL: ("gen_ai.usage.input_tokens",), DECODE: ("gen_ai.usage.output_tokens",)}

KEYS = frozenset({"pid", *TOKENS_BY_PHASE[PREFILL], *TOKENS_BY_PHASE[DECODE]})


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span, name: str,
           found: attrs.Found) -> list[PhaseWindow] | None:
    phase = PHASE_BY_SLICE.get(name)
    if phase is None:
        return None
    start, end = span_seconds(span)
    tokens = attrs.first_count(found, TOKENS_BY_PHASE[phase])
    pid = attrs.optional_pid(attrs.get_value(found, "pid"))
    return [make_window(phase, start, end, span_ids(span), resource, NAME, tokens, pid)]
