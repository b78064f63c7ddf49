"""One scrape of an agent's /metrics as a Reading, and the ring buffer of readings `top` keeps.

Only what `top` shows is kept: each GPU's gauges now, its processes, and the phase counters
(seconds, energy, tokens by gpu, service and phase) that shares and rates are computed from by
comparing two readings. Absent stays absent (None): a GPU without GPM has no SM ratio, not 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

from gpuphase.model.phase import PHASES

# (gpu index, uuid, service, phase): one phase series
PhaseKey = tuple[int, str, str, str]

_GAUGES = {
    "gpu_up": "up",
    "gpu_utilization_ratio": "utilization",
    "gpu_sm_active_ratio": "sm",
    "gpu_tensor_active_ratio": "tensor",
    "gpu_dram_active_ratio": "dram",
    "gpu_memory_used_bytes": "memory_used",
    "gpu_memory_total_bytes": "memory_total",
    "gpu_power_watts": "power",
    "gpu_power_limit_watts": "power_limit",
    "gpu_temperature_celsius": "temperature",
}
_PHASE_COUNTERS = {
    "gpu_phase_seconds_total": "seconds",
    "gpu_phase_energy_joules_total": "energy",
    "gpu_phase_tokens_total": "tokens",
}


class ParseError(ValueError):
    """The page is not Prometheus text exposition."""


@dataclass(frozen=True)
class Gpu:
    """One GPU's gauges at one scrape; None where the agent exports no series."""

    index: int
    uuid: str
    name: str = ""
    gpm: bool | None = None  # gpu_info's gpm_supported
    up: float | None = None
    utilization: float | None = None
    sm: float | None = None
    tensor: float | None = None
    dram: float | None = None
    memory_used: float | None = None
    memory_total: float | None = None
    power: float | None = None
    power_limit: float | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Process:
    gpu: int
    pid: str
    name: str
    memory: float
    pod: str = ""
    namespace: str = ""
    container: str = ""


@dataclass(frozen=True)
class Reading:
    """One scrape: `time` is when it was taken (time.monotonic() by default, any clock that does not jump)."""

    time: float
    gpus: tuple[Gpu, ...]
    processes: tuple[Process, ...] = ()
    seconds: dict[PhaseKey, float] = field(default_factory=dict)
    energy: dict[PhaseKey, float] = field(default_factory=dict)
    tokens: dict[PhaseKey, float] = field(default_factory=dict)

    def gpu(self, index: int) -> Gpu | None:
        return next((gpu for gpu in self.gpus if gpu.index == index), None)


def _index(labels: dict[str, str]) -> int | None:
    try:
        return int(labels["gpu"])
    except (KeyError, ValueError):
        return None  # not a whole-GPU series (no gpu label, or a MIG-style one)


def parse(text: str, at: float) -> Reading:
    """The Reading of one /metrics page taken at `at`. Raises ParseError on a page that is not exposition text."""
    gauges: dict[tuple[int, str], dict[str, object]] = {}
    processes: list[Process] = []
    counters: dict[str, dict[PhaseKey, float]] = {name: {} for name in _PHASE_COUNTERS.values()}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as err:  # the parser raises ValueError, IndexError, ... on garbage
        raise ParseError(f"not Prometheus text exposition: {err}") from None
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            index = _index(labels)
            if index is None:
                continue
            key = (index, labels.get("uuid", ""))
            name = sample.name
            if name == "gpu_info":
                fields = gauges.setdefault(key, {})
                fields["name"] = labels.get("name", "")
                fields["gpm"] = {"true": True, "false": False}.get(labels.get("gpm_supported", ""))
            elif name in _GAUGES:
                gauges.setdefault(key, {})[_GAUGES[name]] = sample.value
            elif name == "gpu_process_memory_used_bytes":
                processes.append(Process(index, labels.get("pid", ""), labels.get("process_name", ""), sample.value,
                                         labels.get("pod", ""), labels.get("namespace", ""),
                                         labels.get("container", "")))
            elif name in _PHASE_COUNTERS and labels.get("phase") in PHASES:
                counters[_PHASE_COUNTERS[name]][(*key, labels.get("service", ""), labels["phase"])] = sample.value
    gpus = tuple(Gpu(index, uuid, **fields)  # type: ignore[arg-type]
                 for (index, uuid), fields in sorted(gauges.items()))
    return Reading(at, gpus, tuple(processes), **counters)


def _decreased(old: dict[PhaseKey, float], new: dict[PhaseKey, float]) -> bool:
    return any(key in old and value < old[key] for key, value in new.items())


class History:
    """The readings of the last `window` seconds: a ring buffer whose oldest entry is the newest one
    taken at or before `window` ago (the base the shares and rates of the window are taken from).

    A counter that went down means the agent restarted: the older readings are dropped, as
    Prometheus' rate() treats a reset, so no share is computed across it.
    """

    def __init__(self, window: float = 60.0, max_readings: int = 4096):
        self.window = window
        self._readings: deque[Reading] = deque(maxlen=max_readings)

    def add(self, reading: Reading) -> None:
        if self._readings:
            newest = self._readings[-1]
            if any(_decreased(getattr(newest, name), getattr(reading, name)) for name in ("seconds", "energy",
                                                                                         "tokens")):
                self._readings.clear()
        self._readings.append(reading)
        horizon = reading.time - self.window
        while len(self._readings) > 2 and self._readings[1].time <= horizon:
            self._readings.popleft()

    def extend(self, readings: Iterable[Reading]) -> None:
        for reading in readings:
            self.add(reading)

    @property
    def readings(self) -> tuple[Reading, ...]:
        return tuple(self._readings)

    @property
    def newest(self) -> Reading | None:
        return self._readings[-1] if self._readings else None

    def __len__(self) -> int:
        return len(self._readings)
