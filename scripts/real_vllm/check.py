"""The real-server check: a real vLLM traces to a real agent; the agent's totals against vLLM's /metrics.

    .venv/bin/python scripts/real_vllm/check.py VLLM_PYTHON MODEL_DIR [--report FILE]

One `gpuphase run --backend sim` from this checkout (tests/agentproc.AgentProcess: free loopback
ports) and, one after the other, two vLLM servers tracing to it: over OTLP/gRPC
(`grpc://`, OTEL_SERVICE_NAME=tiny-llama-grpc, GPU 0) and over OTLP/HTTP (http/protobuf,
OTEL_SERVICE_NAME=tiny-llama-http, GPU 1). Each gets two loads:

1. requests one at a time: no two requests overlap, so the agent's prefill and decode seconds
   must be vLLM's own `vllm:request_prefill_time_seconds_sum` / `_decode_` (the same engine
   timestamps the span carries), less only what the decoder clamps into the span (2 %);
2. a concurrent load (continuous batching): `gpu_phase_tokens_total` must equal
   `vllm:prompt_tokens_total` / `vllm:generation_tokens_total` exactly, the spans received
   `vllm:request_success_total`, nothing may be rejected, and the busy seconds (prefill + decode
   + mixed) lie between the longest request's model time and the histograms' sums, with mixed > 0.

Prints every comparison and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402
from server import VllmServer  # noqa: E402

from tests.agentproc import AgentProcess, Metrics, poll  # noqa: E402

SETTLE = 6.0  # > the longest request (~2 s on 2 cores) + the span batch delay below
BATCH_DELAY_MS = "500"  # OTEL_BSP_SCHEDULE_DELAY for vLLM's exporter (SDK default 5 s)
RUNS = (("grpc", "tiny-llama-grpc", "0"), ("http", "tiny-llama-http", "1"))


class Checks:
    def __init__(self) -> None:
        self.results: list[dict] = []

    def check(self, name: str, ok: bool, **values: object) -> None:
        self.results.append(dict(check=name, ok=bool(ok), **values))
        shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {shown}", flush=True)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if not r["ok"]]


def phases(metrics: Metrics, name: str, gpu: str, service: str) -> dict[str, float]:
    values = {s.labels["phase"]: s.value for s in metrics.samples(name, gpu=gpu, service=service)}
    return {p: values.get(p, 0.0) for p in ("prefill", "decode", "mixed", "idle")}


def spans_received(metrics: Metrics) -> float:
    return metrics.value("gpu_spans_received_total", decoder="vllm") or 0.0


def settled(agent: AgentProcess, want_spans: float, last_end: float) -> Metrics:
    """The agent's page once it has every span and has finalised past the last request's end."""
    def ready():
        metrics = agent.scrape()
        return metrics if spans_received(metrics) >= want_spans and time.time() > last_end + SETTLE + 1.0 else None
    return poll(ready, SETTLE + 60, interval=0.5, message=f"{want_spans:.0f} vLLM spans, finalised")


def counter_delta(result: dict, name: str) -> float:
    return result["counters_after"][name] - result["counters_before"][name]


def run_one(checks: Checks, agent: AgentProcess, python: str, model: str, transport: str, service: str,
            gpu: str, logs: Path) -> dict:
    address = agent.otlp_grpc_address if transport == "grpc" else agent.otlp_http_address
    server = VllmServer(python, model, transport, address, service, logs / f"vllm-{transport}.log")
    server.tracing_env["OTEL_BSP_SCHEDULE_DELAY"] = BATCH_DELAY_MS
    report: dict = {"transport": transport, "service": service}
    with server:
        report.update(server.description(), startup_seconds=round(server.started_in, 1))
        print(f"--- {transport}: vLLM {server.version()} up in {server.started_in:.0f}s: {' '.join(server.argv[1:])}",
              flush=True)
        before = agent.scrape()
        received0 = spans_received(before)
        seconds0 = phases(before, "gpu_phase_seconds_total", gpu, service)
        tokens0 = phases(before, "gpu_phase_tokens_total", gpu, service)

        # 1. one request at a time
        serial = load.run(server.base_url, "tiny-llama", 8, 1, 21)
        metrics = settled(agent, received0 + counter_delta(serial, "vllm:request_success_total"),
                          max(r["ended"] for r in serial["requests"]))
        seconds1 = phases(metrics, "gpu_phase_seconds_total", gpu, service)
        for phase in ("prefill", "decode"):
            agent_s = seconds1[phase] - seconds0[phase]
            vllm_s = counter_delta(serial, f"vllm:request_{phase}_time_seconds_sum")
            checks.check(f"{transport} serial {phase} seconds = vllm:request_{phase}_time_seconds_sum",
                         vllm_s * 0.98 <= agent_s <= vllm_s * 1.0 + 1e-6, agent=agent_s, vllm=vllm_s)
        checks.check(f"{transport} serial: no mixed time", seconds1["mixed"] - seconds0["mixed"] < 1e-6,
                     mixed=seconds1["mixed"] - seconds0["mixed"])

        # 2. a concurrent load
        burst = load.run(server.base_url, "tiny-llama", 40, 12, 7)
        want = received0 + counter_delta(serial, "vllm:request_success_total") + \
            counter_delta(burst, "vllm:request_success_total")
        metrics = settled(agent, want, max(r["ended"] for r in burst["requests"]))
        seconds2 = phases(metrics, "gpu_phase_seconds_total", gpu, service)
        tokens2 = phases(metrics, "gpu_phase_tokens_total", gpu, service)
        for phase, counter in (("prefill", "vllm:prompt_tokens_total"), ("decode", "vllm:generation_tokens_total")):
            agent_t = tokens2[phase] - tokens0[phase]
            vllm_t = counter_delta(serial, counter) + counter_delta(burst, counter)
            checks.check(f"{transport} {phase} tokens = {counter}", agent_t == vllm_t, agent=agent_t, vllm=vllm_t)
        checks.check(f"{transport} spans received = vllm:request_success_total", spans_received(metrics) == want,
                     agent=spans_received(metrics) - received0, vllm=want - received0)
        busy = sum(seconds2[p] - seconds1[p] for p in ("prefill", "decode", "mixed"))
        total = counter_delta(burst, "vllm:request_prefill_time_seconds_sum") + \
            counter_delta(burst, "vllm:request_decode_time_seconds_sum")
        longest = max(r["ended"] - r["started"] for r in burst["requests"])
        checks.check(f"{transport} concurrent busy seconds within [longest request / 2, sum of model times]",
                     longest / 2 <= busy <= total + 1e-6, busy=busy, longest=longest, model_time_sum=total)
        checks.check(f"{transport} concurrent: mixed time > 0", seconds2["mixed"] - seconds1["mixed"] > 0,
                     mixed=seconds2["mixed"] - seconds1["mixed"])
        report.update(serial={k: v for k, v in serial.items() if k != "requests"},
                      burst={k: v for k, v in burst.items() if k != "requests"},
                      agent_seconds=seconds2, agent_tokens=tokens2)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vllm_python")
    parser.add_argument("model_dir")
    parser.add_argument("--report", type=Path, help="write the comparisons and vLLM's counters as JSON")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/gpuphase-real-vllm"))
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    begin = time.monotonic()
    agent_args = ["--backend", "sim", "--sim.gpus", "2", "--sample.interval", "100ms", "--phase.settle", f"{SETTLE:g}s",
                  *[a for _, service, gpu in RUNS for a in ("--phase.map", f"{service}={gpu}")]]
    reports = []
    with AgentProcess(agent_args) as agent:
        for transport, service, gpu in RUNS:
            reports.append(run_one(checks, agent, args.vllm_python, args.model_dir, transport, service, gpu, args.logs))
        final = agent.scrape()
        rejected = {s.labels["reason"]: s.value for s in final.get("gpu_spans_rejected_total", [])}
        checks.check("no span rejected", not any(rejected.values()), rejected=rejected)
        (args.logs / "agent.log").write_text(agent.stderr_text())
    seconds = time.monotonic() - begin
    print(f"{len(checks.results) - len(checks.failed)}/{len(checks.results)} checks passed in {seconds:.0f}s "
          f"(logs in {args.logs})")
    if args.report:
        args.report.write_text(json.dumps({"checks": checks.results, "runs": reports, "seconds": seconds}, indent=1))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
