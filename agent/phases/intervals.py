"""Exact interval arithmetic: the union of a (service, phase)'s windows and the GPU's timeline."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from gpuphase.model.phase import DECODE, PREFILL, phase_of


class Interval(NamedTuple):
    """Time in which some window of `service` was in `phase`: the timeline's input."""

    start: float
    end: float
    phase: str
    service: str


@dataclass(frozen=True)
class Segment:
    """A stretch of time with one GPU phase and one set of active services (empty when idle)."""

    start: float
    end: float
    phase: str
    services: tuple[str, ...]


def timeline(intervals: Iterable[Interval], start: float, end: float) -> list[Segment]:
    """Cut [start, end] into contiguous segments of constant phase and constant active services.

    A sweep over the interval edges clipped to [start, end]. The result depends only on the set of
    intervals, never on their order, so out-of-order arrival cannot change the accounting; and
    only on their union per (service, phase), so the ledger can keep just that.
    """
    events: list[tuple[float, int, str, str]] = []
    for w_start, w_end, phase, service in intervals:
        lo, hi = max(w_start, start), min(w_end, end)
        if lo < hi:
            events.append((lo, 1, phase, service))
            events.append((hi, -1, phase, service))
    events.sort(key=lambda event: event[0])

    active_by_phase = {PREFILL: 0, DECODE: 0}
    active_by_service: Counter[str] = Counter()
    segments: list[Segment] = []

    def emit(lo: float, hi: float) -> None:
        phase = phase_of(active_by_phase[PREFILL] > 0, active_by_phase[DECODE] > 0)
        services = tuple(sorted(s for s, n in active_by_service.items() if n > 0))
        if segments and segments[-1].phase == phase and segments[-1].services == services:
            segments[-1] = Segment(segments[-1].start, hi, phase, services)
        else:
            segments.append(Segment(lo, hi, phase, services))

    cursor, i = start, 0
    while i < len(events):
        instant = events[i][0]
        if instant > cursor:
            emit(cursor, instant)
            cursor = instant
        while i < len(events) and events[i][0] == instant:
            _, delta, phase, service = events[i]
            active_by_phase[phase] += delta
            active_by_service[service] += delta
            i += 1
    if cursor < end:
        emit(cursor, end)
    return segments


class Lane:
    """The union of one (service, phase)'s held windows in one store: sorted, disjoint intervals.

    The timeline only asks, at each instant, whether some window of a service and phase is
    active; the union answers exactly that. Windows that touch or overlap merge, so continuous
    batching (hundreds of requests in flight) keeps this to a handful of intervals.
    """

    __slots__ = ("index", "service", "phase", "starts", "ends")

    def __init__(self, index: int, service: str, phase: str) -> None:
        self.index = index
        self.service = service
        self.phase = phase
        self.starts: list[float] = []
        self.ends: list[float] = []

    def add(self, start: float, end: float) -> None:
        starts, ends = self.starts, self.ends
        if starts and starts[-1] <= start <= ends[-1]:  # the usual case: it extends the newest one
            if end > ends[-1]:
                ends[-1] = end
            return
        i = bisect_left(ends, start)  # intervals before i end before `start`
        j = bisect_right(starts, end, i)  # intervals from j on start after `end`
        if i == j:
            starts.insert(i, start)
            ends.insert(i, end)
        else:  # [i, j) overlap or touch the new one: merge them into one
            merged_start, merged_end = min(start, starts[i]), max(end, ends[j - 1])
            starts[i:j] = (merged_start,)
            ends[i:j] = (merged_end,)

    def overlapping(self, lo: float, hi: float) -> Iterable[Interval]:
        i = bisect_right(self.ends, lo)
        j = bisect_left(self.starts, hi, i)
        return (Interval(s, e, self.phase, self.service) for s, e in zip(self.starts[i:j], self.ends[i:j]))

    def forget_until(self, until: float) -> None:
        """Drop the intervals that end at or before `until`: that time is final."""
        k = bisect_right(self.ends, until)
        if k:
            del self.starts[:k]
            del self.ends[:k]
