"""A synthetic vLLM-like serving workload: the ground truth behind `gpuphase demo`.

Requests arrive (Poisson), wait for a batch slot (continuous batching, FCFS up to max_batch),
prefill at a token rate, then decode at a step time. Each planned request has exact prefill and
decode windows; those windows drive the simulated GPU counters (the GPU really "is" in that phase)
and, once the request finishes, leave as a vLLM V1 `llm_request` span through the real
OpenTelemetry SDK. So what the agent recovers can be checked against what happened.
"""

from __future__ import annotations

import bisect
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

from gpuphase.agent.backends.sim import IDLE, PHASE_ACTIVITY, Activity
from gpuphase.demo.truth import phase_durations
from gpuphase.model.phase import DECODE, PREFILL


@dataclass(frozen=True)
class ServiceLoad:
    """One model server on a tensor-parallel group of GPUs."""

    service: str
    gpus: tuple[int, ...]
    arrival_rate: float = 0.0  # requests per second; 0 = allocated but no traffic
    prompt_tokens: tuple[float, float] = (1500.0, 600.0)  # mean, standard deviation
    output_tokens: tuple[float, float] = (250.0, 120.0)
    prefill_tokens_per_second: float = 6650.0  # Llama2-70B TP2 on H100: 2048 tokens ~ 308 ms
    decode_step_seconds: float = 0.04  # ~37-52 ms per step for 70B
    max_batch: int = 32
    memory_fraction: float = 0.9  # share of each GPU's VRAM the server holds (weights + KV cache)
    activity: dict[str, Activity] = field(default_factory=lambda: dict(PHASE_ACTIVITY))
    # Scripted requests instead of Poisson arrivals: (offset in cycle, prefill s, decode s), cycle length.
    script: tuple[tuple[float, float, float], ...] = ()
    script_cycle: float = 0.0
    # Traffic that rises and falls: (seconds, requests per second) segments, repeated; replaces
    # arrival_rate (the scaling signals' demo).
    rate_cycle: tuple[tuple[float, float], ...] = ()
    # Who the simulated server's GPU process is (gpu_process_* labels): its name (what
    # /proc/<pid>/comm would hold; default "vllm-<service>", cut to comm's 15 bytes) and, when the
    # scenario models a Kubernetes node, the pod, namespace and container that hold its GPUs.
    process_name: str = ""
    pod: str = ""
    namespace: str = ""
    container: str = ""

    @property
    def comm(self) -> str:
        return (self.process_name or f"vllm-{self.service}")[:15]

    @property
    def has_traffic(self) -> bool:
        return self.arrival_rate > 0 or any(rate > 0 for _, rate in self.rate_cycle)

    def rate_segment(self, elapsed: float) -> tuple[float, float]:
        """(requests per second, seconds until the rate changes) `elapsed` seconds into the run."""
        if not self.rate_cycle:
            return self.arrival_rate, float("inf")
        cycle = sum(seconds for seconds, _ in self.rate_cycle)
        offset = elapsed % cycle
        for seconds, rate in self.rate_cycle:
            if offset < seconds:
                return rate, seconds - offset
            offset -= seconds
        return self.rate_cycle[-1][1], 1e-9  # float rounding at the cycle's end


@dataclass(frozen=True)
class PlannedRequest:
    request_id: str
    arrival: float
    prefill_start: float
    first_token: float
    end: float
    prompt_tokens: int
    output_tokens: int

    @property
    def windows(self) -> tuple[tuple[float, float, str], ...]:
        return ((self.prefill_start, self.first_token, PREFILL), (self.first_token, self.end, DECODE))


class ServiceTimeline:
    """Plans one service's requests ahead of the clock and answers activity queries for its GPUs."""

    def __init__(self, load: ServiceLoad, rng: random.Random, start: float, keep_history: bool):
        self.load = load
        self._rng = rng
        self._lock = threading.Lock()
        self._windows: list[tuple[float, float, str]] = []  # sorted by start
        self._starts: list[float] = []
        self._history: list[tuple[float, float, str]] | None = [] if keep_history else None
        self._slot_free_at: list[float] = []  # end times of running requests, kept sorted
        self._start = start
        self._next_arrival = self._after(start)
        self._cycle_start = start
        self._counter = 0

    def plan_until(self, horizon: float) -> list[PlannedRequest]:
        """Plan every request arriving before `horizon`; returns the new ones."""
        planned = []
        if self.load.script:
            while self._cycle_start <= horizon:  # whole cycles, so a cycle's windows arrive together
                for offset, prefill, decode in self.load.script:
                    arrival = self._cycle_start + offset
                    planned.append(self._make(arrival, arrival, prefill, decode,
                                              int(prefill * self.load.prefill_tokens_per_second),
                                              max(1, int(decode / self.load.decode_step_seconds))))
                self._cycle_start += self.load.script_cycle
        elif self.load.has_traffic:
            while self._next_arrival < horizon:
                planned.append(self._plan_poisson(self._next_arrival))
                self._next_arrival = self._after(self._next_arrival)
        with self._lock:
            for request in planned:
                for window in request.windows:
                    index = bisect.bisect(self._starts, window[0])
                    self._starts.insert(index, window[0])
                    self._windows.insert(index, window)
                    if self._history is not None:
                        self._history.append(window)
        return planned

    def _after(self, t: float) -> float:
        """The next Poisson arrival after t at the rate of the moment; memoryless, so a draw that
        would cross a rate change restarts from the change at the new rate."""
        while True:
            rate, left = self.load.rate_segment(t - self._start)
            gap = self._rng.expovariate(rate) if rate > 0 else float("inf")
            if gap < left:
                return t + gap
            if left == float("inf"):
                return float("inf")
            t += left

    def _plan_poisson(self, arrival: float) -> PlannedRequest:
        load = self.load
        prompt = max(8, int(self._rng.gauss(*load.prompt_tokens)))
        output = max(1, int(self._rng.gauss(*load.output_tokens)))
        # Continuous batching: wait for a free slot (FCFS) when max_batch requests are running.
        self._slot_free_at = [t for t in self._slot_free_at if t > arrival]
        start = arrival
        if len(self._slot_free_at) >= load.max_batch:
            start = self._slot_free_at[len(self._slot_free_at) - load.max_batch]
        request = self._make(arrival, start, prompt / load.prefill_tokens_per_second,
                             output * load.decode_step_seconds, prompt, output)
        bisect.insort(self._slot_free_at, request.end)
        return request

    def _make(self, arrival, start, prefill_seconds, decode_seconds, prompt, output) -> PlannedRequest:
        self._counter += 1
        first_token = start + prefill_seconds
        return PlannedRequest(f"{self.load.service}-{self._counter}", arrival, start, first_token,
                              first_token + decode_seconds, prompt, output)

    def activity(self, t0: float, t1: float) -> Activity:
        """Time-weighted average activity of this service's GPUs over [t0, t1]."""
        if t1 <= t0:
            return IDLE
        with self._lock:
            # Windows are short next to the look-back; anything starting 600 s before t0 is over.
            lo = bisect.bisect_left(self._starts, t0 - 600.0)
            hi = bisect.bisect_right(self._starts, t1)
            relevant = self._windows[lo:hi]
        shares = phase_durations(relevant, t0, t1)
        total = IDLE
        for phase, seconds in shares.items():
            if seconds > 0:
                total = total.scaled_sum(self.load.activity.get(phase, IDLE), seconds / (t1 - t0))
        return total

    def prune(self, before: float) -> None:
        """Forget windows that ended before `before` (they can no longer be queried)."""
        with self._lock:
            keep = [i for i, w in enumerate(self._windows) if w[1] >= before]
            self._windows = [self._windows[i] for i in keep]
            self._starts = [self._starts[i] for i in keep]

    def history(self) -> list[tuple[float, float, str]]:
        with self._lock:
            return list(self._history or [])


SpanEmitter = Callable[[ServiceLoad, PlannedRequest], None]
