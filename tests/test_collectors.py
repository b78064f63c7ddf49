"""Collectors and the AgentCollector registry, on the hand-built Views of tests/views.py."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from gpuphase import __version__
from gpuphase.exporters import collectors
from gpuphase.exporters.collectors import COLLECTORS, process
from gpuphase.exporters.collectors.families import Family
from gpuphase.exporters.registry import AgentCollector, RateLimitedLog, StaticViewSource, render
from gpuphase.model import metricdefs
from gpuphase.model.metricdefs import MetricDef
from gpuphase.model.view import SPAN_DECODERS, ProcessStats, SpanStats, View
from tests import views
from tests.views import A100, H100, LOST, NEVER_SEEN, NOW, rich_view


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def series(text: str, metric: str, /, **labels: str) -> dict[tuple, float]:
    """{sorted label items: value} of the samples named `metric` whose labels include `labels`."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in samples(text)
        if s.name == metric and labels.items() <= s.labels.items()
    }


def value(text: str, metric: str, /, **labels: str) -> float:
    found = series(text, metric, **labels)
    assert len(found) == 1, f"{metric}{labels}: expected one sample, got {found}"
    return next(iter(found.values()))


def gpu(identity) -> dict[str, str]:
    return {"gpu": str(identity.index), "uuid": identity.uuid}


@pytest.fixture(scope="module")
def rich() -> str:
    return render(rich_view())


def test_rich_view_parses_in_both_exposition_formats():
    text = render(rich_view())
    assert len(samples(text)) > 100
    openmetrics = render(rich_view(), openmetrics=True)
    assert openmetrics.endswith("# EOF\n")
    assert {f.name for f in parse_openmetrics(openmetrics)} >= {"gpu_info", "gpu_phase_seconds", "gpu_up"}


def test_every_collector_succeeds_on_the_rich_view(rich):
    assert series(rich, "gpu_scrape_collector_success") == {
        (("collector", name),): 1.0 for name in metricdefs.collectors()
    }
    assert set(series(rich, "gpu_scrape_collector_duration_seconds")) == {
        (("collector", name),) for name in metricdefs.collectors()
    }


def test_every_gpu_series_has_gpu_and_uuid_and_static_strings_only_on_gpu_info(rich):
    static = {"name", "pci_bus_id", "driver_version", "cuda_version", "gpm_supported"}
    for sample in samples(rich):
        definition = metricdefs.load()[sample.name]
        if "gpu" in definition.labels:
            assert sample.labels["uuid"].startswith("GPU-"), sample
        if sample.name != "gpu_info":
            assert not static & sample.labels.keys(), sample
    assert value(rich, "gpu_info", **gpu(H100), name=H100.name, gpm_supported="true",
                 driver_version="550.54.15", cuda_version="12.4", pci_bus_id=H100.pci_bus_id) == 1


def test_device_values_map_one_to_one(rich):
    assert value(rich, "gpu_power_watts", **gpu(H100)) == 412.5
    assert value(rich, "gpu_power_watts", **gpu(A100)) == 250.0
    assert value(rich, "gpu_energy_joules_total", **gpu(H100)) == 1.25e6
    assert value(rich, "gpu_clock_hertz", **gpu(H100), clock="memory") == 2.619e9
    assert value(rich, "gpu_clock_event_active", **gpu(H100), reason="sw_power_cap") == 1
    assert value(rich, "gpu_xid_errors_total", **gpu(H100), xid="13") == 2
    assert value(rich, "gpu_remapped_rows", **gpu(A100), type="correctable") == 1
    used, free, total = (value(rich, f"gpu_memory_{kind}_bytes", **gpu(H100)) for kind in ("used", "free", "total"))
    assert used + free == total


def test_gpm_series_are_absent_without_gpm_not_zero(rich):
    assert value(rich, "gpu_sm_active_ratio", **gpu(H100)) == 0.82
    for definition in metricdefs.by_collector("gpm"):
        assert series(rich, definition.name, gpu="1") == {}, definition.name


def test_a_metric_missing_from_values_is_left_out_for_that_gpu_only():
    view = rich_view()
    h100, a100, *rest = view.snapshot.gpus
    values = {k: v for k, v in a100.values.items() if k != "gpu_memory_temperature_celsius"}
    labelled = {k: v for k, v in a100.labelled.items() if k != "gpu_clock_event_active"}
    a100 = replace(a100, values=values, labelled=labelled)
    text = render(replace(view, snapshot=replace(view.snapshot, gpus=(h100, a100, *rest))))
    assert set(series(text, "gpu_memory_temperature_celsius")) == {tuple(sorted(gpu(H100).items()))}
    assert series(text, "gpu_clock_event_active", gpu="1") == {}
    assert len(series(text, "gpu_clock_event_active", gpu="0")) == 4


def test_lost_gpu_exports_identity_up_zero_and_last_sample_only(rich):
    lost = [s for s in samples(rich) if s.labels.get("uuid") == LOST.uuid]
    assert sorted(s.name for s in lost) == ["gpu_info", "gpu_last_sample_timestamp_seconds", "gpu_up"]
    assert value(rich, "gpu_up", **gpu(LOST)) == 0
    assert value(rich, "gpu_last_sample_timestamp_seconds", **gpu(LOST)) == NOW - 30


def test_gpu_never_read_has_no_last_sample_timestamp(rich):
    never = [s for s in samples(rich) if s.labels.get("uuid") == NEVER_SEEN.uuid]
    assert sorted(s.name for s in never) == ["gpu_info", "gpu_up"]


def test_processes(rich):
    # The backend's count, not the number of series kept after the per-GPU cap.
    assert value(rich, "gpu_processes", **gpu(H100)) == 3
    assert value(rich, "gpu_processes", **gpu(A100)) == 0
    assert value(rich, "gpu_process_memory_used_bytes", **gpu(H100), pid="4242", process_name="python3",
                 container="vllm", pod="vllm-0", namespace="serving") == 70 * views.GIB
    assert value(rich, "gpu_process_sm_active_ratio", pid="4242") == 0.9
    assert value(rich, "gpu_process_memory_used_bytes", pid="4343", container="", pod="") == 512 * 1024**2
    # No utilization sample for 4343 yet: no series, rather than a made-up 0.
    assert series(rich, "gpu_process_sm_active_ratio", pid="4343") == {}


def test_gpu_without_a_process_count_has_no_processes_series():
    # NoPermission on the process query: the backend leaves gpu_processes out; 0 would mean "free".
    view = rich_view()
    h100 = view.snapshot.gpus[0]
    values = {k: v for k, v in h100.values.items() if k != "gpu_processes"}
    snapshot = replace(view.snapshot, gpus=(replace(h100, values=values, processes=()),))
    text = render(replace(view, snapshot=snapshot), timer=lambda: 0.0)
    assert series(text, "gpu_processes", **gpu(H100)) == {}


def test_mig_instances(rich):
    assert value(rich, "gpu_mig_memory_used_bytes", **gpu(H100), gpu_instance="1", profile="3g.40gb") == 30 * views.GIB
    assert value(rich, "gpu_mig_dram_active_ratio", gpu_instance="1") == 0.5
    assert value(rich, "gpu_mig_memory_total_bytes", gpu_instance="2") == 40 * views.GIB
    assert series(rich, "gpu_mig_sm_active_ratio", gpu_instance="2") == {}


def test_phases_export_integrals_and_leave_unknown_ones_out(rich):
    decode = dict(**gpu(H100), service="vllm", phase="decode")
    assert value(rich, "gpu_phase_seconds_total", **decode) == 40
    assert value(rich, "gpu_phase_tokens_total", **decode) == 5120
    assert value(rich, "gpu_phase_energy_joules_total", **decode) == 15200
    assert value(rich, "gpu_phase_dram_active_seconds_total", **decode) == 30
    assert value(rich, "gpu_phase_seconds_total", **gpu(A100), service="tgi", phase="idle") == 40
    assert series(rich, "gpu_phase_sm_active_seconds_total", gpu="1") == {}
    assert len(series(rich, "gpu_phase_seconds_total", service="vllm")) == 4
    assert value(rich, "gpu_phase_last_span_timestamp_seconds", **gpu(A100), service="tgi") == NOW - 8


def test_spans_and_agent_stats(rich):
    assert value(rich, "gpu_spans_received_total", decoder="vllm") == 1200
    assert value(rich, "gpu_spans_rejected_total", reason="malformed") == 2
    assert value(rich, "gpu_spans_unmatched_total", reason="no_mapping") == 7
    assert value(rich, "gpuphase_build_info", version=__version__, backend="sim") == 1
    assert value(rich, "gpu_sampler_ticks_total") == 3600
    assert value(rich, "gpu_sampler_overruns_total") == 1


def test_before_the_first_snapshot_only_agent_health_and_zero_span_counters_render():
    text = render(views.empty_view())
    assert {s.name for s in samples(text)} == {
        "gpuphase_build_info", "gpu_sampler_ticks_total", "gpu_sampler_overruns_total",
        "gpu_sampler_tick_duration_seconds", "gpu_scrape_collector_success", "gpu_scrape_collector_duration_seconds",
        # Counters whose series are known in advance: 0 from the start, so rate() sees the first span or clip.
        "gpu_spans_clipped_total", "gpu_spans_received_total",
    }
    assert set(series(text, "gpu_scrape_collector_success").values()) == {1.0}


def test_an_empty_span_stats_renders_every_decoder_at_zero():
    text = render(View(snapshot=None, spans=SpanStats()))
    assert series(text, "gpu_spans_received_total") == {
        (("decoder", decoder),): 0.0 for decoder in ("vllm", "sglang", "tgi", "generic")
    }
    # Reasons are open-ended: none until one is counted.
    assert series(text, "gpu_spans_rejected_total") == {} and series(text, "gpu_spans_unmatched_total") == {}


def test_counted_decoders_keep_their_counts_and_the_others_stay_at_zero(rich):
    assert series(rich, "gpu_spans_received_total") == {
        (("decoder", "vllm"),): 1200.0, (("decoder", "tgi"),): 300.0,
        (("decoder", "sglang"),): 0.0, (("decoder", "generic"),): 0.0,
    }
    # A label value outside the known decoders is still exported, not dropped.
    text = render(View(snapshot=None, spans=SpanStats(received={"newdecoder": 5})))
    assert value(text, "gpu_spans_received_total", decoder="newdecoder") == 5
    assert len(series(text, "gpu_spans_received_total")) == 5


def test_the_known_decoders_are_the_agents_decoders():
    from gpuphase.agent.spans.decoders import DECODERS

    assert sorted(name for name, _ in DECODERS) == sorted(SPAN_DECODERS)


# --- the agent's own process (process_*) --------------------------------------------------------

PROCESS_METRICS = ("process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
                   "process_cpu_seconds_total", "process_open_fds", "process_max_fds")


def test_process_figures_map_one_to_one(rich):
    assert value(rich, "process_resident_memory_bytes") == 96 * 1024**2
    assert value(rich, "process_virtual_memory_bytes") == 1.5 * views.GIB
    assert value(rich, "process_start_time_seconds") == NOW - 3600
    assert value(rich, "process_cpu_seconds_total") == 42.5
    assert value(rich, "process_open_fds") == 23
    assert value(rich, "process_max_fds") == 1_048_576


def test_a_view_without_process_figures_has_no_process_series_and_unknown_ones_are_left_out():
    assert not {s.name for s in samples(render(replace(rich_view(), process=None)))} & set(PROCESS_METRICS)
    text = render(View(snapshot=None, process=ProcessStats(resident_memory_bytes=1e6)))
    assert [s.name for s in samples(text) if s.name.startswith("process_")] == ["process_resident_memory_bytes"]


def test_the_process_collector_can_be_disabled(rich):
    assert {s.name for s in samples(rich)} >= set(PROCESS_METRICS)
    text = render(rich_view(), disabled=("process",))
    assert not {s.name for s in samples(text)} & set(PROCESS_METRICS)
    assert "process" not in {labels[0][1] for labels in series(text, "gpu_scrape_collector_success")}


def assert_plausible(stats: ProcessStats) -> None:
    assert stats.resident_memory_bytes > 0
    assert stats.virtual_memory_bytes >= stats.resident_memory_bytes
    assert time.time() - 86400 < stats.start_time_seconds <= time.time() + 1
    assert stats.cpu_seconds >= 0
    assert 0 < stats.open_fds <= stats.max_fds


def test_this_process_read_live_is_plausible_and_rendered():
    stats = process.read_self()
    assert_plausible(stats)
    text = render(View(snapshot=None, process=stats), timer=lambda: 0.0)
    assert [s.name for s in samples(text) if s.name.startswith("process_")] == list(PROCESS_METRICS)
    assert value(text, "process_resident_memory_bytes") == stats.resident_memory_bytes
    assert value(text, "gpu_scrape_collector_success", collector="process") == 1
    later = process.read_self()
    assert later.cpu_seconds >= stats.cpu_seconds and later.start_time_seconds == stats.start_time_seconds


def test_without_proc_psutil_supplies_the_same_figures(tmp_path):
    from_proc = process.read_self()
    from_psutil = process.read_self(proc=str(tmp_path / "no-proc"))
    assert_plausible(from_psutil)
    assert abs(from_psutil.start_time_seconds - from_proc.start_time_seconds) < 1.0
    assert from_psutil.max_fds == from_proc.max_fds


def fake_proc(root, limit: int) -> str:
    """A /proc with the files ProcessCollector and read_self read: btime, self/stat, self/fd, self/limits."""
    (root / "self" / "fd").mkdir(parents=True)
    for fd in range(7):
        (root / "self" / "fd" / str(fd)).write_text("")
    (root / "stat").write_text("cpu  1 2 3 4\nbtime 1767225600\nprocesses 42\n")
    fields = ["S"] + ["0"] * 49
    fields[11], fields[12] = "1234", "567"  # utime, stime (ticks)
    fields[19], fields[20], fields[21] = "987654", "2147483648", "25600"  # starttime (ticks), vsize, rss (pages)
    (root / "self" / "stat").write_text("4242 (gpu (phase) agent) " + " ".join(fields) + "\n")
    (root / "self" / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        f"Max open files            {limit}                {limit}                files\n"
    )
    return str(root)


def test_process_families_are_byte_for_byte_prometheus_clients(tmp_path):
    """Same names, types, help and values as prometheus_client's ProcessCollector on the same /proc."""
    import resource

    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.exposition import generate_latest

    from gpuphase.exporters.exposition import ExpositionWriter

    proc = fake_proc(tmp_path, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    reference = CollectorRegistry()
    ProcessCollector(proc=proc, registry=reference)
    ours = ExpositionWriter().write(list(process.collect(View(snapshot=None, process=process.read_self(proc)))))
    assert ours.decode() == generate_latest(reference).decode()
    assert b"process_start_time_seconds 1.7672" in ours and b"process_open_fds 7.0" in ours


def test_readme_lists_every_collector():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("| `--[no-]collector.NAME`"))
    assert re.findall(r"`(\w+)`", line.split("|")[3]) == metricdefs.collectors()


def test_a_raising_collector_reports_failure_and_the_rest_still_render(monkeypatch, caplog):
    working = COLLECTORS["gpm"]

    def broken(view):
        yield from working(view)
        raise RuntimeError("boom")

    monkeypatch.setitem(COLLECTORS, "gpm", broken)
    with caplog.at_level(logging.ERROR, logger="gpuphase.exporters.registry"):
        text = render(rich_view())
    assert value(text, "gpu_scrape_collector_success", collector="gpm") == 0
    assert value(text, "gpu_scrape_collector_success", collector="memory") == 1
    # Nothing of a failed collector is exported, not even what it yielded before failing.
    assert series(text, "gpu_sm_active_ratio") == {}
    assert value(text, "gpu_power_watts", **gpu(H100)) == 412.5
    assert "collector 'gpm' failed" in caplog.text and "boom" in caplog.text


def power_family_with(value):
    family = Family("gpu_power_watts")
    family.add((0, "x"), value)
    return family


def prometheus_client_family():
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily("gpu_power_watts", "help", labels=["gpu", "uuid"])
    family.add_metric(["0", "x"], 412.0)
    return family


@pytest.mark.parametrize("bad_output", [
    lambda: power_family_with("412 W"),
    lambda: power_family_with(None),
    lambda: power_family_with(object()),
    prometheus_client_family,  # the writer writes Families only
    lambda: None,
], ids=["str-value", "None-value", "object-value", "prometheus_client-metric", "None"])
def test_a_collector_yielding_unrenderable_values_is_isolated(monkeypatch, bad_output):
    """A value the exposition writer would choke on must fail the collector, not the whole scrape."""

    def sloppy(view):
        yield from collectors.power.collect(view)
        yield bad_output()

    monkeypatch.setitem(COLLECTORS, "power", sloppy)
    for openmetrics in (False, True):
        text = render(rich_view(), openmetrics=openmetrics)
        assert value(text, "gpu_scrape_collector_success", collector="power") == 0
        assert value(text, "gpu_scrape_collector_success", collector="device") == 1
        assert "gpu_power_watts" not in text


def test_disabled_collectors_are_not_run_or_reported(rich):
    text = render(rich_view(), disabled=("gpm", "processes"))
    names = {s.name for s in samples(text)}
    assert not names & {d.name for d in metricdefs.by_collector("gpm")}
    assert "gpu_processes" not in names
    assert set(series(text, "gpu_scrape_collector_success")) == {
        (("collector", name),) for name in metricdefs.collectors() if name not in ("gpm", "processes")
    }
    assert value(text, "gpu_power_watts", **gpu(H100)) == 412.5


def test_each_scrape_reads_the_view_exactly_once():
    class CountingSource(StaticViewSource):
        calls = 0

        def view(self):
            self.calls += 1
            return super().view()

    source = CountingSource(rich_view())
    collector = AgentCollector(source)
    list(collector.collect())
    list(collector.collect())
    assert source.calls == 2


def test_a_constant_timer_makes_the_output_reproducible():
    def fixed():
        return 0.0

    assert render(rich_view(), timer=fixed) == render(rich_view(), timer=fixed)
    assert set(series(render(rich_view(), timer=fixed), "gpu_scrape_collector_duration_seconds").values()) == {0.0}


def test_adding_a_device_metric_to_metrics_yaml_is_the_only_step(monkeypatch):
    fan = MetricDef(name="gpu_fan_speed_ratio", type="gauge", unit="ratio", collector="device",
                    labels=("gpu", "uuid"), help="Fan speed.")
    definitions = {**metricdefs.load(), fan.name: fan}
    monkeypatch.setattr(metricdefs, "load", lambda: definitions)
    view = rich_view()
    h100 = replace(view.snapshot.gpus[0], values={**view.snapshot.gpus[0].values, fan.name: 0.4})
    text = render(replace(view, snapshot=replace(view.snapshot, gpus=(h100, *view.snapshot.gpus[1:]))))
    assert value(text, "gpu_fan_speed_ratio", **gpu(H100)) == 0.4
    assert "# HELP gpu_fan_speed_ratio Fan speed." in text


def test_rate_limited_log_holds_back_repeats_and_counts_them(caplog):
    now = [100.0]
    limited = RateLimitedLog(interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="gpuphase.exporters.registry"):
        for _ in range(3):
            try:
                raise ValueError("again")
            except ValueError:
                limited.exception("gpm", "collector 'gpm' failed")
        assert len(caplog.records) == 1
        now[0] += 61
        try:
            raise ValueError("later")
        except ValueError:
            limited.exception("gpm", "collector 'gpm' failed")
        limited.exception("device", "collector 'device' failed")
    assert len(caplog.records) == 3
    assert "2 similar failures not logged" in caplog.records[1].getMessage()


def test_the_agents_view_carries_its_own_process_figures():
    """`process_*` on a live agent: the app reads /proc/self into each View, unless the collector is off."""
    from gpuphase.agent.app import Agent
    from gpuphase.agent.config import Config

    process = Agent(Config()).view().process
    assert process is not None and process.resident_memory_bytes > 0
    assert Agent(Config(disabled_collectors=("process",))).view().process is None
