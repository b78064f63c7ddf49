"""Span intake: spans received by decoder, and spans rejected or left unmatched by reason.

Each gpu_spans_<field>_total counter of gpuphase/model/metrics.yaml is read from the SpanStats field of
the same name ({label value: count}).
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
        for label_value, count in getattr(view.spans, _field(definition.name)).items():
            family.add((label_value,), count)
        families.append(family)
    return nonempty(families)
