"""What one scrape sees: the latest snapshot plus the phase and span totals, read once.

The exporter asks its ViewSource for a View at the start of each scrape and renders only that,
so every collector of one scrape agrees, and nothing on the scrape path touches NVML. The agent's
own process figures (ProcessStats) are read from /proc/self by the ViewSource at that moment too;
a View built by hand (fixtures, golden files) has none unless it says so, so it stays reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

from gpuphase.model.snapshot import Snapshot


@dataclass(frozen=True)
class PhaseSeries:
    """Cumulative totals of one (GPU, service, phase). Activity integrals are None without GPM."""

    gpu: int
    uuid: str
    service: str
    phase: str
    seconds: float = 0.0
    tokens: float = 0.0
    energy_joules: float | None = None
    sm_active_seconds: float | None = None
    tensor_active_seconds: float | None = None
    dram_active_seconds: float | None = None


# The span decoders (agent/spans/decoders), the values of gpu_spans_received_total's decoder label:
# each has a series from the first scrape on, 0 until its first span, so rate() sees the first one.
SPAN_DECODERS: tuple[str, ...] = ("vllm", "sglang", "tgi", "generic")


@dataclass(frozen=True)
class SpanStats:
    received: Mapping[str, int] = field(default_factory=dict)  # by decoder (SPAN_DECODERS)
    rejected: Mapping[str, int] = field(default_factory=dict)  # by reason
    unmatched: Mapping[str, int] = field(default_factory=dict)  # by reason
    clipped: int = 0  # windows accepted only in part: they began in time already finalised


@dataclass(frozen=True)
class SamplerStats:
    ticks: int = 0
    overruns: int = 0
    last_tick_duration_seconds: float = 0.0


@dataclass(frozen=True)
class ListenerStats:
    """One HTTP listener (web, otlp_http): its open connections and what it refused, by reason."""

    open_connections: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessStats:
    """The agent's own process, as prometheus_client's ProcessCollector reads it from /proc/self.

    Each field is the process_* metric of the same name (process_cpu_seconds_total is cpu_seconds);
    None where it could not be read, and then left out of the scrape rather than reported as 0.
    """

    virtual_memory_bytes: float | None = None
    resident_memory_bytes: float | None = None
    start_time_seconds: float | None = None  # unix time
    cpu_seconds: float | None = None  # user + system
    open_fds: float | None = None
    max_fds: float | None = None  # the soft RLIMIT_NOFILE


@dataclass(frozen=True)
class View:
    snapshot: Snapshot | None
    backend: str = ""
    phases: tuple[PhaseSeries, ...] = ()
    # (gpu, uuid, service) -> unix time of the newest span window attributed there
    last_span: Mapping[tuple[int, str, str], float] = field(default_factory=dict)
    spans: SpanStats = field(default_factory=SpanStats)
    sampler: SamplerStats = field(default_factory=SamplerStats)
    listeners: Mapping[str, ListenerStats] = field(default_factory=dict)  # by listener name
    process: ProcessStats | None = None  # the agent's own process; None: not this process (a fixture)


class ViewSource(Protocol):
    def view(self) -> View: ...
