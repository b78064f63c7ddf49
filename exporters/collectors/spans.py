"""Span intake: spans received by decoder, spans rejected or left unmatched by reason, windows clipped.

Each gpu_spans_<field>_total counter of gpuphase/model/metrics.yaml is read from the SpanStats field of
the same name: {label value: count}, or a plain count for a counter without labels. Where the label
values are known in advance (the decoders of gpu_spans_received_total), each has a series from the
first scrape on, 0 until it counts something, so rate() and increase() see the first span.
"""

from __future__ import annotations

from typing import Iterator

from gpuphase.exporters.collectors.families import Family, nonempty
from gpuphase.model import metricdefs
from gpuphase.model.view import SPAN_DECODERS, View

# {SpanStats field: the label values that are always exported}
KNOWN_LABEL_VALUES: dict[str, tuple[str, ...]] = {"received": SPAN_DECODERS}


def _field(metric_name: str) -> str:
    return metric_name.removeprefix("gpu_spans_").removesuffix("_total")


def collect(view: View) -> Iterator[Family]:
    families = []
    for definition in metricdefs.by_collector("spans"):
        family = Family(definition.name)
        field = _field(definition.name)
        counts = getattr(view.spans, field)
        if not definition.labels:
            family.add((), counts)
        else:
            known = KNOWN_LABEL_VALUES.get(field, ())
            for label_value in known:
                family.add((label_value,), counts.get(label_value, 0))
            for label_value, count in counts.items():
                if label_value not in known:
                    family.add((label_value,), count)
        families.append(family)
    return nonempty(families)
