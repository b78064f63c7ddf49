"""The benchmark harness runs end to end in tiny configurations and produces well-formed results.

Nothing here checks a duration or a ratio (performance lives in docs/performance.md, measured by
`python -m benchmarks`): only that every benchmark yields finite numbers with units, that the
verdicts agree with the goals they state, and that the report renders them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest

from benchmarks import attacks, bounds, fleet_report, footprint, intake, peers, sampling, scrape
from benchmarks.harness import machine, percentile
from benchmarks.report import render_report
from benchmarks.results import Section
from tests.conftest import require_tool

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


# ---- fleet-report: the generated fleet, and the benchmark against a real VictoriaMetrics ----------
FLEET_END = 1_767_225_600  # 2026-01-01T00:00:00Z


def _fleet_lines(hosts: int, days: int) -> tuple[fleet_report.Generated, list[dict]]:
    stats = fleet_report.Generated()
    lines = [json.loads(line) for body in fleet_report.generate(hosts, days, FLEET_END, 2**20, stats=stats)
             for line in body.decode().splitlines()]
    return stats, lines


def test_fleet_generator_agrees_with_its_own_truth():
    hosts, days = 3, 2
    stats, lines = _fleet_lines(hosts, days)
    step_ms = fleet_report.STEP * 1000
    first_ms = (FLEET_END - (days * fleet_report.STEPS_PER_DAY - 1) * fleet_report.STEP) * 1000
    phase_seconds: dict[tuple, float] = defaultdict(float)
    totals: dict[str, float] = defaultdict(float)
    tokens: dict[tuple, dict[str, float]] = defaultdict(dict)
    for item in lines:
        metric, values, stamps = item["metric"], item["values"], item["timestamps"]
        assert len(values) == len(stamps) and values, metric
        assert all(t % step_ms == 0 and first_ms <= t <= FLEET_END * 1000 for t in stamps), metric
        name = metric["__name__"]
        totals[name] += sum(values)
        if name == fleet_report.PHASE_SECONDS:
            for t, v in zip(stamps, values):
                phase_seconds[metric["instance"], metric["gpu"], t] += v
        if name == fleet_report.PHASE_TOKENS:
            tokens[metric["instance"], metric["service"], metric["phase"]][metric["gpu"]] = sum(values)
    assert len(lines) == stats.series and sum(len(item["values"]) for item in lines) == stats.samples
    truth = stats.truth(days)
    assert totals[fleet_report.OBSERVED] == truth["observed"] == hosts * 8 * days * 86_400
    assert totals[fleet_report.INFO] == hosts * 8 * days * fleet_report.STEPS_PER_DAY
    assert totals[fleet_report.UNUSED] == truth["unused"]
    assert totals[fleet_report.BANDWIDTH_BOUND] == truth["bandwidth_bound"]
    assert math.isclose(totals[fleet_report.ENERGY], truth["energy"])
    # Every GPU with phase series accounts for each step exactly once.
    assert phase_seconds and all(math.isclose(v, fleet_report.STEP) for v in phase_seconds.values())
    # Tokens: the GPUs of one tensor-parallel group agree, and the groups on a host differ (as the
    # report tells them apart); counted once per group, they make the truth.
    groups, gpus, _ = fleet_report.layout(hosts)
    counted = defaultdict(float)
    for group in groups:
        service = fleet_report.ROLES[group.role].service
        if not service:
            continue
        for phase in ("prefill", "decode"):
            per_gpu = tokens[f"host-{group.host:03d}:9400", service, phase]
            assert len({per_gpu[str(gpu)] for gpu in group.gpus}) == 1, group
            counted[phase] += per_gpu[str(group.gpus[0])]
    for key, per_gpu in tokens.items():
        same_host = [g for g in groups if f"host-{g.host:03d}:9400" == key[0]
                     and fleet_report.ROLES[g.role].service == key[1]]
        assert len(set(per_gpu.values())) == len(same_host), key
    assert counted["prefill"] == truth["tokens_prefill"] and counted["decode"] == truth["tokens_decode"]
    # The same fleet every time.
    assert _fleet_lines(hosts, days)[1][:50] == lines[:50]


def test_fleet_check_flags_a_report_that_disagrees():
    stats, _ = _fleet_lines(1, 1)
    truth = stats.truth(1)
    gpus = [{"instance": "host-000:9400"}] * 8
    good = {"fleet": {"gpus": 8, "gpu_hours": truth["observed"] / 3600}, "gpus": gpus}
    assert fleet_report.check_report(good, truth, 8, 1)[0] == []
    off = {"fleet": {"gpus": 8, "gpu_hours": truth["observed"] / 3600 * 1.002}, "gpus": gpus}
    assert fleet_report.check_report(off, truth, 8, 1)[0]
    missing = {"fleet": {"gpus": 7, "gpu_hours": truth["observed"] / 3600}, "gpus": gpus[:7]}
    assert fleet_report.check_report(missing, truth, 8, 1)[0]


def test_fleet_report_benchmark_runs_against_victoria_metrics():
    require_tool("victoria-metrics")
    section = fleet_report.run(hosts=2, days=2, repeats=1)
    for figure in section.figures:
        assert isinstance(figure.value, (int, float)) and math.isfinite(figure.value), figure
        assert figure.unit, figure.name
        if figure.baseline:
            assert figure.baseline_value is not None and math.isfinite(figure.baseline_value), figure
        if figure.goal:
            assert isinstance(figure.met, bool), figure.name
    # Both ranges (2 days, and the last day) agreed with the generated fleet.
    checks = [f for f in section.figures if f.unit == "mismatches"]
    assert len(checks) == 2 and all(f.met for f in checks), [f.note for f in checks]
    text = render_report(machine(), [section], "python -m benchmarks --only fleet-report --tiny")
    assert f"## {section.title}" in text and "| GPU-hours |" in text
