"""The benchmark harness runs end to end in tiny configurations and produces well-formed results.

Nothing here checks a duration or a ratio (performance lives in docs/performance.md, measured by
`python -m benchmarks`): only that every benchmark yields finite numbers with units, that the
verdicts agree with the goals they state, and that the report renders them.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import attacks, bounds, footprint, intake, peers, sampling, scrape
from benchmarks.harness import machine, percentile
from benchmarks.report import render_report
from benchmarks.results import Section

TINY = {
    "intake": (intake, {"seconds": 0.5, "spans_per_request": 64, "jitter_seconds": 1.0, "jitter_interval": 0.1,
                        "stage_batches": 4, "rounds": 2}),
    "sampling": (sampling, {"rounds": 3}),
    "scrape": (scrape, {"scrapes": 5}),
    "footprint": (footprint, {"load_minutes": 3 / 60, "idle_seconds": 2.0, "ready_repeats": 1}),
    "bounds": (bounds, {"spans": 2000, "per_request": 500}),
    "peers": (peers, {"seconds": 1.0}),
    "attacks": (attacks, {"only": ("header_bombs",)}),
}


@pytest.fixture(scope="module")
def sections(fake_nvml_library) -> dict[str, Section]:
    # fake_nvml_library (conftest) makes a missing gcc a skip, or a failure in CI, before any of this runs.
    return {key: module.run(**kwargs) for key, (module, kwargs) in TINY.items()}


def test_every_benchmark_yields_finite_figures_with_units(sections):
    for key, section in sections.items():
        assert section.figures, key
        for figure in section.figures:
            assert isinstance(figure.value, (int, float)) and math.isfinite(figure.value), (key, figure)
            assert figure.unit, (key, figure.name)
            if figure.baseline:
                assert figure.baseline_value is not None and math.isfinite(figure.baseline_value), (key, figure)
            if figure.goal:
                assert isinstance(figure.met, bool), (key, figure.name)
            if figure.met is False:
                assert figure.note, f"{key}: missed goal {figure.name!r} must say why"
        assert section.to_dict()["figures"][0]["name"] == section.figures[0].name


def test_results_describe_what_was_measured(sections):
    names = {figure.name for section in sections.values() for figure in section.figures}
    assert {"span intake, OTLP/HTTP protobuf", "span intake, OTLP/gRPC", "time from start to /-/ready",
            "scrape latency p99", "distinct service label values on /metrics"} <= names
    # The soak table has one row per sample: time, RSS, CPU.
    table = sections["footprint"].tables[0]
    assert table.rows and all(len(row) == 3 for row in table.rows)


def test_bounds_stay_within_the_service_cap(sections):
    services = next(f for f in sections["bounds"].figures if f.name.startswith("distinct service"))
    # 2,000 services flood 32 slots: every slot taken plus `other`, no more (and not fewer: a flood
    # that places nothing would measure nothing).
    assert services.value == bounds.MAX_SERVICES + 1


def test_report_renders_every_figure(sections):
    text = render_report(machine(), list(sections.values()), "python -m benchmarks --tiny")
    assert text.startswith("# Performance")
    for key in ("cpu", "cores", "python", "date"):
        assert f"| {key} |" in text
    for section in sections.values():
        assert f"## {section.title}" in text
        for figure in section.figures:
            assert f"| {figure.name} |" in text


def test_lateness_follows_the_fixed_rate_schedule():
    late, rebased = intake.lateness([10.0, 10.102, 10.2, 10.7, 10.8], 0.1)
    assert [round(x, 3) for x in late] == [0.002, 0.0, 0.4, 0.0]
    assert rebased == 1
    # A late first observation must not make the punctual ticks look early.
    late, _ = intake.lateness([10.05, 10.1, 10.2], 0.1)
    assert [round(x, 3) for x in late] == [0.0, 0.0]


def test_percentile_is_nearest_rank():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(101)), 99) == 99
    assert math.isnan(percentile([], 50))
