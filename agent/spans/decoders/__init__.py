"""Span → PhaseWindow dispatch: try each decoder in order, count what happened to every span.

Order: generic first (an explicit `gpuphase.phase` annotation wins), then vLLM, SGLang, TGI.
A decoder returns None for spans that are not its own; a span no decoder claims is counted as
unmatched{reason="unknown_span"}. A decoder that claims a span but finds it broken raises
InvalidSpan (rejected{reason="invalid_window"}) or UnmatchedSpan(reason).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gpuphase.agent.spans.attributes import InvalidSpan, UnmatchedSpan, read_attributes
from gpuphase.agent.spans.decoders import generic, sglang, tgi, vllm
from gpuphase.agent.spans.decoders.common import Decoder, ResourceInfo
from gpuphase.model.phase import PhaseWindow

log = logging.getLogger(__name__)

DECODERS: tuple[tuple[str, Decoder], ...] = (
    (generic.NAME, generic.decode),
    (vllm.NAME, vllm.decode),
    (sglang.NAME, sglang.decode),
    (tgi.NAME, tgi.decode),
)

# Every attribute any decoder reads: a span's attributes are walked once, not once per decoder.
ALL_KEYS = frozenset().union(generic.KEYS, vllm.KEYS, sglang.KEYS, tgi.KEYS)

INVALID_WINDOW = "invalid_window"
DECODER_ERROR = "decoder_error"
UNKNOWN_SPAN = "unknown_span"


@dataclass
class DecodeOutcome:
    """Everything one export request turned into; counted only once the request is accepted."""

    windows: list[PhaseWindow] = field(default_factory=list)
    received: Counter = field(default_factory=Counter)  # spans decoded, by decoder
    rejected: Counter = field(default_factory=Counter)  # spans refused, by reason
    unmatched: Counter = field(default_factory=Counter)  # spans not placeable, by reason
    span_count: int = 0
    first_error: str = ""

    @property
    def rejected_spans(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        if not self.first_error:
            self.first_error = message


def decode_request(request: ExportTraceServiceRequest) -> DecodeOutcome:
    outcome = DecodeOutcome()
    for resource_spans in request.resource_spans:
        resource = ResourceInfo.from_resource(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            scope, spans = scope_spans.scope, scope_spans.spans
            outcome.span_count += len(spans)
            for span in spans:
                _decode_span(resource, scope, span, outcome)
    return outcome


def _decode_span(resource: ResourceInfo, scope, span, outcome: DecodeOutcome) -> None:
    name = span.name
    found = read_attributes(span.attributes, ALL_KEYS)
    for decoder_name, decoder in DECODERS:
        try:
            windows = decoder(resource, scope, span, name, found)
        except InvalidSpan as error:
            outcome.reject(INVALID_WINDOW, f"{decoder_name}: {error}")
            return
        except UnmatchedSpan as unmatched:
            outcome.unmatched[unmatched.reason] += 1
            return
        except Exception:  # a decoder bug must cost one span, never the receiver
            log.exception("decoder %s failed on span %r", decoder_name, name[:64])
            outcome.reject(DECODER_ERROR, f"{decoder_name}: internal error")
            return
        if windows is not None:
            outcome.received[decoder_name] += 1
            outcome.windows += windows
            return
    outcome.unmatched[UNKNOWN_SPAN] += 1
