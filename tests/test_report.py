"""`gpuphase report` on fixed inputs: price files, the API client's errors, the query windows,
the analysis (tensor-parallel tokens, costs), the recommendations, the flags' parsing.
The end-to-end run against real Prometheus and VictoriaMetrics is tests/test_e2e_report.py."""

from __future__ import annotations

import http.server
import json
import threading
from collections import defaultdict

import pytest

from gpuphase.report import prices
from gpuphase.report.analyse import Analysis, _group_tokens
from gpuphase.report.api import ApiError, PrometheusApi
from gpuphase.report.collect import Collected, Gpu, Window, instance_matcher, selector_matchers, windows
from gpuphase.report.main import ReportUsageError, parse_end, parse_range
from gpuphase.report.recommend import HOURS_PER_MONTH, Recommender

H100 = "NVIDIA H100 80GB HBM3"


# ---- price files ---------------------------------------------------------------------------
def test_price_file_models_default_and_case_insensitive_match(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("currency: EUR\ngpu_hour: 1.5\nenergy_kwh: 0.2\nmodels:\n"
                    f"  {H100}: {{gpu_hour: 2.5, memory_bandwidth_tbps: 3.35}}\n"
                    "  NVIDIA H200: {memory_bandwidth_tbps: 4.8}\n")
    book = prices.load(str(path))
    assert book.currency == "EUR" and book.energy_kwh == 0.2
    assert book.gpu_hour(H100) == 2.5 and book.gpu_hour(H100.lower()) == 2.5
    assert book.gpu_hour("NVIDIA H200") == 1.5  # no price of its own: the default
    assert book.bandwidth_tbps("nvidia h200") == 4.8
    assert book.gpu_hour("Tesla T4") == 1.5 and book.bandwidth_tbps("Tesla T4") is None


@pytest.mark.parametrize("text, where, reason", [
    ("gpu_hour: cheap\n", ":1:", "non-negative number"),
    ("gpu_hour: -1\n", ":1:", "non-negative number"),
    ("gpu_hour: .nan\n", ":1:", "non-negative number"),
    ("gpu_hour: 2\nprice: 3\n", ":2:", "unknown key 'price'"),
    ("gpu_hour: 2\ngpu_hour: 3\n", ":2:", "given twice"),
    ("models:\n  A100: {gpu_hour: 1, bandwidth: 2}\n", ":2:", "unknown key 'bandwidth'"),
    ("models:\n  A100: {gpu_hour: 1, memory_bandwidth_tbps: 0}\n", ":2:", "positive number"),
    ("models:\n  A100: {memory_bandwidth_tbps: 2}\n", ":1:", "no price"),
    ("models: [a, b]\n", ":1:", "must be a mapping"),
    ("gpu_hour: [1\n", ":2:", "invalid YAML"),
    ("", "", "empty price file"),
])
def test_price_file_errors_name_file_and_line(tmp_path, text, where, reason):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(prices.PriceFileError) as caught:
        prices.load(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}{where}") and reason in message and "\n" not in message, message


def test_price_file_that_is_not_a_regular_file(tmp_path):
    with pytest.raises(prices.PriceFileError, match="directory"):
        prices.load(str(tmp_path))


# ---- the API client ------------------------------------------------------------------------
class _Fake(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, str, bytes]] = {}

    def _answer(self):
        status, kind, body = self.answers[self.path.split("?")[0]]
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Fake.answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status, kind, body, expected", [
    (200, "text/html", b"<html>Grafana</html>", "did not answer with Prometheus API JSON"),
    (401, "text/plain", b"Unauthorized", "refused the report's credentials"),
    (400, "application/json", json.dumps({"status": "error", "errorType": "bad_data",
                                          "error": "1:5: parse error:\nunexpected"}).encode(),
     "refused a query (bad_data, HTTP 400): 1:5: parse error: unexpected"),
    (200, "application/json", json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode(),
     "returned a matrix"),
])
def test_api_failures_are_one_line(fake_api, status, kind, body, expected):
    url, answers = fake_api
    answers["/api/v1/query"] = (status, kind, body)
    with pytest.raises(ApiError) as caught:
        PrometheusApi(url).query("up", 0)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_api_unreachable_and_bad_url():
    with pytest.raises(ApiError, match="cannot reach the Prometheus API at http://127.0.0.1:9"):
        PrometheusApi("http://127.0.0.1:9", timeout=5).query("up", 0)
    with pytest.raises(ApiError, match="expected http"):
        PrometheusApi("prometheus:9090")


# ---- windows and matchers --------------------------------------------------------------------
def test_windows_tile_the_range_in_whole_steps_oldest_shortest():
    spans = windows(end=10_000.0, range_seconds=3_700.0, count=4, step=300.0)
    assert [w.seconds for w in spans] == [100.0, 1200.0, 1200.0, 1200.0]
    assert spans[-1].end == 10_000.0
    assert all(later.end - later.seconds == earlier.end for earlier, later in zip(spans, spans[1:]))
    assert windows(end=100.0, range_seconds=20.0, count=24, step=5.0) == [
        Window(85.0, 5.0), Window(90.0, 5.0), Window(95.0, 5.0), Window(100.0, 5.0)]


def test_selector_and_instance_matchers():
    assert selector_matchers(' {job="gpuphase", cluster="a",} ') == 'job="gpuphase", cluster="a"'
    assert selector_matchers("") == ""
    with pytest.raises(Exception, match="label matchers in braces"):
        selector_matchers('job="gpuphase"')
    # A regex of literal instances: dots and a quote escaped for RE2 inside a PromQL string.
    assert instance_matcher(["node.1:9842", 'x"y']) == 'instance=~"node\\\\.1:9842|x\\"y"'


# ---- analysis ------------------------------------------------------------------------------
def test_tensor_parallel_tokens_count_once_replicas_add_up():
    tp2_and_replicas = {("node1", "decode"): [100.0, 100.0, 40.0], ("node2", "decode"): [7.0],
                        ("node1", "prefill"): [500.0, 500.0]}
    assert _group_tokens(tp2_and_replicas) == {"prefill": 500.0, "decode": 147.0}
    assert _group_tokens({}) == {"prefill": None, "decode": None}


def _collected(step=300.0, buckets=2) -> Collected:
    """One host: GPU 0 (llm, TP2 with GPU 1) busy, GPU 2 unused; two 1-hour buckets."""
    timeline = [Window(3600.0 * (i + 1), 3600.0) for i in range(buckets)]
    gpus = [Gpu("node1", str(i), f"GPU-{i}", H100) for i in range(3)]
    data = Collected(step=step, end=timeline[-1].end, gpus=gpus, timeline=timeline)
    for i in (0, 1):
        key = ("node1", str(i), f"GPU-{i}")
        data.buckets.setdefault("observed", {})[key] = [defaultdict(float, {(): 3600.0}) for _ in timeline]
        data.buckets.setdefault("phase_seconds", {})[key] = [
            defaultdict(float, {("prefill", "llm"): 600.0, ("decode", "llm"): 2400.0, ("mixed", "llm"): 300.0,
                                ("idle", "llm"): 300.0}) for _ in timeline]
        data.totals.setdefault("tokens", {})[key] = {("prefill", "llm"): 1e6, ("decode", "llm"): 2e5}
        data.totals.setdefault("phase_energy", {})[key] = {("prefill", "llm"): 3.6e6, ("decode", "llm"): 7.2e6}
        data.totals.setdefault("energy", {})[key] = {(): 1.8e7}
        data.totals.setdefault("idle_allocated", {})[key] = {(): 600.0}
    unused = ("node1", "2", "GPU-2")
    data.buckets["observed"][unused] = [defaultdict(float, {(): 3600.0}) for _ in timeline]
    data.totals.setdefault("unused", {})[unused] = {(): 7200.0}
    data.totals.setdefault("memory_total", {})[unused] = {(): 80e9}
    data.totals.setdefault("memory_used", {})[unused] = {(): 20e9}
    return data


def test_analysis_per_gpu_service_and_fleet():
    analysis = Analysis(_collected(), prices.flat(2.0))
    gpu0, _, unused = analysis.gpus
    assert gpu0["hours"] == 2.0 and gpu0["cost"] == 4.0
    assert gpu0["phase_hours"] == {"prefill": 1 / 3, "decode": 4 / 3, "mixed": 1 / 6, "idle": 1 / 6, "unknown": 0.0}
    assert gpu0["energy_kwh"] == 5.0 and gpu0["energy_per_token_joules"] == {"prefill": 3.6, "decode": 36.0}
    assert gpu0["phase_share_series"][0][1]["decode"] == pytest.approx(2 / 3)
    assert unused["phase_hours"]["unknown"] == 2.0 and unused["tokens"] == {"prefill": None, "decode": None}
    assert unused["idle_gpu_hours"] == {"allocated": 0.0, "unused": 2.0, "total": 2.0}
    assert unused["idle_cost"] == {"allocated": 0.0, "unused": 4.0, "total": 4.0}
    assert unused["vram"] == {"total_bytes": 80e9, "peak_used_bytes": 20e9, "headroom_bytes": 60e9,
                              "headroom_ratio": 0.75}
    (llm,) = analysis.services
    assert llm["gpus"] == 2 and llm["gpu_hours"] == pytest.approx(4.0) and llm["cost"] == pytest.approx(8.0)
    assert llm["tokens"] == {"prefill": 1e6, "decode": 2e5}  # the TP2 pair counts once
    # The whole cost split by busy time, mixed halved: prefill 1/3+1/12, decode 4/3+1/12 of 3.5 h busy.
    prefill_cost = 8.0 * (5 / 12) / (5 / 12 + 17 / 12)
    assert llm["cost_per_million_tokens"]["prefill"] == pytest.approx(prefill_cost)
    assert llm["cost_per_million_tokens"]["decode"] == pytest.approx((8.0 - prefill_cost) / 0.2)
    assert llm["mixed_share"] == pytest.approx((1 / 3) / (11 / 3))
    assert analysis.fleet["idle_cost"]["total"] == pytest.approx(4.0 + 2 * 2 * (600 / 3600))
    assert analysis.fleet["tokens"] == {"prefill": 1e6, "decode": 2e5}


def test_no_price_means_null_costs_not_zero():
    analysis = Analysis(_collected(), prices.flat(None))
    assert all(g["cost"] is None and g["idle_cost"]["total"] is None for g in analysis.gpus)
    assert analysis.services[0]["cost_per_million_tokens"] == {"prefill": None, "decode": None}
    assert analysis.fleet["cost"] is None


# ---- recommendations ---------------------------------------------------------------------------
def _gpu(**changes) -> dict:
    gpu = {"instance": "node1", "gpu": "0", "uuid": "GPU-0", "model": H100, "services": ["llm"],
           "price_per_hour": 2.0, "hours": 10.0,
           "phase_hours": {"prefill": 0.5, "decode": 7.0, "mixed": 1.0, "idle": 1.5, "unknown": 0.0},
           "idle_gpu_hours": {"allocated": 1.5, "unused": 0.0, "total": 1.5},
           "bandwidth_bound_hours": 0.0, "dram_active": 0.5, "tensor_active": 0.3, "energy_kwh": 4.0,
           "energy_kwh_by_phase": {"prefill": 0.2, "decode": 3.0, "mixed": 0.4, "idle": 0.4, "unknown": 0.0}}
    gpu.update(changes)
    return gpu


def _recommend(gpus, services=(), book=None):
    return Recommender(7 * 86400, 300.0, 'job="gpuphase"', book or prices.flat(2.0)).recommend(list(gpus), list(services))


def test_healthy_gpu_gets_no_recommendation():
    assert _recommend([_gpu()]) == []


def test_waste_recommendations_priced_and_sorted_by_saving():
    unused = _gpu(gpu="4", services=[], idle_gpu_hours={"allocated": 0.0, "unused": 9.5, "total": 9.5})
    idle = _gpu(gpu="3", idle_gpu_hours={"allocated": 6.0, "unused": 0.0, "total": 6.0})
    found = _recommend([idle, _gpu(), unused])
    assert [(r["kind"], r["target"]["gpu"]) for r in found] == [("reclaim_unused", "4"), ("consolidate_idle", "3")]
    assert found[0]["monthly_savings"] == round(0.95 * 2.0 * HOURS_PER_MONTH, 2)
    assert found[1]["monthly_savings"] == round(0.6 * 2.0 * HOURS_PER_MONTH, 2)
    evidence = found[0]["evidence"][0]
    assert evidence["value"] == 9.5 and evidence["promql"] == (
        'sum_over_time(instance_gpu:gpu_unused_seconds:sum5m{job="gpuphase", instance="node1", gpu="4"}[7d]) / 3600')


def test_bandwidth_bound_options_price_a_richer_model_and_a_power_cap(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text(f"energy_kwh: 0.25\nmodels:\n  {H100}: {{gpu_hour: 2.0, memory_bandwidth_tbps: 3.35}}\n"
                    "  NVIDIA H200: {gpu_hour: 2.4, memory_bandwidth_tbps: 4.8}\n"
                    "  NVIDIA B200: {gpu_hour: 9.0, memory_bandwidth_tbps: 8.0}\n")
    bound = _gpu(bandwidth_bound_hours=6.0, dram_active=0.88, tensor_active=0.07)
    (rec,) = _recommend([bound], book=prices.load(str(path)))
    assert rec["kind"] == "bandwidth_bound_decode"
    richer, batch, quantize, cap = rec["options"]
    factor = (2.4 / 2.0) * (3.35 / 4.8)  # H200 beats B200 per decoded token at these prices
    assert "NVIDIA H200" in richer["detail"]
    assert richer["monthly_savings"] == round(0.75 * 2.0 * HOURS_PER_MONTH * (1 - factor), 2)
    assert batch["monthly_savings"] is None and quantize["monthly_savings"] is None
    kwh = 3.0 / 10.0 * HOURS_PER_MONTH * 0.2
    assert cap["monthly_kwh_saved"] == round(kwh, 3) and cap["monthly_savings"] == round(kwh * 0.25, 2)
    assert rec["monthly_savings"] == max(richer["monthly_savings"], cap["monthly_savings"])


def test_bandwidth_bound_without_a_bandwidth_table_claims_no_saving():
    (rec,) = _recommend([_gpu(bandwidth_bound_hours=6.0)])
    assert rec["monthly_savings"] is None
    assert "memory_bandwidth_tbps" in rec["options"][0]["detail"]


def test_mixed_batches_suggest_disaggregation_without_a_price():
    service = {"service": "llm", "gpu_hours": 10.0, "phase_hours": {"idle": 1.0}, "mixed_share": 0.4}
    (rec,) = _recommend([], [service])
    assert rec["kind"] == "disaggregate_prefill_decode" and rec["monthly_savings"] is None
    assert _recommend([], [dict(service, mixed_share=0.1)]) == []


# ---- flags -------------------------------------------------------------------------------------
def test_parse_end_and_range():
    assert parse_end("now", now=123.0) == 123.0
    assert parse_end("1700000000.5") == 1700000000.5
    assert parse_end("2026-12-01T00:00:00Z") == 1796083200.0
    assert parse_end("2026-12-01T01:00:00+01:00") == 1796083200.0
    for bad in ("yesterday", "2026-12-01T00:00:00"):
        with pytest.raises(ReportUsageError):
            parse_end(bad)
    assert parse_range("7d") == 7 * 86400
    for bad in ("0s", "-1h", "week"):
        with pytest.raises(ReportUsageError):
            parse_range(bad)
