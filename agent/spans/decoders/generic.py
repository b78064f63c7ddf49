"""The gpuphase convention: any span that says which phase it covers (docs/spans.md).

  gpuphase.phase    "prefill" | "decode"   required; the window is the span's start..end
  gpuphase.tokens   int                    optional; prompt tokens (prefill) / output tokens (decode)
  gpuphase.gpu.ids  string list or "0,1"   optional; on the span or the resource; indices or UUIDs

Tried first by the dispatcher: a sender that annotates a span explicitly means it, even if the
span also looks like one of the known servers'.
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.attributes import InvalidSpan
from gpuphase.agent.spans.decoders.common import ResourceInfo, make_window, span_ids, span_seconds
from gpuphase.model.phase import WORK_PHASES, PhaseWindow

NAME = "generic"
PHASE_ATTRIBUTE = "gpuphase.phase"
TOKENS_ATTRIBUTE = "gpuphase.tokens"

TOKENS_KEYS = (TOKENS_ATTRIBUTE,)

KEYS = frozenset({PHASE_ATTRIBUTE, TOKENS_ATTRIBUTE, attrs.GPU_IDS_ATTRIBUTE})


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span, name: str,
           found: attrs.Found) -> list[PhaseWindow] | None:
    if PHASE_ATTRIBUTE not in found:
        return None
    phase = attrs.get_value(found, PHASE_ATTRIBUTE)
    if phase not in WORK_PHASES:
        raise InvalidSpan(f"{PHASE_ATTRIBUTE} must be one of {', '.join(WORK_PHASES)}")
    start, end = span_seconds(span)
    tokens = attrs.first_count(found, TOKENS_KEYS)
    gpu_ids = attrs.gpu_ids(attrs.get_value(found, attrs.GPU_IDS_ATTRIBUTE))
    return [make_window(str(phase), start, end, span_ids(span), resource, NAME, tokens, None, gpu_ids)]
