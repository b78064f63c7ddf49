"""The exposition writer: Prometheus text 0.0.4 and OpenMetrics 1.0.0 from the collectors' Families.

Why not prometheus_client's generate_latest: it builds every sample line from scratch on every
scrape, checking and escaping each label name and each label value again (on a host of 8 GPUs with
32 processes each and 3 services, 68,000 label-name checks per scrape: most of the scrape). The
series of a host are the same from one scrape to the next, so this writer formats each series'
`name{label="value",...} ` prefix once and reuses it; per scrape it only formats the values.

The prefix cache is bounded by what is exported: it holds exactly the prefixes the previous scrape
wrote. Each scrape builds its own table as it goes and publishes it when done, so a series that
goes away (an exited pid, a service no longer mapped, a span-derived label value) is forgotten one
scrape later. Concurrent scrapes each read the last published table and never write to a shared
one, so there is no lock; the worst an overlap costs is formatting a prefix twice.

The output is byte for byte what prometheus_client writes for the same families
(tests/test_exposition.py compares the two on random families, the golden files pin the rest):
HELP escaped (backslash and newline; in OpenMetrics also the double quote), labels sorted by name,
label values escaped (backslash, newline, double quote), values as floatToGoString writes them
(+Inf, -Inf, NaN, -0.0, Go's exponent form above 1e6), counters' samples named *_total and, in
OpenMetrics, a UNIT line and the closing # EOF. Families carry no created timestamps, exemplars or
sample timestamps (metrics.yaml has none), so there are no *_created lines: generate_latest writes
none either for counters without a created time.

Metric and label names must be plain ([a-zA-Z_][a-zA-Z0-9_]*): `series_head` refuses others, so a
bad name fails inside the collector that made the family. Such names come out unchanged under the
`underscores` and `allow-utf-8` name escapings a scraper may ask for; for `dots` and `values`, which
rewrite even plain names, the registry hands the scrape to prometheus_client's writer (`dialect`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from math import isfinite
from operator import add
from typing import Iterable, Protocol, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpuphase.model.metricdefs import MetricDef

TEXT = "text"
OPENMETRICS = "openmetrics"
_UNCHANGED_NAMES = ("underscores", "allow-utf-8")  # escapings that leave plain names as they are
_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SPECIAL_VALUES = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}
_GO_EXPONENT_FROM, _REPR_EXPONENT_FROM = 1e6, 1e16
_NOTHING: dict = {}


@dataclass(frozen=True)
class SeriesHead:
    """Everything about a family that does not change from scrape to scrape, formatted once."""

    text_header: str  # '# HELP ...\n# TYPE ...\n' as generate_latest writes it
    openmetrics_header: str  # '# HELP ...\n# TYPE ...\n[# UNIT ...\n]' as OpenMetrics writes it
    template: str  # 'sample_name{a="%s",b="%s"} ', the placeholders in label-name order
    order: tuple[int, ...]  # which label value fills each placeholder
    width: int  # how many label values a sample has (metrics.yaml order)

    def prefix(self, values: Sequence[str]) -> str:
        return self.template % tuple(escape_label_value(values[i]) for i in self.order)


class Written(Protocol):
    """What the writer reads from a family (exporters.collectors.families.Family): each sample's
    label values (in metrics.yaml order, all str) and value (a float), in two parallel lists."""

    head: SeriesHead
    label_values: Sequence[tuple[str, ...]]
    values: Sequence[float]


def prometheus_metric(definition: MetricDef) -> Metric:
    """An empty prometheus_client family for `definition` (what OpenMetrics and the OTLP push read)."""
    kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
    try:
        kind = kinds[definition.type]
    except KeyError:
        raise ValueError(f"{definition.name}: unsupported metric type {definition.type!r}") from None
    return kind(definition.family_name, definition.help, labels=definition.labels, unit=definition.unit)


@lru_cache(maxsize=1024)  # metrics.yaml declares about 60; the bound only matters to tests
def series_head(definition: MetricDef) -> SeriesHead:
    # prometheus_client names the family (it may append a missing unit suffix): asking it keeps the
    # two writers from ever disagreeing on a name.
    name = prometheus_metric(definition).name
    sample_name = f"{name}_total" if definition.type == "counter" else name
    for checked in (name, *definition.labels):
        if not _PLAIN_NAME.fullmatch(checked):
            raise ValueError(f"{definition.name}: {checked!r} is not a plain [a-zA-Z_][a-zA-Z0-9_]* name")
    text_help = definition.help.replace("\\", r"\\").replace("\n", r"\n")
    openmetrics_help = text_help.replace('"', r"\"")
    unit = f"# UNIT {name} {definition.unit}\n" if definition.unit else ""
    # A sample's labels are a dict in prometheus_client: a repeated name keeps its last value.
    position = {label: index for index, label in enumerate(definition.labels)}
    labels = sorted(position)
    pairs = ",".join(f'{label}="%s"' for label in labels)
    return SeriesHead(
        text_header=f"# HELP {sample_name} {text_help}\n# TYPE {sample_name} {definition.type}\n",
        openmetrics_header=f"# HELP {name} {openmetrics_help}\n# TYPE {name} {definition.type}\n{unit}",
        template=f"{sample_name}{{{pairs}}} " if labels else f"{sample_name} ",
        order=tuple(position[label] for label in labels),
        width=len(definition.labels),
    )


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def format_value(value: float) -> str:
    """prometheus_client's floatToGoString for a float: repr, with Go's names and exponent form."""
    text = repr(value)
    if text[-1] in "fn":  # inf, -inf, nan
        return _SPECIAL_VALUES[text]
    if _GO_EXPONENT_FROM <= value < _REPR_EXPONENT_FROM:
        # Go writes 1234567.0 as 1.234567e+06, where Python's repr keeps the digits up to 1e16.
        dot = text.find(".")
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def dialect(content_type: str) -> str | None:
    """TEXT or OPENMETRICS for a content type prometheus_client's choose_encoder picked; None when
    the name escaping it asks for would rewrite plain names (prometheus_client's writer does that)."""
    kind, *parameters = (part.strip() for part in content_type.split(";"))
    escaping = "underscores"
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key == "escaping":
            escaping = value
    if escaping not in _UNCHANGED_NAMES:
        return None
    return OPENMETRICS if kind == "application/openmetrics-text" else TEXT


class ExpositionWriter:
    """Writes families as exposition text, reusing the series prefixes of the previous scrape."""

    def __init__(self) -> None:
        # {template: (label values, their prefixes)} of each family the last finished scrape
        # wrote; replaced by the next scrape's, never mutated.
        self._previous: dict[str, tuple[list[tuple[str, ...]], list[str]]] = {}

    def write(self, families: Iterable[Written], form: str = TEXT) -> bytes:
        previous = self._previous
        used: dict[str, tuple[list[tuple[str, ...]], list[str]]] = {}
        out: list[str] = []
        append = out.append
        go_from, repr_from = _GO_EXPONENT_FROM, _REPR_EXPONENT_FROM
        openmetrics = form == OPENMETRICS
        for family in families:
            head = family.head
            append(head.openmetrics_header if openmetrics else head.text_header)
            labels = list(family.label_values)  # a copy: the family may grow after it was written
            last = previous.get(head.template)
            if last is not None and last[0] == labels:
                prefixes = last[1]  # the usual scrape: the same series as last time, in the same order
            else:
                known = dict(zip(*last)) if last is not None else _NOTHING
                prefixes = [known.get(series) or head.prefix(series) for series in labels]
            used[head.template] = (labels, prefixes)
            values = family.values
            if values and all(map(isfinite, values)) and max(values) < go_from:
                # The usual family: every value is its repr, so the lines are joined in C.
                append("\n".join(map(add, prefixes, map(repr, values))))
                append("\n")
                continue
            for prefix, value in zip(prefixes, values):
                # format_value inlined for the common case, where it returns repr(value).
                text = repr(value)
                if text[-1] in "fn" or go_from <= value < repr_from:
                    text = format_value(value)
                append(f"{prefix}{text}\n")
        if openmetrics:
            append("# EOF\n")
        self._previous = used
        return "".join(out).encode("utf-8")

    def cached_series(self) -> int:
        """How many prefixes the cache holds (the series of the last finished scrape)."""
        return sum(len(prefixes) for _, prefixes in self._previous.values())
