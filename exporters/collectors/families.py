"""Shared building blocks of the collectors: metric families made from gpuphase/model/metrics.yaml.

Names, types, units, help texts and label sets live only in metrics.yaml; a collector asks for
a family by metric name and fills in samples. Label values and sample values are converted
here (str / float) so a malformed reading fails inside the collector that produced it, where
the registry isolates it, instead of later while the exposition text is being written: a Family
holds nothing exporters.exposition cannot write.

A Family keeps its samples as label values and values, which is all the exposition writer
needs; `metric()` turns it into a prometheus_client family for the paths that read the registry
through prometheus_client (the OTLP push, name escapings the writer leaves to prometheus_client).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import Metric

from gpuphase.exporters.exposition import SeriesHead, prometheus_metric, series_head
from gpuphase.model import metricdefs
from gpuphase.model.metricdefs import MetricDef
from gpuphase.model.snapshot import GpuSample
from gpuphase.model.view import View

GPU_LABELS = ("gpu", "uuid")


class Family:
    """One metric family under construction; `add` takes label values in metrics.yaml order.

    The samples are two parallel lists, `label_values` (tuples of str) and `values` (floats): a
    scrape adds about 1,500 of them, and a pair tuple each would only feed the garbage collector.
    """

    __slots__ = ("definition", "head", "label_values", "values")

    def __init__(self, definition: MetricDef | str):
        if isinstance(definition, str):
            definition = metricdefs.load()[definition]
        self.definition: MetricDef = definition
        self.head: SeriesHead = series_head(definition)  # raises here, in the collector, for a bad name
        self.label_values: list[tuple[str, ...]] = []
        self.values: list[float] = []

    def add(self, label_values: Sequence[object], value: float) -> None:
        self._append(label_strings(label_values), value)

    def _append(self, labels: tuple[str, ...], value: float) -> None:
        if len(labels) != self.head.width:
            raise ValueError(f"{self.definition.name}: {len(labels)} label values for labels {self.definition.labels}")
        self.label_values.append(labels)
        self.values.append(float(value))

    def add_gpu(self, sample: GpuSample, value: float, *extra: object) -> None:
        """A per-GPU sample: gpu and uuid come first, then the family's extra labels."""
        identity = sample.identity
        self.add((identity.index, identity.uuid, *extra), value)

    def metric(self) -> Metric:
        """The same family as a prometheus_client Metric."""
        metric = prometheus_metric(self.definition)
        for label_values, value in zip(self.label_values, self.values):
            metric.add_metric(label_values, value)
        return metric


def label_strings(label_values: Iterable[object]) -> tuple[str, ...]:
    return tuple([str(v) for v in label_values])


def add_series(label_values: Sequence[object], *samples: tuple[Family, float | None]) -> None:
    """One series in several families that share its label values, converted once; a None value
    is left out of its family (absent, not zero)."""
    labels = label_strings(label_values)
    for family, value in samples:
        if value is not None:
            family._append(labels, value)


def nonempty(families: Iterable[Family]) -> Iterator[Family]:
    """The finished families that have samples; an empty family only adds HELP/TYPE noise."""
    return (family for family in families if family.values)


def gpus(view: View) -> tuple[GpuSample, ...]:
    return view.snapshot.gpus if view.snapshot is not None else ()


def live_gpus(view: View) -> Iterator[GpuSample]:
    """GPUs that answered the last tick. A lost GPU exports no value series: stale numbers would lie."""
    return (sample for sample in gpus(view) if sample.up)


def is_reading(definition: MetricDef) -> bool:
    """True for a metric read straight from GpuSample.values / .labelled (see `reading_families`)."""
    return definition.labels[:2] == GPU_LABELS and len(definition.labels) <= 3


def reading_families(view: View, collector: str, exclude: Iterable[str] = ()) -> Iterator[Family]:
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
    columns = [(family, family.definition.name, bool(family.definition.extra_labels)) for family in families]
    for sample in live_gpus(view):
        gpu = label_strings((sample.identity.index, sample.identity.uuid))  # once for all its series
        for family, name, labelled in columns:
            if labelled:
                by_label: Mapping[str, float] = sample.labelled.get(name, {})
                for label_value, value in by_label.items():
                    family._append((*gpu, str(label_value)), value)
            elif name in sample.values:
                family._append(gpu, sample.values[name])
    return nonempty(families)


def table_collector(collector: str):
    """A collect(view) function for a collector whose metrics all come from `reading_families`."""

    def collect(view: View) -> Iterator[Family]:
        return reading_families(view, collector)

    collect.__qualname__ = f"{collector}.collect"
    return collect
