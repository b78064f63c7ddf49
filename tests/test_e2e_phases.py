"""Phase attribution end to end: the real OpenTelemetry SDK sends vLLM V1 `llm_request` spans over
OTLP gRPC and OTLP HTTP to a `gpuphase run` subprocess; the recovered phase seconds must match the
known windows within 2 %. Then `gpuphase demo` against its own ground truth."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuphase.demo.truth import phase_durations
from tests.agentproc import AgentProcess
from tests.realprom import wait_until

pytestmark = pytest.mark.e2e


def phase_values(text: str, metric: str = "gpu_phase_seconds_total") -> dict[tuple[str, str, str], float]:
    """{(gpu, service, phase): value} of one phase family."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric:
                out[(sample.labels["gpu"], sample.labels["service"], sample.labels["phase"])] = sample.value
    return out


def scrape_text(agent: AgentProcess) -> str:
    with urllib.request.urlopen(agent.metrics_url, timeout=5) as response:
        return response.read().decode()


def send_vllm_spans(exporter, service: str, requests: list[dict]) -> None:
    """Emit one `llm_request` per request exactly as vLLM V1 does (times in seconds, wall clock)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    tracer = provider.get_tracer("vllm")
    for r in requests:
        first_token = r["prefill_start"] + r["prefill"]
        end = first_token + r["decode"]
        span = tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=int(r["arrival"] * 1e9),
                                 attributes={
                                     "gen_ai.request.id": r["id"],
                                     "gen_ai.usage.prompt_tokens": r["prompt"],
                                     "gen_ai.usage.completion_tokens": r["output"],
                                     "gen_ai.latency.time_in_queue": r["prefill_start"] - r["arrival"],
                                     "gen_ai.latency.time_to_first_token": first_token - r["arrival"],
                                     "gen_ai.latency.e2e": end - r["arrival"],
                                     "gen_ai.latency.time_in_model_prefill": r["prefill"],
                                     "gen_ai.latency.time_in_model_decode": r["decode"],
                                     "gen_ai.latency.time_in_model_inference": r["prefill"] + r["decode"],
                                 })
        span.end(end_time=int(end * 1e9))
    provider.force_flush()
    provider.shutdown()


def planned_requests(t0: float) -> list[dict]:
    """Prefill-only 1 s, decode-only 1 s, mixed 0.5 s, decode-only 1.5 s, then idle."""
    return [
        dict(id="a", arrival=t0 - 0.2, prefill_start=t0, prefill=1.0, decode=3.0, prompt=2048, output=75),
        dict(id="b", arrival=t0 + 2.0, prefill_start=t0 + 2.0, prefill=0.5, decode=1.5, prompt=512, output=38),
    ]


def expected_seconds(requests: list[dict]) -> dict[str, float]:
    windows = []
    for r in requests:
        first_token = r["prefill_start"] + r["prefill"]
        windows += [(r["prefill_start"], first_token, "prefill"), (first_token, first_token + r["decode"], "decode")]
    start = min(w[0] for w in windows)
    return phase_durations(windows, start, max(w[1] for w in windows))


def test_vllm_spans_over_grpc_and_http_recover_phase_seconds_within_2_percent():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    # settle > the longest request (4 s) + the time to send its span, as docs/phases.md asks
    args = ["--backend", "sim", "--sim.gpus", "2", "--sample.interval", "100ms", "--phase.settle", "7s",
            "--phase.map", "llama-grpc=0", "--phase.map", "llama-http=1"]
    with AgentProcess(args) as agent:
        t0 = time.time() + 1.0
        requests = planned_requests(t0)
        truth = expected_seconds(requests)
        assert truth["prefill"] == pytest.approx(1.0) and truth["mixed"] == pytest.approx(0.5)
        # Spans leave when requests end, as a model server sends them.
        wait_until(lambda: time.time() > t0 + 4.1, 10, what="the planned requests to end")
        send_vllm_spans(GrpcExporter(endpoint=f"http://{agent.otlp_grpc_address}", insecure=True), "llama-grpc",
                        requests)
        send_vllm_spans(HttpExporter(endpoint=agent.otlp_http_url), "llama-http", requests)

        def settled():
            values = phase_values(scrape_text(agent))
            finished = all(values.get((gpu, svc, "decode"), 0) >= truth["decode"] * 0.98
                           for gpu, svc in (("0", "llama-grpc"), ("1", "llama-http")))
            return values if finished and time.time() > t0 + 4.0 + 7.0 + 1.0 else None

        values = wait_until(settled, 30, what="phase seconds to settle")
        for gpu, service in (("0", "llama-grpc"), ("1", "llama-http")):
            for phase in ("prefill", "decode", "mixed"):
                recovered = values[(gpu, service, phase)]
                assert recovered == pytest.approx(truth[phase], rel=0.02), (gpu, service, phase, recovered)
        tokens = phase_values(scrape_text(agent), "gpu_phase_tokens_total")
        assert tokens[("0", "llama-grpc", "prefill")] == 2048 + 512
        assert tokens[("1", "llama-http", "decode")] == 75 + 38
        received = agent_counter(scrape_text(agent), "gpu_spans_received_total", decoder="vllm")
        assert received == 4


def agent_counter(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def test_demo_recovers_the_ground_truth(tmp_path):
    """`gpuphase demo` (phase-blocks: every phase lasts >= 1 s): recovered phase seconds within 2 % of the
    simulator's truth, and per-phase tensor and DRAM activity (integral / seconds) within 0.05.

    The final scrape is timed so that the agent's finalised edge (now - settle) lies inside an idle
    stretch of the scripted cycle: the work phases up to there are then known exactly, whatever
    the agent's tick phase.
    """
    truth_file = tmp_path / "truth.json"
    settle = 7.0  # longer than a scripted request (5 s) plus the 0.5 s span batch delay
    env = {"OTEL_BSP_SCHEDULE_DELAY": "500"}  # the SDK's span batch delay (vLLM's default is 5 s)
    args = ["--demo.scenario", "phase-blocks", "--demo.truth-file", str(truth_file), "--sample.interval", "100ms",
            "--phase.settle", f"{settle:g}s"]
    with AgentProcess(args, env=env, command="demo") as agent:
        origin = wait_until(lambda: json.loads(truth_file.read_text())["started"], 30, what="the truth file")
        cycles = 3
        # Cycle: prefill [0,1.5], decode [1.5,3.5], mixed [3.5,5], decode [5,5.04], idle [5.04,8].
        edge = origin + 8.0 * cycles + 6.5
        wait_until(lambda: time.time() > edge + settle + 0.3, 8.0 * cycles + settle + 30, interval=0.5,
                   what="the scripted cycles to be finalised")
        text = scrape_text(agent)
    truth = json.loads(truth_file.read_text())["gpus"]["0"]
    expected = phase_durations([tuple(w) for w in truth["windows"]], origin, edge)
    recovered = {phase: value for (gpu, service, phase), value in phase_values(text).items()
                 if gpu == "0" and service == "blocks"}
    for phase in ("prefill", "decode", "mixed"):
        assert recovered[phase] == pytest.approx(expected[phase], rel=0.02), (phase, recovered, expected)
    # Idle: the truth's idle plus the agent's short lead-in before the first request, plus what lies
    # past the edge (the edge sits in an idle stretch that is finalised for up to 1.5 s beyond it).
    assert expected["idle"] - 0.05 <= recovered["idle"] <= expected["idle"] + 3.0
    for name in ("tensor", "dram"):
        integrals = phase_values(text, f"gpu_phase_{name}_active_seconds_total")
        for phase in ("prefill", "decode", "mixed"):
            average = integrals[("0", "blocks", phase)] / recovered[phase]
            assert average == pytest.approx(truth["activity"][phase][f"{name}_active"], abs=0.05), (phase, name)
