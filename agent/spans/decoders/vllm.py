"""vLLM V1 (and TensorRT-LLM's vLLM-style) `llm_request` spans → one prefill and one decode window.

vLLM emits one SERVER span per finished request from the API server (docs/spans.md): start is the
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

SGLang's root span (` Req <rid>`, scope `sglang server`, attribute `rid`) carries the same
gen_ai.latency.* names from 0.5.9 but measures them from the API server's dispatch, so its
"prefill" would include the queue wait: it is left to the SGLang decoder (sglang.is_root_span).
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.attributes import InvalidSpan, UnmatchedSpan
from gpuphase.agent.spans.decoders import sglang
from gpuphase.agent.spans.decoders.common import ResourceInfo, make_window, span_ids, span_seconds
from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow

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


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span, name: str,
           found: attrs.Found) -> list[PhaseWindow] | None:
    if name != SPAN_NAME and (TIME_TO_FIRST_TOKEN not in found or sglang.is_root_span(scope, name, found)):
        return None
    start, end = span_seconds(span)
    ttft = attrs.get_float(found, TIME_TO_FIRST_TOKEN)
    if ttft is None:
        raise UnmatchedSpan("no_time_to_first_token")
    earliest, latest = start - CLOCK_SLACK_SECONDS, end + CLOCK_SLACK_SECONDS
    first_token = start + ttft
    if not earliest <= first_token <= latest:
        raise InvalidSpan("time_to_first_token lies outside the request span")

    prefill_time = attrs.get_float(found, TIME_IN_PREFILL)
    if prefill_time is not None:
        prefill_start = first_token - prefill_time
    else:
        prefill_start = start + (attrs.get_float(found, TIME_IN_QUEUE) or 0.0)
    if not earliest <= prefill_start <= latest:
        raise InvalidSpan("prefill start lies outside the request span")

    decode_time = attrs.get_float(found, TIME_IN_DECODE)
    if decode_time is not None:
        decode_end = first_token + decode_time
    else:
        e2e = attrs.get_float(found, E2E)
        decode_end = start + e2e if e2e is not None else end
    if not earliest <= decode_end <= latest:
        raise InvalidSpan("decode end lies outside the request span")

    # Clamped into the span: first_token and decode_end may poke out by the clock slack.
    first_token = min(max(first_token, start), end)
    prefill_tokens = attrs.first_count(found, PROMPT_TOKENS)
    decode_tokens = attrs.first_count(found, OUTPUT_TOKENS)
    ids = span_ids(span)
    return [
        make_window(PREFILL, min(max(prefill_start, start), end), first_token, ids, resource, NAME, prefill_tokens),
        make_window(DECODE, first_token, min(max(decode_end, first_token), end), ids, resource, NAME, decode_tokens),
    ]
