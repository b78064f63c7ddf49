"""Span intake: spans received by decoder, spans rejected or left unmatched by reason, windows clipped.

Each gpu_spans_<field>_total counter of gpuphase/model/metrics.yaml is read from the SpanStats field of
the same name: {label value: count}, or a plain count for a counter without labels.
"""

from __future__ import annotations

from typing import Iterator

from gpuphase.exporters.collectors.families import Family, nonempty
from gpuphase.model import metricdefs
from gpuphase.model.view import View


def _field(metric_name: str) -> str:
    return metric_name.removeprefix("gpu_spans_").removesuffix("_total")


def collect(view: View) -> Iterator[Family]:
    families = []
    for definition in metricdefs.by_collector("spans"):
        family = Family(definition.name)
        counts = getattr(view.spans, _field(definition.name))
        if not definition.labels:
            family.add((), counts)
        else:
            for label_value, count in counts.items():
                family.add((label_value,), count)
        families.append(family)
    return nonempty(families)
