"""`gpuphase demo`: the agent on simulated GPUs with a synthetic LLM-serving workload.

The workload (workload.py) plans requests, drives the simulated counters from the same
windows, and sends vLLM V1-shaped `llm_request` spans through the real OpenTelemetry SDK
(BatchSpanProcessor, whose 5 s default delay is vLLM's too) to the agent's own OTLP receiver.
`--demo.truth-file` writes what really happened so tests and curious users can compare.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import replace

from gpuphase.agent.app import Agent
from gpuphase.agent.backends.sim import SimBackend
from gpuphase.agent.config import Config
from gpuphase.agent.processes import ProcessIdentity
from gpuphase.demo.scenarios import DEMO_SETTLE, SCENARIOS, Scenario
from gpuphase.demo.truth import phase_durations
from gpuphase.demo.workload import PlannedRequest, ServiceLoad, ServiceTimeline
from gpuphase.model.snapshot import ProcessReading, ProcessSample

log = logging.getLogger(__name__)

# Linux never hands out a PID at or above PID_MAX_LIMIT (2**22 on 64-bit; kernel/pid_max cannot be
# set higher), so the simulated servers' PIDs (above it) can be no real process's: neither the
# demo's own nor any other that /proc could name. The span decoders ignore such a PID as no PID at
# all, so the demo's spans reach their GPUs through the scenario's phase.map (demo_config), never
# through the pid path, which could only look real processes up.
FAKE_PID_BASE = 1 << 22


def demo_processes(scenario: Scenario) -> dict[str, tuple[int, ProcessIdentity]]:
    """Per service: the PID and the labels of its simulated GPU process (one process holding all
    of the service's GPUs), as the agent would read them from /proc and the kubelet."""
    return {load.service: (FAKE_PID_BASE + 1 + n,
                           ProcessIdentity(process_name=load.comm, container=load.container, pod=load.pod,
                                           namespace=load.namespace))
            for n, load in enumerate(scenario.loads)}


def demo_process_labeller(processes: dict[int, ProcessIdentity], cap: int):
    """The demo's process table in place of /proc and the kubelet: the simulated servers'
    processes exist nowhere else, so /proc would name none of them."""

    def label(identity, readings):  # as ProcessResolver.resolve: largest memory first, capped
        kept = sorted(readings, key=lambda r: (r.memory_used_bytes is None, -(r.memory_used_bytes or 0), r.pid))
        return tuple(_sample(reading, processes.get(reading.pid, ProcessIdentity())) for reading in kept[:cap])

    return label


def _sample(reading: ProcessReading, who: ProcessIdentity) -> ProcessSample:
    return ProcessSample(pid=reading.pid, process_name=who.process_name, container=who.container, pod=who.pod,
                         namespace=who.namespace, memory_used_bytes=reading.memory_used_bytes,
                         sm_active_ratio=reading.sm_active_ratio)


class Workload:
    """Plans each service ahead of the clock, feeds the simulator, and emits spans as requests end."""

    LOOKAHEAD = 1.0  # plan this far ahead so the simulator always knows the current phase

    def __init__(self, scenario: Scenario, backend: SimBackend, emit, seed: int = 0, keep_history: bool = True):
        self.scenario = scenario
        self.started = time.time()
        rng = random.Random(seed)
        self.timelines = [ServiceTimeline(load, random.Random(rng.getrandbits(64)), self.started, keep_history)
                          for load in scenario.loads]
        self._emit = emit
        self._pending: list[tuple[float, int, ServiceLoad, PlannedRequest]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-workload", daemon=True)
        self.processes = demo_processes(scenario)
        for timeline in self.timelines:
            load = timeline.load
            pid = self.processes[load.service][0]
            for gpu in load.gpus:
                backend.set_source(gpu, timeline.activity)
                total = backend.gpus[gpu].profile.memory_total_bytes
                fraction = (scenario.memory_fraction or {}).get(gpu, load.memory_fraction)
                # The service's simulated GPU process holds its share of VRAM on every GPU it serves.
                backend.set_processes(gpu, (ProcessReading(pid=pid, memory_used_bytes=fraction * total - 512 * 2**20),))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for timeline in self.timelines:
                for request in timeline.plan_until(now + self.LOOKAHEAD):
                    self._seq += 1
                    heapq.heappush(self._pending, (request.end, self._seq, timeline.load, request))
                timeline.prune(now - 900.0)
            while self._pending and self._pending[0][0] <= now:
                _, _, load, request = heapq.heappop(self._pending)
                try:
                    self._emit(load, request)
                except Exception:  # a broken exporter must not stop the simulated GPUs
                    log.exception("emitting a demo span failed")
            next_due = self._pending[0][0] if self._pending else now + 0.1
            self._stop.wait(min(max(next_due - now, 0.005), 0.1))

    def truth(self, until: float | None = None) -> dict:
        """Per GPU: its service, the phase windows so far and phase seconds since the start."""
        until = until if until is not None else time.time()
        gpus = {}
        for timeline in self.timelines:
            history = [w for w in timeline.history() if w[0] < until]
            seconds = phase_durations(history, self.started, until)
            activity = {phase: {"sm_active": a.sm_active, "tensor_active": a.tensor_active,
                                "dram_active": a.dram_active}
                        for phase, a in timeline.load.activity.items()}
            for gpu in timeline.load.gpus:
                gpus[str(gpu)] = {"service": timeline.load.service, "phase_seconds": seconds, "activity": activity,
                                  "windows": history}
        return {"started": self.started, "until": until, "gpus": gpus}


class OtlpSpanEmitter:
    """Sends each finished request as a vLLM V1 `llm_request` span through the OpenTelemetry SDK."""

    def __init__(self, grpc_address: str, http_address: str, pids: dict[str, int] | None = None):
        """pids: the `vllm.process_id` each service's spans carry (default: this process's)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._providers = {}
        self._tracers = {}
        pids = pids or {}
        self._make_provider = lambda service: TracerProvider(
            resource=Resource.create({"service.name": service, "vllm.process_id": pids.get(service, os.getpid())}))
        self._processor = lambda: BatchSpanProcessor(self._exporter(grpc_address, http_address))

    @staticmethod
    def _exporter(grpc_address: str, http_address: str):
        if grpc_address:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=f"http://{_dialable(grpc_address)}", insecure=True)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=f"http://{_dialable(http_address)}/v1/traces")

    def __call__(self, load: ServiceLoad, request: PlannedRequest) -> None:
        from opentelemetry.trace import SpanKind

        tracer = self._tracers.get(load.service)
        if tracer is None:
            provider = self._make_provider(load.service)
            provider.add_span_processor(self._processor())
            self._providers[load.service] = provider
            tracer = self._tracers[load.service] = provider.get_tracer("vllm.llm_engine")
        prefill = request.first_token - request.prefill_start
        decode = request.end - request.first_token
        span = tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=_ns(request.arrival), attributes={
            "gen_ai.request.id": request.request_id,
            "gen_ai.response.model": load.service,
            "gen_ai.usage.prompt_tokens": request.prompt_tokens,
            "gen_ai.usage.completion_tokens": request.output_tokens,
            "gen_ai.latency.time_in_queue": request.prefill_start - request.arrival,
            "gen_ai.latency.time_to_first_token": request.first_token - request.arrival,
            "gen_ai.latency.e2e": request.end - request.arrival,
            "gen_ai.latency.time_in_model_prefill": prefill,
            "gen_ai.latency.time_in_model_decode": decode,
            "gen_ai.latency.time_in_model_inference": prefill + decode,
        })
        span.end(end_time=_ns(request.end))

    def shutdown(self) -> None:
        for provider in self._providers.values():
            provider.shutdown()


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _dialable(address: str) -> str:
    """A listen address as a client dials it (':4317' and '0.0.0.0' mean this host)."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def demo_config(config: Config, scenario: Scenario) -> Config:
    """The scenario decides the GPUs and, unless the user mapped services, the phase map."""
    phase_map = config.phase_map or tuple((load.service, tuple(str(g) for g in load.gpus)) for load in scenario.loads)
    # The demo's requests last under 30 s; a shorter settle shows phases sooner than the default.
    settle = DEMO_SETTLE if config.phase_settle == Config().phase_settle else config.phase_settle
    return replace(config, backend="sim", sim_gpus=scenario.gpus, phase_map=phase_map, phase_settle=settle)


def run_demo(config: Config, demo_scenario: str, demo_duration: float | None, demo_truth_file: str | None) -> int:
    from gpuphase.agent.app import handle_signals
    from gpuphase.agent.logs import setup_logging

    setup_logging(config.log_format, config.log_level)
    scenario = SCENARIOS[demo_scenario]
    config = demo_config(config, scenario)
    if not (config.otlp_grpc_listen_address or config.otlp_http_listen_address):
        log.error("the demo sends spans to the agent's own OTLP receiver: enable one of them")
        return 2
    backend = SimBackend(scenario.gpus, config.sim_profile, config.sim_seed)
    processes = demo_processes(scenario)
    table = {pid: who for pid, who in processes.values()}
    agent = Agent(config, backend=backend, process_labeller=demo_process_labeller(table, config.process_max_series))
    handle_signals(agent)
    try:
        agent.start()
    except (OSError, ValueError) as err:  # as `gpuphase run`: address in use, bad web config, ...
        print(f"gpuphase: cannot start: {err}", file=sys.stderr)
        if "cannot listen" in str(err):
            print("gpuphase: another agent or demo may be running; pick free ports with --web.listen-address, "
                  "--otlp.grpc-listen-address and --otlp.http-listen-address (with "
                  "scripts/run-agent.sh or scripts/demo-stack.sh: AGENT_PORT, OTLP_GRPC_PORT, OTLP_HTTP_PORT)",
                  file=sys.stderr)
        agent.stop()
        return 1
    # Each service's spans carry its simulated server's PID (vllm.process_id), as vLLM's do.
    emitter = OtlpSpanEmitter(agent.otlp_grpc_address, agent.otlp_http_address,
                              {service: pid for service, (pid, _) in processes.items()})
    workload = Workload(scenario, backend, emitter, seed=config.sim_seed, keep_history=demo_truth_file is not None)
    workload.start()
    print(f"gpuphase demo: scenario {demo_scenario!r}: {scenario.description}", flush=True)
    print(f"  metrics:  {agent.metrics_url}", flush=True)
    print(f"  spans:    OTLP gRPC {agent.otlp_grpc_address or 'off'}, HTTP {agent.otlp_http_address or 'off'}",
          flush=True)
    print(f"  phases appear after the settle window ({config.phase_settle:g}s); Ctrl-C to stop", flush=True)
    deadline = time.monotonic() + demo_duration if demo_duration else None

    def write_truth() -> None:
        if demo_truth_file:
            tmp = demo_truth_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(workload.truth(), handle)
            os.replace(tmp, demo_truth_file)

    try:
        while not agent.wait_stopped(1.0):
            write_truth()
            if deadline and time.monotonic() >= deadline:
                break
    finally:
        log.info("stopping")
        write_truth()
        workload.stop()
        emitter.shutdown()
        agent.stop()
    return 0
