"""exporters.exposition against prometheus_client: the same families must give the same bytes.

prometheus_client's generate_latest (text 0.0.4) and its OpenMetrics writer are the reference; the
golden files (tests/test_golden.py) pin both to the same output for whole pipelines. Here: random
families (label values with backslashes, quotes, newlines and any unicode; any float), several
scrapes in a row through one writer (so its prefix cache is hit, partly hit and missed), and every
format a scraper's Accept header can negotiate.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from benchmarks.scrape import PROMETHEUS_ACCEPT
from gpuphase.exporters.collectors.families import Family
from gpuphase.exporters.exposition import OPENMETRICS, TEXT, ExpositionWriter, dialect, format_value
from gpuphase.exporters.registry import StaticViewSource, build_registry
from gpuphase.model.metricdefs import MetricDef
from tests import views

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)

# Prometheus 2 and 3 ask for OpenMetrics first; text 1.0.0 carries a name escaping.
PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                       "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_3_ACCEPT = PROMETHEUS_ACCEPT
ACCEPT_HEADERS = [
    "",
    "text/plain",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=dots",
    "text/plain;version=1.0.0;escaping=values",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    PROMETHEUS_2_ACCEPT,
    PROMETHEUS_3_ACCEPT,
]


class Metrics:
    """A prometheus_client collector serving fixed Metrics, so its writers can render Families."""

    def __init__(self, families: list[Family]):
        self._metrics = [family.metric() for family in families]

    def collect(self):
        return self._metrics


def reference(families: list[Family], form: str) -> bytes:
    generate = generate_openmetrics if form == OPENMETRICS else generate_latest
    return generate(Metrics(families))


plain_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True)
label_text = st.text(st.one_of(st.sampled_from('\\"\n{}=,# \t'), st.characters(codec="utf-8")), max_size=12)
numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70).map(float),
                    st.sampled_from([0.0, -0.0, 1e6, 999999.0, 1234567.0, 1e16, 1e-5, 2.0**31, math.inf, -math.inf]))


@st.composite
def definitions(draw) -> MetricDef:
    kind = draw(st.sampled_from(["gauge", "counter"]))
    name = draw(plain_names)
    if kind == "counter" and draw(st.booleans()):
        name += "_total"
    unit = draw(st.sampled_from(["", "bytes", "seconds", "ratio"]))
    if unit and draw(st.booleans()):
        name += "_" + unit  # both: a name with its unit, and one prometheus_client appends the unit to
    labels = tuple(draw(st.lists(plain_names, max_size=5)))  # repeats included: a dict keeps the last
    return MetricDef(name=name, type=kind, unit=unit, collector="test", labels=labels,
                     help=draw(st.text(st.one_of(st.sampled_from('\\"\n'), st.characters(codec="utf-8")), max_size=30)))


@st.composite
def scrapes(draw) -> tuple[list[MetricDef], list[list[Family]]]:
    """Up to three scrapes of the same definitions, each drawing its series from one pool, so a
    later scrape repeats some series of the one before (in the same or another order), drops some
    and adds others: the writer's cache is hit, partly hit and missed."""
    defs = draw(st.lists(definitions(), min_size=1, max_size=4))
    pools = [draw(st.lists(st.tuples(*[label_text] * len(d.labels)), max_size=6)) for d in defs]
    out = []
    for _ in range(draw(st.integers(1, 3))):
        scrape = []
        for definition, pool in zip(defs, pools):
            family = Family(definition)
            if pool:
                for series in draw(st.lists(st.sampled_from(pool), max_size=8)):
                    family.add(series, draw(numbers))
            scrape.append(family)
        out.append(scrape)
    return defs, out


@PROPERTY_SETTINGS
@given(scrapes(), st.sampled_from([TEXT, OPENMETRICS]))
def test_random_families_render_as_prometheus_client_renders_them(drawn, form):
    _, scrape_list = drawn
    writer = ExpositionWriter()
    for families in scrape_list:
        assert writer.write(families, form) == reference(families, form)


@PROPERTY_SETTINGS
@given(numbers)
def test_values_are_formatted_as_prometheus_client_formats_them(value):
    assert format_value(value) == floatToGoString(value)


@pytest.mark.parametrize("value, text", [(math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (-0.0, "-0.0"),
                                         (0.0, "0.0"), (1e6, "1e+06"), (2.0**31, "2.147483648e+09"), (1e16, "1e+16"),
                                         (999999.0, "999999.0"), (-1234567.0, "-1234567.0"), (1e-5, "1e-05")])
def test_special_values(value, text):
    assert format_value(value) == floatToGoString(value) == text


def test_the_cache_keeps_only_the_series_of_the_last_scrape():
    processes = definition("gpu_process_memory_used_bytes", ("gpu", "pid"))

    def scrape(pids):
        family = Family(processes)
        for pid in pids:
            family.add((0, pid), 1.0)
        return [family]

    writer = ExpositionWriter()
    writer.write(scrape(range(100)))
    assert writer.cached_series() == 100
    # The processes exit and others start: the old ones are forgotten, however many came and went.
    for start in range(1000, 5000, 1000):
        written = writer.write(scrape(range(start, start + 10)))
        assert written == reference(scrape(range(start, start + 10)), TEXT)
        assert writer.cached_series() == 10


@pytest.mark.parametrize("accept", ACCEPT_HEADERS)
@pytest.mark.parametrize("view", [views.rich_view(), views.empty_view()], ids=["rich", "empty"])
def test_every_negotiated_format_matches_prometheus_client(accept, view):
    registry = build_registry(StaticViewSource(view), timer=lambda: 0.0)
    encoder, content_type = choose_encoder(accept)
    for _ in range(2):  # a cold and a warm cache
        assert registry.exposition(accept) == (encoder(registry), content_type)


@pytest.mark.parametrize("accept, expected", [
    ("", TEXT),
    ("text/plain;version=1.0.0;escaping=allow-utf-8", TEXT),
    (PROMETHEUS_2_ACCEPT, OPENMETRICS),
    (PROMETHEUS_3_ACCEPT, OPENMETRICS),
    ("application/openmetrics-text;version=1.0.0;escaping=dots", None),
    ("text/plain;version=1.0.0;escaping=values", None),
])
def test_dialect_takes_what_prometheus_client_negotiates(accept, expected):
    assert dialect(choose_encoder(accept)[1]) == expected


def definition(name: str = "g", labels: tuple[str, ...] = (), kind: str = "gauge") -> MetricDef:
    return MetricDef(name=name, type=kind, unit="", collector="test", labels=labels, help="h")


@pytest.mark.parametrize("bad", [definition("gpu-power"), definition("gpu:power"), definition(labels=("bad label",)),
                                 definition(labels=("ok", "0pid")), definition(kind="summary")],
                         ids=lambda d: f"{d.name}{d.labels}:{d.type}")
def test_a_family_refuses_what_the_writer_cannot_write(bad):
    with pytest.raises(ValueError):
        Family(bad)


def test_a_family_converts_labels_and_values_or_raises():
    family = Family(definition(labels=("a", "b")))
    family.add((0, None), 1)
    assert family.label_values == [("0", "None")] and family.values == [1.0]
    assert type(family.values[0]) is float
    for bad in ("412 W", None, object()):
        with pytest.raises((TypeError, ValueError)):
            family.add(("0", "x"), bad)
    with pytest.raises(ValueError):
        family.add(("0",), 1.0)
