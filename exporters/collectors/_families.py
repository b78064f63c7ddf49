"""Shared building blocks of the collectors: metric families made from agent/metrics.yaml.

Names, types, units, help texts and label sets live only in metrics.yaml; a collector asks for
a family by metric name and fills in samples. Label values and sample values are converted
here (str / float) so a malformed reading fails inside the collector that produced it, where
the registry isolates it, instead of later while the exposition text is being written.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import metricdefs
from agent.metricdefs import MetricDef
from agent.snapshot import GpuSample
from agent.view import View

GPU_LABELS = ("gpu", "uuid")


class Family:
    """One metric family under construction; `add` takes label values in metrics.yaml order."""

    def __init__(self, name: str):
        self.definition: MetricDef = metricdefs.load()[name]
        self.metric: Metric = _new_metric(self.definition)

    def add(self, label_values: Sequence[object], value: float) -> None:
        labels = self.definition.labels
        if len(label_values) != len(labels):
            raise ValueError(f"{self.definition.name}: {len(label_values)} label values for labels {labels}")
        self.metric.add_metric([str(v) for v in label_values], float(value))

    def add_gpu(self, sample: GpuSample, value: float, *extra: object) -> None:
        """A per-GPU sample: gpu and uuid come first, then the family's extra labels."""
        identity = sample.identity
        self.add((identity.index, identity.uuid, *extra), value)


def _new_metric(definition: MetricDef) -> Metric:
    kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
    try:
        kind = kinds[definition.type]
    except KeyError:
        raise ValueError(f"{definition.name}: unsupported metric type {definition.type!r}") from None
    return kind(
        definition.family_name,
        definition.help,
        labels=definition.labels,
        unit=definition.unit,
    )


def nonempty(families: Iterable[Family]) -> Iterator[Metric]:
    """The finished families that have samples; an empty family only adds HELP/TYPE noise."""
    for family in families:
        if family.metric.samples:
            yield family.metric


def gpus(view: View) -> tuple[GpuSample, ...]:
    return view.snapshot.gpus if view.snapshot is not None else ()


def live_gpus(view: View) -> Iterator[GpuSample]:
    """GPUs that answered the last tick. A lost GPU exports no value series: stale numbers would lie."""
    return (sample for sample in gpus(view) if sample.up)


def is_reading(definition: MetricDef) -> bool:
    """True for a metric read straight from GpuSample.values / .labelled (see `reading_families`)."""
    return definition.labels[:2] == GPU_LABELS and len(definition.labels) <= 3


def reading_families(view: View, collector: str, exclude: Iterable[str] = ()) -> Iterator[Metric]:
    """The table-driven part of the device collectors.

    Every metric of `collector` in metrics.yaml labelled (gpu, uuid) is taken from
    GpuSample.values under its own name; one with a single extra label from
    GpuSample.labelled[name] = {label value: value}. So adding such a metric to metrics.yaml
    and to the backend's reading is all it takes to export it. Metrics a GPU lacks are left
    out for that GPU (absent is not zero).
    """
    skipped = set(exclude)
    definitions = [d for d in metricdefs.by_collector(collector) if d.name not in skipped and is_reading(d)]
    families = [Family(d.name) for d in definitions]
    for sample in live_gpus(view):
        for family in families:
            name = family.definition.name
            if family.definition.extra_labels:
                by_label: Mapping[str, float] = sample.labelled.get(name, {})
                for label_value, value in by_label.items():
                    family.add_gpu(sample, value, label_value)
            elif name in sample.values:
                family.add_gpu(sample, sample.values[name])
    return nonempty(families)


def table_collector(collector: str):
    """A collect(view) function for a collector whose metrics all come from `reading_families`."""

    def collect(view: View) -> Iterator[Metric]:
        return reading_families(view, collector)

    collect.__qualname__ = f"{collector}.collect"
    return collect
