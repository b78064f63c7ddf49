"""Figure 6: hostile cardinality. 100k distinct services, pids and request ids through OTLP.

Every span names GPU 0 through `gpuphase.gpu.ids` on its resource, so each distinct service
really reaches the phase accountant (not just the unmatched counter). The label sets must stay
within the caps (`--phase.max-services`, then `other`) and resident memory must level off: RSS
is recorded after every tenth of the spans.
"""

from __future__ import annotations

import re
import time

from benchmarks.harness import MIB, AgentProcess
from benchmarks.otlp_load import _GrpcSender, vllm_request
from benchmarks.results import Figure, Section, Table
from tests.spanfactory import key_values

MAX_SERVICES = 32


def hostile_request(first: int, count: int, now: float):
    """`count` spans, each under its own resource: service, pid and request id all distinct."""
    request = vllm_request(count, now, request_prefix=f"r{first}")
    spans = list(request.resource_spans[0].scope_spans[0].spans)
    del request.resource_spans[:]
    for n, span in enumerate(spans):
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.extend(key_values({
            "service.name": f"svc-{first + n}", "vllm.process_id": 100_000 + first + n, "gpuphase.gpu.ids": "0"}))
        resource_spans.scope_spans.add().spans.append(span)
    return request


def label_values(text: str, label: str) -> set[str]:
    return set(re.findall(rf'[{{,]{label}="([^"]*)"', text))


def run(spans: int = 100_000, per_request: int = 1000) -> Section:
    # Settle 1 s so that placed windows turn into phase series within the run.
    # No --phase.map: a mapped GPU takes only its own services' windows, so the flood's services
    # reach GPU 0 only as trusted claims (--phase.trust-span-gpus), the worst case for label slots.
    args = ["--backend", "sim", "--sim.gpus", "2", "--sample.interval", "1s", "--phase.settle", "1s",
            "--phase.retention", "60s", "--phase.max-services", str(MAX_SERVICES), "--phase.trust-span-gpus"]
    rows = []
    with AgentProcess(*args) as agent:
        agent.wait_ready()
        rss_before = agent.rss_bytes() / MIB
        sender = _GrpcSender(agent.otlp_grpc_address)
        outcomes: dict[str, int] = {}
        try:
            for first in range(0, spans, per_request):
                body = hostile_request(first, min(per_request, spans - first), time.time()).SerializeToString()
                outcome = sender.send(body)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if (first + per_request) % max(spans // 10, per_request) == 0:
                    rows.append([first + per_request, f"{agent.rss_bytes() / MIB:.1f}"])
        finally:
            sender.close()
        time.sleep(3)  # past the settle window: the accountant turns the windows into series
        text = agent.metrics_text()
        rss_after = agent.rss_bytes() / MIB
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    services = label_values(text, "service")
    pids = label_values(text, "pid")
    section = Section(
        "bounds", "Bounds under hostile cardinality",
        f"{spans:,} vLLM spans over OTLP/gRPC ({per_request} per request), each with its own service.name, "
        "vllm.process_id and request id, all placed on GPU 0 via `gpuphase.gpu.ids`, sent to a 2-GPU sim agent "
        f"without `--phase.map` (`--phase.max-services {MAX_SERVICES} --phase.trust-span-gpus`, so that the "
        "claims are placed). "
        "Then one scrape: series and distinct label values.")
    within = len(services) <= MAX_SERVICES + 1
    section.figures.append(Figure("distinct service label values on /metrics", len(services), "values",
                                  goal=f"≤ {MAX_SERVICES} + other", met=within))
    section.figures.append(Figure("series on /metrics after the flood", series, "series"))
    section.figures.append(Figure("distinct pid label values on /metrics", len(pids), "values"))
    section.figures.append(Figure("RSS after the flood", rss_after, "MiB", "RSS before", rss_before))
    section.notes.append(f"Requests answered: {outcomes}. `other` present: {'other' in services}.")
    section.tables.append(Table(["spans sent", "RSS (MiB)"], rows))
    return section


def quick_kwargs() -> dict:
    return {"spans": 20_000}
