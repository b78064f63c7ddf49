"""One GPU's ledger: the samples not yet final, the window stores it belongs to, and its totals."""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

from gpuphase.agent.phases.intervals import timeline
from gpuphase.agent.phases.store import WindowStore
from gpuphase.model.phase import IDLE, PHASES, GpuKey
from gpuphase.model.snapshot import GpuSample
from gpuphase.model.view import PhaseSeries

SM_ACTIVE = "gpu_sm_active_ratio"
TENSOR_ACTIVE = "gpu_tensor_active_ratio"
DRAM_ACTIVE = "gpu_dram_active_ratio"
ENERGY = "gpu_energy_joules_total"
POWER = "gpu_power_watts"


class Reading(NamedTuple):
    """The few numbers of one GpuSample the accountant needs."""

    ts: float
    sm: float | None
    tensor: float | None
    dram: float | None
    energy: float | None
    power: float | None

    @classmethod
    def of(cls, sample: GpuSample) -> "Reading":
        get = sample.values.get
        return cls(sample.timestamp, get(SM_ACTIVE), get(TENSOR_ACTIVE), get(DRAM_ACTIVE), get(ENERGY), get(POWER))


def interval_energy(prev: Reading, cur: Reading) -> float | None:
    """Joules spent in (prev, cur]: the energy counter's increase, else mean power x duration.

    A counter that went down was reset (driver reload): like Prometheus' increase(), count the
    new value as the energy since the reset.
    """
    if prev.energy is not None and cur.energy is not None:
        return cur.energy - prev.energy if cur.energy >= prev.energy else cur.energy
    powers = [p for p in (prev.power, cur.power) if p is not None]
    if powers:
        return sum(powers) / len(powers) * (cur.ts - prev.ts)
    return None


class Totals:
    """Running totals of one (GPU, service, phase); integrals stay 0 until the GPU reports them."""

    __slots__ = ("seconds", "tokens", "energy", "sm", "tensor", "dram")

    def __init__(self) -> None:
        self.seconds = self.tokens = self.energy = self.sm = self.tensor = self.dram = 0.0


QUANTITIES = ("energy", "sm", "tensor", "dram")


class GpuLedger:
    """One GPU's buffer (samples not yet final, the window stores it is a member of) and its totals."""

    def __init__(self, key: GpuKey, max_samples: int) -> None:
        self.key = key
        self.anchor: Reading | None = None  # the newest finalised sample: start of the next interval
        self.pending_samples: deque[Reading] = deque()
        self.max_samples = max_samples
        self.finalised_until = -math.inf
        self.stores: list[WindowStore] = []  # held windows placed on this GPU, by placement
        self.configured_services: tuple[str, ...] = ()
        # service -> start of its earliest window here: it owns idle time from then on
        self.learned_services: dict[str, float] = {}
        self.totals: dict[tuple[str, str], Totals] = {}
        self.reported = dict.fromkeys(QUANTITIES, False)  # which integrals this GPU ever had

    def held(self) -> int:
        return sum(store.size for store in self.stores)

    # --- services ------------------------------------------------------------------------------

    def learn(self, service: str, since: float) -> bool:
        """Tie a service to this GPU from `since` on; True when the service is new here.

        Only windows in time not yet finalised are accepted, so `since` can only move within
        open time: which service owns finalised idle time never depends on arrival order.
        """
        known = self.learned_services.get(service)
        if known is None or since < known:
            self.learned_services[service] = since
        return known is None

    def idle_owners(self, start: float, end: float) -> list[tuple[float, float, tuple[str, ...]]]:
        """Split idle time [start, end] by who owns it: configured services always, learned ones
        from their first window on. Stretches owned by nobody are unknown, not idle."""
        cuts = sorted({t for t in self.learned_services.values() if start < t < end})
        pieces = []
        for lo, hi in zip([start] + cuts, cuts + [end]):
            owners = tuple(dict.fromkeys(self.configured_services + tuple(
                s for s, since in self.learned_services.items() if since <= lo)))
            if owners:
                pieces.append((lo, hi, owners))
        return pieces

    def forget_service(self, service: str) -> bool:
        """Drop a service's tie and series here (its label was given to another); True if it had any."""
        self.learned_services.pop(service, None)
        gone = [key for key in self.totals if key[0] == service]
        for key in gone:
            del self.totals[key]
        return bool(gone)

    def ensure_series(self, service: str) -> bool:
        """Create the four phase totals of a service; True when they are new."""
        if (service, IDLE) in self.totals:
            return False
        for phase in PHASES:
            self.totals[(service, phase)] = Totals()
        return True

    # --- intake --------------------------------------------------------------------------------

    def add_reading(self, reading: Reading) -> None:
        newest = self.pending_samples[-1].ts if self.pending_samples else self.finalised_until
        if self.anchor is not None:
            newest = max(newest, self.anchor.ts)
        if not reading.ts > newest:  # repeated or out-of-order sample: the interval is already covered
            return
        if len(self.pending_samples) >= self.max_samples:
            # advance() is not being called. Dropping a reading that is not the start of the
            # stretch merges two intervals into one: coarser, but no wall time or energy is lost.
            del self.pending_samples[0 if self.anchor is not None else 1]
        self.pending_samples.append(reading)

    # --- finalisation --------------------------------------------------------------------------

    def finalise(self, cutoff: float, now: float, retention: float) -> bool:
        """Account every sample interval ending at or before `cutoff`; True if totals changed."""
        ready: list[Reading] = []
        while self.pending_samples and self.pending_samples[0].ts <= cutoff:
            ready.append(self.pending_samples.popleft())
        changed = False
        if ready:
            intervals = []
            prev = self.anchor
            for reading in ready:
                if prev is not None:
                    intervals.append((prev, reading))
                prev = reading
            self.anchor = prev
            self.finalised_until = max(self.finalised_until, prev.ts)
            if intervals:
                changed |= self._credit_intervals(intervals)
        elif not self.pending_samples and (self.anchor is None or self.anchor.ts < now - retention):
            # No readings at all, or none for longer than retention (GPU lost): that time is
            # unknown, not idle. Move the boundary on so held windows are counted and freed.
            self.anchor = None
            self.finalised_until = max(self.finalised_until, cutoff)
        changed |= self._count_ended_windows()
        return changed

    def _credit_intervals(self, intervals: list[tuple[Reading, Reading]]) -> bool:
        first, last = intervals[0][0].ts, intervals[-1][1].ts
        segments = timeline([i for store in self.stores for i in store.intervals(first, last)], first, last)
        j = 0
        for prev, cur in intervals:
            a, b = prev.ts, cur.ts
            energy = interval_energy(prev, cur)
            ratios = {"sm": cur.sm, "tensor": cur.tensor, "dram": cur.dram, "energy": energy}
            for name, value in ratios.items():
                if value is not None:
                    self.reported[name] = True
            while j < len(segments) and segments[j].end <= a:
                j += 1
            k = j
            while k < len(segments) and segments[k].start < b:
                segment = segments[k]
                lo, hi = max(segment.start, a), min(segment.end, b)
                if hi > lo and segment.services:
                    self._credit(segment.services, segment.phase, hi - lo, b - a, ratios)
                elif hi > lo:
                    for idle_lo, idle_hi, owners in self.idle_owners(lo, hi):
                        self._credit(owners, IDLE, idle_hi - idle_lo, b - a, ratios)
                k += 1
        return True

    def _credit(self, services: tuple[str, ...], phase: str, seconds: float, interval: float,
                per_interval: dict[str, float | None]) -> None:
        share = seconds / len(services)
        for service in services:
            self.ensure_series(service)
            totals = self.totals[(service, phase)]
            totals.seconds += share
            if per_interval["energy"] is not None:
                totals.energy += per_interval["energy"] * share / interval
            if per_interval["sm"] is not None:
                totals.sm += per_interval["sm"] * share
            if per_interval["tensor"] is not None:
                totals.tensor += per_interval["tensor"] * share
            if per_interval["dram"] is not None:
                totals.dram += per_interval["dram"] * share

    def _count_ended_windows(self) -> bool:
        """Count the tokens of the held windows that have ended in finalised time."""
        changed = False
        for store in self.stores:
            for lane, tokens in store.ended(self.key, self.finalised_until):
                self.ensure_series(lane.service)
                self.totals[(lane.service, lane.phase)].tokens += tokens
                changed = True
        return changed

    def series(self) -> list[PhaseSeries]:
        index, uuid = self.key
        out = []
        for service in sorted({service for service, _ in self.totals}):
            for phase in PHASES:
                t = self.totals[(service, phase)]
                out.append(PhaseSeries(
                    gpu=index, uuid=uuid, service=service, phase=phase, seconds=t.seconds, tokens=t.tokens,
                    energy_joules=t.energy if self.reported["energy"] else None,
                    sm_active_seconds=t.sm if self.reported["sm"] else None,
                    tensor_active_seconds=t.tensor if self.reported["tensor"] else None,
                    dram_active_seconds=t.dram if self.reported["dram"] else None,
                ))
        return out
