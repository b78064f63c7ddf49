"""What every decoder shares: the resource's identity and one checked way to build a window.

All sanity rules for windows live in make_window so that no decoder can emit a window the
accountant would choke on (NaN, reversed, 1970, a week long): such a span raises InvalidSpan and
is counted as rejected{reason="invalid_window"} by the dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.attributes import InvalidSpan
from gpuphase.model.phase import DECODE, PREFILL, WORK_PHASES, PhaseWindow, new_window

MIN_TIMESTAMP = 946_684_800.0  # 2000-01-01: anything earlier is an unset or broken clock
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01
MAX_WINDOW_SECONDS = 86_400.0  # no prefill or decode lasts a day; longer is a broken sender
# Tokens must be plausible for the window's length: at most what one instant can carry (a whole
# prompt served from the prefix cache; one step of a very large batch) plus a rate above what any
# GPU computes (a 1B-parameter model's prefill at an H100's full dense bf16 rate is ~5 x 10^5
# tokens/s; one request decodes at ~10^3 tokens/s, a whole batch rarely above ~10^5). A window over
# its ceiling is a broken or hostile sender: InvalidSpan, like a count over attributes.MAX_TOKENS
# (docs/spans.md).
MAX_TOKENS_AT_ONCE = {PREFILL: 1_048_576, DECODE: 65_536}
MAX_TOKENS_PER_SECOND = {PREFILL: 1_000_000.0, DECODE: 250_000.0}
_ALWAYS_PLAUSIBLE = min(MAX_TOKENS_AT_ONCE.values())  # the common case costs one comparison
TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8

_ZERO_SPAN_ID = bytes(SPAN_ID_BYTES)
_PHASE_SUFFIX = {phase: phase.encode() for phase in WORK_PHASES}  # the end of a window's key

_RESOURCE_KEYS = frozenset({"service.name", "process.pid", "vllm.process_id", attrs.GPU_IDS_ATTRIBUTE})


@dataclass(frozen=True)
class ResourceInfo:
    """The few resource facts decoders use, read once per ResourceSpans (never the raw attributes)."""

    service: str = attrs.UNKNOWN_SERVICE
    pid: int | None = None
    gpu_ids: tuple[str, ...] = ()
    invalid_reason: str | None = None  # set when the resource names GPUs wrongly

    @classmethod
    def from_resource(cls, resource: Resource) -> "ResourceInfo":
        found = attrs.read_attributes(resource.attributes, _RESOURCE_KEYS)
        pid = (attrs.optional_pid(attrs.get_value(found, "process.pid"))
               or attrs.optional_pid(attrs.get_value(found, "vllm.process_id")))
        try:
            gpu_ids = attrs.gpu_ids(attrs.get_value(found, attrs.GPU_IDS_ATTRIBUTE))
            invalid_reason = None
        except InvalidSpan as error:
            gpu_ids, invalid_reason = (), str(error)
        return cls(attrs.service_name(found), pid, gpu_ids, invalid_reason)


# (resource, scope, span, span.name, the span's attributes among every decoder's KEYS as read by
# attrs.read_attributes) -> windows, or None if not its span
Decoder = Callable[[ResourceInfo, InstrumentationScope, Span, str, attrs.Found], "list[PhaseWindow] | None"]


def span_seconds(span: Span) -> tuple[float, float]:
    """The span's wall-clock start and end in unix seconds, checked to be a plausible interval."""
    start, end = span.start_time_unix_nano / 1e9, span.end_time_unix_nano / 1e9
    _check_interval(start, end)
    return start, end


def span_ids(span: Span) -> bytes:
    """trace id + span id, the start of the span's window keys.

    The key must identify the span: without real ids every such span would look like a duplicate
    of every other to the accountant's de-duplication, so they are InvalidSpan.
    """
    trace_id, span_id = span.trace_id, span.span_id
    if len(trace_id) != TRACE_ID_BYTES or len(span_id) != SPAN_ID_BYTES or span_id == _ZERO_SPAN_ID:
        raise InvalidSpan("span has no valid trace or span id")
    return trace_id + span_id


def _check_interval(start: float, end: float) -> None:
    if MIN_TIMESTAMP <= start <= end <= MAX_TIMESTAMP and end - start <= MAX_WINDOW_SECONDS:
        return  # every comparison is false for NaN, and infinities fall outside the years
    if not (math.isfinite(start) and math.isfinite(end)):
        raise InvalidSpan("window time is not finite")
    if not (MIN_TIMESTAMP <= start <= MAX_TIMESTAMP and MIN_TIMESTAMP <= end <= MAX_TIMESTAMP):
        raise InvalidSpan("window time is before 2000 or after 2100")
    if end < start:
        raise InvalidSpan("window ends before it starts")
    raise InvalidSpan("window is longer than a day")


def token_ceiling(phase: str, seconds: float) -> float:
    """The most tokens a window of this phase and length may carry (MAX_TOKENS_AT_ONCE and _PER_SECOND)."""
    return MAX_TOKENS_AT_ONCE[phase] + MAX_TOKENS_PER_SECOND[phase] * seconds


def make_window(phase: str, start: float, end: float, ids: bytes, resource: ResourceInfo, decoder: str,
                tokens: int = 0, pid: int | None = None, gpu_ids: tuple[str, ...] = ()) -> PhaseWindow:
    """A validated PhaseWindow of the span whose span_ids() are `ids`; span-level pid/gpu_ids
    override the resource's. Positional arguments: this runs twice per vLLM span."""
    if phase not in _PHASE_SUFFIX:
        raise InvalidSpan(f"unknown phase {phase!r}")
    if resource.invalid_reason:
        raise InvalidSpan(resource.invalid_reason)
    _check_interval(start, end)
    if tokens > _ALWAYS_PLAUSIBLE and tokens > token_ceiling(phase, end - start):
        raise InvalidSpan(f"{tokens} {phase} tokens in {end - start:.6g} s is implausible "
                          f"(at most {MAX_TOKENS_AT_ONCE[phase]} + {MAX_TOKENS_PER_SECOND[phase]:.0f}/s)")
    return new_window((phase, start, end, resource.service, decoder, ids + _PHASE_SUFFIX[phase], tokens,
                       resource.pid if pid is None else pid, gpu_ids or resource.gpu_ids))
