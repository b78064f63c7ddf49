"""`gpuphase report` and the scaling signals end to end, on a small fleet.

Two `gpuphase demo` agents are two hosts: mixed-fleet (healthy GPUs 0-1, memory-bound GPU 2,
allocated-but-idle GPU 3, unused GPU 4) and traffic-cycle (one TP2 service whose traffic rises and
falls). A real Prometheus scrapes both, runs the repo's rules (report step 5 s, rate windows 20 s
so minutes of data suffice) and remote-writes everything, recorded series included, into a real
VictoriaMetrics. The report must name the waste, give the same figures from both stores, match
PromQL computed directly over the raw counters within 1%, and the scaling signals must follow the
traffic up and down; the shipped KEDA/HPA/spin-down queries must return data.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import jsonschema
import pytest

from tests.agentproc import AgentProcess
from tests.realprom import Prometheus, VictoriaMetrics, get_json, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "gpuphase" / "report" / "schema.json").read_text())
STEP = 5.0
PRICE = 2.5
RANGE = "150s"
RANGE_SECONDS = 150.0


def _rules(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "gpuphase.alerts.rules", "--for-scale", "0.01", "--scrape-interval", "1s",
                    "--set", "unused_for=20s", "--set", "report_step=5s", "--set", "rate_window=20s",
                    "-o", str(path)], check=True, cwd=ROOT)
    return path


def _report(url: str, end: float, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuphase", "report", "--prometheus.url", url, "--range", RANGE,
                           "--end", f"{end:.3f}", "--price.gpu-hour", str(PRICE), *extra],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _json_report(url: str, end: float) -> dict:
    done = _report(url, end, "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    jsonschema.validate(report, SCHEMA)
    return report


def _same(a, b, path="report") -> list[str]:
    """Where two reports' figures differ (beyond float summation order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        return [] if ok else [f"{path}: {a} against {b}"]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    rules = _rules(work / "rules.yaml")
    for name in ("vm", "prom"):
        (work / name).mkdir()
    env = {"OTEL_BSP_SCHEDULE_DELAY": "1000"}
    common = ["--sample.interval", "500ms", "--phase.settle", "10s"]
    with VictoriaMetrics(work / "vm") as vm, \
            AgentProcess(["--demo.scenario", "mixed-fleet", *common], env=env, command="demo") as mixed, \
            AgentProcess(["--demo.scenario", "traffic-cycle", *common], env=env, command="demo") as cycle, \
            Prometheus(work / "prom", [f"127.0.0.1:{mixed.metrics_port}", f"127.0.0.1:{cycle.metrics_port}"],
                       rule_files=[rules], remote_write=vm.remote_write_url) as prometheus:
        mixed_host = f"127.0.0.1:{mixed.metrics_port}"

        def ready():
            """The range (and the step before it) lies inside every GPU's data, most of it settled
            phase data, and chat-4b's traffic has risen and fallen."""
            before = prometheus.query(f"count(gpu_energy_joules_total offset {RANGE_SECONDS + 20:.0f}s)")
            if not before or before[0]["value"][1] != "7":
                return False
            idle = prometheus.query("sum_over_time(instance_gpu_phase_service:gpu_phase_seconds:increase5s"
                                    f'{{instance="{mixed_host}", gpu="3", phase="idle"}}[{RANGE}])')
            settled = bool(idle) and float(idle[0]["value"][1]) >= 0.8 * RANGE_SECONDS
            return settled and _rose_and_fell(_desired_gpus(prometheus, time.time() - 10))

        wait_until(ready, 400, interval=5, what="a settled range and a rise and fall of chat-4b's traffic")
        end = time.time() - 10  # what remote write has surely delivered by the time it is checked
        vm_query = f"count_over_time(instance_gpu:gpu_observed_seconds:sum5s[{RANGE}])"

        def delivered():
            vm.flush()
            theirs = get_json(f"{vm.url}/api/v1/query?" + urlencode({"query": vm_query, "time": f"{end:.3f}"}))
            theirs = theirs["data"]["result"]
            ours = prometheus.query(vm_query, at=end)
            count = lambda result: sorted((r["metric"]["instance"], r["metric"]["gpu"], r["value"][1]) for r in result)
            return ours and count(theirs) == count(ours)

        wait_until(delivered, 60, interval=2, what="VictoriaMetrics holding what Prometheus recorded")
        yield {"prometheus": prometheus, "vm": vm, "end": end, "mixed": mixed_host,
               "cycle": f"127.0.0.1:{cycle.metrics_port}"}


@pytest.fixture(scope="module")
def reports(fleet):
    return {"prometheus": _json_report(fleet["prometheus"].url, fleet["end"]),
            "vm": _json_report(fleet["vm"].url, fleet["end"])}


def _gpu(report: dict, instance: str, gpu: str) -> dict:
    return next(g for g in report["gpus"] if g["instance"] == instance and g["gpu"] == gpu)


def test_report_names_the_waste_and_spares_the_healthy_gpus(fleet, reports):
    report = reports["prometheus"]
    mixed = fleet["mixed"]
    assert report["fleet"]["hosts"] == 2 and report["fleet"]["gpus"] == 7
    found = {(r["kind"], r["target"].get("instance"), r["target"].get("gpu")) for r in report["recommendations"]}
    assert ("reclaim_unused", mixed, "4") in found, found
    assert ("consolidate_idle", mixed, "3") in found, found
    assert ("bandwidth_bound_decode", mixed, "2") in found, found
    for rec in report["recommendations"]:
        target = rec["target"]
        assert not (target.get("instance") == mixed and target.get("gpu") in ("0", "1")), rec
        assert rec["evidence"], rec
    # A saving is the wasted share of the time, priced, over a month; sorted by saving.
    savings = [r["monthly_savings"] for r in report["recommendations"] if r["monthly_savings"] is not None]
    assert savings == sorted(savings, reverse=True)
    for gpu, kind in (("4", "unused"), ("3", "allocated")):
        entry = _gpu(report, mixed, gpu)
        idle_hours = entry["idle_gpu_hours"][kind]
        assert idle_hours > 0.6 * entry["hours"], entry
        assert entry["idle_cost"][kind] == pytest.approx(idle_hours * PRICE, rel=1e-12)
    unused = _gpu(report, mixed, "4")
    assert unused["idle_gpu_hours"]["unused"] == pytest.approx(unused["hours"], rel=1e-9)
    assert unused["phase_hours"]["unknown"] == pytest.approx(unused["hours"], rel=1e-9)
    services = {s["service"]: s for s in report["services"]}
    assert {"llama-70b", "chat-8b", "reserved", "chat-4b"} <= services.keys()
    # TP2: both GPUs of llama-70b count a request's tokens; the service counts them once.
    llama = services["llama-70b"]
    assert llama["gpus"] == 2
    assert llama["tokens"]["decode"] == pytest.approx(_gpu(report, mixed, "0")["tokens"]["decode"], rel=1e-6)
    assert services["reserved"]["cost_per_million_tokens"] == {"prefill": None, "decode": None}


def test_report_is_the_same_from_victoriametrics(reports):
    a, b = (dict(reports[k]) for k in ("prometheus", "vm"))
    for report in (a, b):
        report.pop("generated_at")
        report["source"] = {k: v for k, v in report["source"].items() if k != "url"}
    differences = _same(a, b)
    assert not differences, "\n".join(differences[:20])


def test_report_matches_promql_over_the_raw_counters(fleet, reports):
    """The report sums the 5 s records; the raw counters' growth over the same evaluations
    (`x - x offset W`) must agree within 1%, and increase(), which extrapolates, within 3%
    (or half a second where a phase held little time)."""
    report, prometheus = reports["prometheus"], fleet["prometheus"]
    last_evaluation = fleet["end"]
    end = report["range"]["end"]
    compared = 0
    for gpu in report["gpus"]:
        steps = round(gpu["hours"] * 3600 / STEP)
        selector = f'instance="{gpu["instance"]}", gpu="{gpu["gpu"]}"'
        at = _eval_time(prometheus, gpu, last_evaluation)
        window = f"{int(steps * STEP)}s"
        for metric, figure, scale in (("gpu_phase_seconds_total", "phase_hours", 3600.0),
                                      ("gpu_phase_tokens_total", "tokens", 1.0)):
            for form, tolerance in ((f"{metric}{{{selector}}} - {metric}{{{selector}}} offset {window}", 0.01),
                                    (f"increase({metric}{{{selector}}}[{window}])", 0.03)):
                direct = {r["metric"]["phase"]: float(r["value"][1])
                          for r in prometheus.query(f"sum by (phase) ({form})", at=at)}
                for phase, value in direct.items():
                    if phase not in gpu[figure] or gpu[figure][phase] is None:
                        continue
                    ours = gpu[figure][phase] * scale
                    assert ours == pytest.approx(value, rel=tolerance, abs=0.5 if scale > 1 else 5), (
                        gpu["instance"], gpu["gpu"], form, phase, end)
                    compared += 1
        energy = prometheus.query(f"gpu_energy_joules_total{{{selector}}} - gpu_energy_joules_total{{{selector}}} "
                                  f"offset {window}", at=at)
        assert gpu["energy_kwh"] * 3.6e6 == pytest.approx(float(energy[0]["value"][1]), rel=0.01)
    assert compared >= 20


def _eval_time(prometheus: Prometheus, gpu: dict, before: float) -> float:
    """The last report-rule evaluation the report read: a GPU's newest record at or before `before`."""
    result = prometheus.query(
        f'timestamp(instance_gpu:gpu_observed_seconds:sum5s{{instance="{gpu["instance"]}", gpu="{gpu["gpu"]}"}})',
        at=before)
    return float(result[0]["value"][1])


def test_report_html_opens_offline_and_text_formats_render(fleet, tmp_path):
    url, end = fleet["prometheus"].url, fleet["end"]
    html_path = tmp_path / "report.html"
    done = _report(url, end, "--format", "html", "--output", str(html_path))
    assert done.returncode == 0, done.stderr
    html = html_path.read_text()
    assert html.count("<svg") >= 3
    for external in ("<script src", "<link", "url(", "@import", 'src="http'):
        assert external not in html
    for fmt in ("text", "markdown"):
        done = _report(url, end, "--format", fmt)
        assert done.returncode == 0, done.stderr
        assert "reclaim" in done.stdout.lower() or "unused" in done.stdout.lower()


def _desired_gpus(prometheus: Prometheus, end: float) -> list[float]:
    """chat-4b's desired GPU count every 2 s over the 200 s before end."""
    body = get_json(f"{prometheus.url}/api/v1/query_range?" + urlencode({
        "query": 'gpuphase:service_desired_gpus:rate20s{service="chat-4b"}', "start": f"{end - 200:.0f}",
        "end": f"{end:.0f}", "step": "2"}))
    result = body["data"]["result"]
    return [float(v) for _, v in result[0]["values"]] if result else []


def _rose_and_fell(values: list[float]) -> bool:
    if not values:
        return False
    peak = values.index(max(values))
    return max(values) >= 2 and min(values[:peak], default=99) <= 1 and min(values[peak:]) <= 1


def test_scaling_signals_follow_traffic_up_and_down(fleet):
    prometheus, end = fleet["prometheus"], fleet["end"]
    values = _desired_gpus(prometheus, end)
    assert _rose_and_fell(values), values  # low traffic: <= 1 GPU, high: >= 2, low again: <= 1
    assert prometheus.query('gpuphase:service_gpus:count{service="chat-4b"}')[0]["value"][1] == "2"
    idle_for = {r["metric"]["gpu"]: float(r["value"][1]) for r in prometheus.query(
        f'gpuphase:gpu_idle_for:seconds{{instance="{fleet["mixed"]}"}}')}
    assert idle_for["4"] > 60 and idle_for["3"] > 60, idle_for
    assert idle_for["0"] < 30 and idle_for["2"] < 30, idle_for


def test_scaling_examples_queries_return_data(fleet):
    from tests.scaling_queries import scaling_example_queries

    queries = scaling_example_queries(rate_window="20s")
    empty = {name: expr for name, expr in queries.items() if not fleet["prometheus"].query(expr)}
    assert not empty, empty


def test_report_bad_input_is_one_line_and_non_zero(fleet, tmp_path):
    url, end = fleet["prometheus"].url, fleet["end"]
    bad_prices = tmp_path / "prices.yaml"
    bad_prices.write_text("currency: EUR\nmodels:\n  NVIDIA H100 80GB HBM3: {gpu_hour: cheap}\n")
    cases = {
        "unreachable": (["--prometheus.url", "http://127.0.0.1:9"], "cannot reach"),
        "query error": (["--selector", '{job=~"("}'], "refused a query"),
        "price file": (["--price.file", str(bad_prices)], f"{bad_prices}:3:"),
        "empty range": (["--end", f"{end - 30 * 86400:.0f}"], "no GPUs"),
        "not an API": (["--prometheus.url", f"{url}/graph"], "Prometheus API"),
    }
    for name, (args, expected) in cases.items():
        command = [sys.executable, "-m", "gpuphase", "report", "--prometheus.url", url, "--range", RANGE,
                   "--end", f"{end:.3f}", "--format", "json"]
        if "--price.file" not in args:
            command += ["--price.gpu-hour", str(PRICE)]
        done = subprocess.run(command + args, capture_output=True, text=True, timeout=60, cwd=ROOT)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0, name
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, (name, done.stderr)
