"""vLLM V1 (and TensorRT-LLM's vLLM-style) `llm_request` spans → one prefill and one decode window.

vLLM emits one SERVER span per finished request from the API server (design.md §5): start is the
arrival (wall clock), and the engine's monotonic latencies are attributes. We rebuild:
  first token = start + time_to_first_token
  prefill     = [first token - time_in_model_prefill, first token]
  decode      = [first token, first token + time_in_model_decode]
Without the model times (TensorRT-LLM sends only queue/ttft/e2e) we fall back to
  prefill = [start + time_in_queue (or start), first token], decode = [first token, start + e2e (or end)]
which over-counts scheduling gaps but keeps the phase order right. A span with no
time_to_first_token cannot be placed: unmatched{reason="no_time_to_first_token"}.

Because the latencies come from another clock than the span's timestamps, windows may poke out of
the span by up to CLOCK_SLACK_SECONDS and are clamped into it; more than that is a broken sender
(InvalidSpan → rejected{reason="invalid_window"}).
"""

from __future__ import annotations

from typing import Mapping

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.spans import attributes as attrs
from agent.spans.attributes import InvalidSpan, UnmatchedSpan
from agent.spans.decoders.common import ResourceInfo, make_window, span_seconds
from agent.spans.windows import DECODE, PREFILL, PhaseWindow

NAME = "vllm"
SPAN_NAME = "llm_request"
CLOCK_SLACK_SECONDS = 1.0

TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
E2E = "gen_ai.latency.e2e"
TIME_IN_PREFILL = "gen_ai.latency.time_in_model_prefill"
TIME_IN_DECODE = "gen_ai.latency.time_in_model_decode"
# Newer GenAI semantic-convention names first, vLLM's older ones second.
PROMPT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")

KEYS = frozenset({TIME_IN_QUEUE, TIME_TO_FIRST_TOKEN, E2E, TIME_IN_PREFILL, TIME_IN_DECODE,
                   *PROMPT_TOKENS, *OUTPUT_TOKENS})


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span,
           found: Mapping[str, attrs.Value]) -> list[PhaseWindow] | None:
    if span.name != SPAN_NAME and TIME_TO_FIRST_TOKEN not in found:
        return None
    start, end = span_seconds(span)
    ttft = attrs.get_float(found, TIME_TO_FIRST_TOKEN)
    if ttft is None:
        raise UnmatchedSpan("no_time_to_first_token")
    first_token = start + ttft
    _within_span(first_token, start, end, "time_to_first_token")

    prefill_time = attrs.get_float(found, TIME_IN_PREFILL)
    if prefill_time is not None:
        prefill_start = first_token - prefill_time
    else:
        prefill_start = start + (attrs.get_float(found, TIME_IN_QUEUE) or 0.0)
    _within_span(prefill_start, start, end, "prefill start")

    decode_time = attrs.get_float(found, TIME_IN_DECODE)
    if decode_time is not None:
        decode_end = first_token + decode_time
    else:
        e2e = attrs.get_float(found, E2E)
        decode_end = start + e2e if e2e is not None else end
    _within_span(decode_end, start, end, "decode end")

    def clamp(t: float) -> float:
        return min(max(t, start), end)

    common = dict(span=span, resource=resource, decoder=NAME)
    return [
        make_window(PREFILL, clamp(prefill_start), clamp(first_token),
                    tokens=attrs.first_count(found, *PROMPT_TOKENS), **common),
        make_window(DECODE, clamp(first_token), clamp(max(decode_end, first_token)),
                    tokens=attrs.first_count(found, *OUTPUT_TOKENS), **common),
    ]


def _within_span(t: float, start: float, end: float, what: str) -> None:
    if not start - CLOCK_SLACK_SECONDS <= t <= end + CLOCK_SLACK_SECONDS:
        raise InvalidSpan(f"{what} lies outside the request span")
