"""Serving phases per GPU and service: time, tokens, energy and activity integrals, and span recency.

The counters are integrals, not averages, so that `sum by` and `rate` stay correct: the average
SM activity in decode is rate(gpu_phase_sm_active_seconds_total{phase="decode"}) divided by
rate(gpu_phase_seconds_total{phase="decode"}). Each gpu_phase_<field>_total counter of
gpuphase/model/metrics.yaml is read from the PhaseSeries field of the same name; a field that is None
(no GPM, so no activity integral) is left out rather than reported as 0.

Phase counters are cumulative totals kept by the accountant, so they stay exported while a
GPU is down: they are still true, they just stop growing.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Iterator

from gpuphase.exporters.collectors.families import Family, add_series, nonempty
from gpuphase.model import metricdefs
from gpuphase.model.view import PhaseSeries, View

_LAST_SPAN = "gpu_phase_last_span_timestamp_seconds"
_SERIES_FIELDS = {f.name for f in fields(PhaseSeries)}


def _field(metric_name: str) -> str:
    field = metric_name.removeprefix("gpu_phase_").removesuffix("_total")
    if field not in _SERIES_FIELDS:
        raise LookupError(f"{metric_name} has no PhaseSeries field {field!r} to read from")
    return field


def collect(view: View) -> Iterator[Family]:
    counters = [(Family(d.name), _field(d.name)) for d in metricdefs.by_collector("phases") if d.name != _LAST_SPAN]
    for series in view.phases:
        add_series((series.gpu, series.uuid, series.phase, series.service),
                   *((family, getattr(series, field)) for family, field in counters))
    last_span = Family(_LAST_SPAN)
    for (gpu, uuid, service), timestamp in view.last_span.items():
        last_span.add((gpu, uuid, service), timestamp)
    return nonempty((*(family for family, _ in counters), last_span))
