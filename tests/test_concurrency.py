"""Concurrency: many scrapers, fast sampling and a span flood at once, against a real agent process.

What must hold in every single scrape, however the threads interleave:
- it answers 200 and parses as Prometheus text;
- it is one consistent snapshot: for every GPU, used + free == total VRAM (the backends derive
  used from the same reading, so a mix of two snapshots shows as a mismatch when memory moves:
  the fake NVML's memory use changes every tick);
- no counter goes backwards between two successive scrapes by the same scraper.

Run on the simulator (the brief's 4 GPUs) and on the fake NVML library (memory that moves, the
real pynvml path). Throughput and latency are printed for the record, never asserted.
"""

from __future__ import annotations

import http.client
import multiprocessing
import statistics
import threading
import time

import pytest

from tests import spanfactory as f
from tests.agentproc import HOST, AgentProcess, Metrics, poll
from tests.fakenvml import FakeNvml

SCRAPERS = 50
LOAD_SECONDS = 3.0  # how long the load runs (not an assertion)
MIN_SCRAPES_PER_SCRAPER = 3  # so that every scraper compares successive scrapes at least twice
HARD_STOP_SECONDS = 120.0  # a safety net for a hung agent, far above what the test needs
GPUS = 4
SERVICE = "vllm"
SPANS_PER_REQUEST = 200
COMMON_ARGS = ["--sample.interval", "100ms", "--phase.map", f"{SERVICE}=0,1,2,3",
               "--phase.settle", "1s", "--phase.retention", "10s"]


class Scraper(threading.Thread):
    """Scrapes over one keep-alive connection from `go` until `stop`; records every violation.

    Why the `go` gate: starting a thread waits for it to get the GIL, and with dozens of threads
    already busy that wait grows with every start (seconds for 50); gated threads start idle, cheaply.
    """

    def __init__(self, agent: AgentProcess, go: threading.Event, stop: threading.Event, errors: list[str]):
        super().__init__(daemon=True)
        self.agent, self.go, self.stop, self.errors = agent, go, stop, errors
        self.scrapes = 0
        self.latencies: list[float] = []

    def run(self) -> None:
        self.go.wait()
        connection = http.client.HTTPConnection(HOST, self.agent.metrics_port, timeout=60)
        previous: dict = {}
        try:
            while not self.stop.is_set() or self.scrapes < MIN_SCRAPES_PER_SCRAPER:
                started = time.monotonic()
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                text = response.read().decode()
                self.latencies.append(time.monotonic() - started)
                if response.status != 200:
                    self.errors.append(f"status {response.status}: {text[:200]}")
                    return
                metrics = Metrics(text)
                self._check_snapshot(metrics)
                counters = metrics.counters()
                for key, value in counters.items():
                    if key in previous and value < previous[key]:
                        self.errors.append(f"counter {key} went from {previous[key]} to {value}")
                previous = counters
                self.scrapes += 1
        except Exception as error:  # noqa: BLE001 - any failure of the scrape is a finding; report it
            self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            connection.close()

    def _check_snapshot(self, metrics: Metrics) -> None:
        for total in metrics.get("gpu_memory_total_bytes", []):
            gpu = total.labels["gpu"]
            used, free = metrics.value("gpu_memory_used_bytes", gpu=gpu), metrics.value("gpu_memory_free_bytes", gpu=gpu)
            if used is None or free is None or used + free != total.value:
                self.errors.append(f"GPU {gpu}: used {used} + free {free} != total {total.value}")


def span_flood(port: int, go, stop, results) -> None:
    """Post batches of vLLM spans as fast as the agent takes them, until `stop`; put the status
    counts (503 = backpressure, allowed) or an error on `results`.

    Runs in its own process: as a thread it would get 1/51 of this process's GIL next to the
    scrapers, which is a trickle, not a flood.
    """
    statuses: dict[int, int] = {}
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    go.wait()
    try:
        while not stop.is_set():
            start = time.time() - 2.5  # recent, inside the retention window, so phases get accounted
            spans = [f.vllm_span(start=start + i * 0.001, duration=2.0, ttft=0.3, prefill=0.2, decode=1.6)
                     for i in range(SPANS_PER_REQUEST)]
            body = f.request(spans, resource={"service.name": SERVICE}).SerializeToString()
            connection.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
            response = connection.getresponse()
            response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status not in (200, 503):
                break
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
        results.put(statuses)
    except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
        results.put(f"span flood: {type(error).__name__}: {error}")
    finally:
        connection.close()


@pytest.fixture(params=["sim", "fake-nvml"])
def agent(request, tmp_path):
    if request.param == "sim":
        args, env = ["--backend", "sim", "--sim.gpus", str(GPUS)], None
    else:
        fake = FakeNvml(request.getfixturevalue("fake_nvml_library"), tmp_path)
        fake.control(gpus=GPUS)
        args, env = ["--backend", "nvml"], fake.environment()
    with AgentProcess([*args, *COMMON_ARGS], env=env) as process:
        yield process


def test_parallel_scrapes_during_sampling_and_a_span_flood_see_whole_snapshots(agent, record_property):
    go, stop, errors = threading.Event(), threading.Event(), []
    scrapers = [Scraper(agent, go, stop, errors) for _ in range(SCRAPERS)]
    for thread in scrapers:
        thread.start()
    # spawn, not fork: forking a process that runs threads (and maybe grpc) is unsafe.
    context = multiprocessing.get_context("spawn")
    flood_go, flood_stop, flood_results = context.Event(), context.Event(), context.Queue()
    flood = context.Process(target=span_flood, args=(agent.otlp_http_port, flood_go, flood_stop, flood_results),
                            daemon=True)
    flood.start()
    flood_go.set()
    go.set()
    deadline = time.monotonic() + LOAD_SECONDS
    while time.monotonic() < deadline and not errors:
        time.sleep(0.1)
    stop.set()
    flood_stop.set()
    for thread in scrapers:
        thread.join(HARD_STOP_SECONDS)
        assert not thread.is_alive(), "a scraper hung: the agent stopped answering"
    flood_statuses = flood_results.get(timeout=HARD_STOP_SECONDS)
    flood.join(HARD_STOP_SECONDS)

    assert not errors, errors[:10]
    assert all(s.scrapes >= MIN_SCRAPES_PER_SCRAPER for s in scrapers)
    assert isinstance(flood_statuses, dict) and set(flood_statuses) <= {200, 503}, flood_statuses
    assert flood_statuses.get(200, 0) > 0, flood_statuses
    metrics = agent.assert_answering()
    assert len(metrics.get("gpu_memory_total_bytes", [])) == GPUS
    assert metrics.value("gpu_spans_received_total", decoder="vllm") > 0
    # The flood reached the phase accountant, so its counters were among those checked above.
    poll(lambda: agent.scrape().samples("gpu_phase_seconds_total", service=SERVICE), 30, message="phase series")

    latencies = sorted(latency for s in scrapers for latency in s.latencies)
    scrapes = len(latencies)
    p99 = latencies[int(0.99 * (scrapes - 1))]
    record_property("scrapes", scrapes)
    record_property("scrape_latency_p50_s", round(statistics.median(latencies), 4))
    record_property("scrape_latency_p99_s", round(p99, 4))
    print(f"{scrapes} scrapes by {SCRAPERS} threads, median {statistics.median(latencies) * 1e3:.0f} ms, "
          f"p99 {p99 * 1e3:.0f} ms; span batches of {SPANS_PER_REQUEST} by status {flood_statuses}")
