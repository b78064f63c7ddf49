"""What `top` shows, derived from a History as plain data: no I/O, no terminal.

- **state**: the phase that took most of the GPU's time between the last two readings in which
  its phase time advanced. `unknown` when the GPU has no phase series (no service is mapped to
  it: unknown is not idle), `n/a` while fewer than two readings exist. The agent finalises phase
  time only after its settle window (`--phase.settle`, 30s in the demo), so the state is that of
  the time just finalised, not of this very second.
- **shares**: each phase's part of the phase time finalised over the window (the last minute),
  from the change in gpu_phase_seconds_total.
- **energy per token**: the change in gpu_phase_energy_joules_total over the change in
  gpu_phase_tokens_total over the window, all phases together (idle energy included: it is paid
  for too).
- **services**: every GPU of a tensor-parallel group counts each request's tokens, so a service's
  tokens/s adds up its GPUs' token rates counting GPUs whose token counters are identical (one TP
  group) once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gpuphase.model.phase import IDLE, PHASES
from gpuphase.top.model import Gpu, History, PhaseKey, Process, Reading

UNKNOWN = "unknown"  # no phase series: the GPU is not tied to a service
NOT_YET = "n/a"  # phase series, but not two readings with phase time between them yet
DOWN = "down"  # gpu_up 0: lost, hung or off the bus


@dataclass(frozen=True)
class GpuRow:
    gpu: Gpu
    state: str
    shares: dict[str, float] | None  # phase -> share of the window's phase time; None: cannot tell yet
    energy_per_token: float | None  # joules per token over the window
    tokens_per_second: float | None
    services: tuple[str, ...]

    @property
    def activity(self) -> float | None:
        """SM activity (GPM), else NVML utilization: the sort key `activity`."""
        return self.gpu.sm if self.gpu.sm is not None else self.gpu.utilization


@dataclass(frozen=True)
class ServiceRow:
    service: str
    gpus: tuple[int, ...]
    shares: dict[str, float] | None
    tokens_per_second: float | None
    energy_per_token: float | None


@dataclass(frozen=True)
class Summary:
    time: float  # of the newest reading
    window: float  # seconds between the oldest reading of the window and the newest (0: one reading)
    gpus: tuple[GpuRow, ...]
    services: tuple[ServiceRow, ...]
    processes: tuple[Process, ...]  # largest memory first


def _none_last(value: float | None) -> tuple[bool, float]:
    return (value is None, -(value or 0.0))


SORTS: dict[str, Callable[[GpuRow], object]] = {
    "gpu": lambda row: row.gpu.index,
    "power": lambda row: _none_last(row.gpu.power),
    "memory": lambda row: _none_last(row.gpu.memory_used),
    "activity": lambda row: _none_last(row.activity),
    "energy/token": lambda row: _none_last(row.energy_per_token),
}
SORT_ORDER = tuple(SORTS)


def next_sort(current: str) -> str:
    return SORT_ORDER[(SORT_ORDER.index(current) + 1) % len(SORT_ORDER)]


def _delta(old: dict[PhaseKey, float], new: dict[PhaseKey, float], keep: Callable[[PhaseKey], bool]) -> float:
    """The increase of the selected counters from old to new; a series new since old counts from 0."""
    return sum(max(0.0, value - old.get(key, 0.0)) for key, value in new.items() if keep(key))


def _phase_deltas(old: Reading, new: Reading, keep: Callable[[PhaseKey], bool]) -> dict[str, float]:
    return {phase: _delta(old.seconds, new.seconds, lambda key, phase=phase: key[3] == phase and keep(key))
            for phase in PHASES}


def _shares(deltas: dict[str, float]) -> dict[str, float] | None:
    total = sum(deltas.values())
    return {phase: value / total for phase, value in deltas.items()} if total > 0 else None


def _state(readings: tuple[Reading, ...], keep: Callable[[PhaseKey], bool]) -> str:
    """The dominant phase of the newest pair of consecutive readings in which phase time advanced."""
    for old, new in zip(reversed(readings[:-1]), reversed(readings[1:])):
        deltas = _phase_deltas(old, new, keep)
        if sum(deltas.values()) > 0:
            # ties go to the earlier phase of PHASES; idle only when nothing else took time
            return max(PHASES, key=lambda phase: (deltas[phase], phase != IDLE))
    return NOT_YET


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarize(history: History) -> Summary | None:
    """The Summary of a history; None before the first reading."""
    readings = history.readings
    if not readings:
        return None
    new, base = readings[-1], readings[0]
    window = new.time - base.time
    rows = []
    for gpu in new.gpus:
        def on_gpu(key: PhaseKey, gpu: Gpu = gpu) -> bool:
            return key[0] == gpu.index and key[1] == gpu.uuid

        services = tuple(sorted({key[2] for key in new.seconds if on_gpu(key)}))
        if gpu.up == 0:
            state = DOWN
        elif not services:
            state = UNKNOWN
        else:
            state = _state(readings, on_gpu)
        # no phase time finalised over the window: no shares, and tokens and energy are not known yet either
        shares = _shares(_phase_deltas(base, new, on_gpu)) if services and window > 0 else None
        tokens = _delta(base.tokens, new.tokens, on_gpu)
        energy = _delta(base.energy, new.energy, on_gpu)
        rows.append(GpuRow(gpu, state, shares, _ratio(energy, tokens) if shares else None,
                           tokens / window if shares else None, services))
    processes = tuple(sorted(new.processes, key=lambda p: (-p.memory, p.gpu, p.pid)))
    return Summary(new.time, window, tuple(rows), _services(base, new, window), processes)


def _services(base: Reading, new: Reading, window: float) -> tuple[ServiceRow, ...]:
    out = []
    for service in sorted({key[2] for key in new.seconds}):
        gpus = sorted({(key[0], key[1]) for key in new.seconds if key[2] == service})
        if window <= 0:
            out.append(ServiceRow(service, tuple(index for index, _ in gpus), None, None, None))
            continue

        def of(key: PhaseKey, service: str = service) -> bool:
            return key[2] == service

        # one TP group = GPUs whose token counters of this service are identical; count it once
        groups: dict[tuple, tuple[int, str]] = {}
        for gpu in gpus:
            signature = tuple(new.tokens.get((*gpu, service, phase)) for phase in PHASES)
            groups.setdefault(signature, gpu)
        tokens = sum(_delta(base.tokens, new.tokens, lambda key, gpu=gpu: of(key) and key[:2] == gpu)
                     for gpu in groups.values())
        energy = _delta(base.energy, new.energy, of)
        shares = _shares(_phase_deltas(base, new, of))
        out.append(ServiceRow(service, tuple(index for index, _ in gpus), shares,
                              tokens / window if shares else None, _ratio(energy, tokens) if shares else None))
    return tuple(out)
