"""Phase of a GPU over time from a set of prefill/decode windows: the reference sweep.

Used by the demo for its ground truth and for the simulated counters. The phase accountant has
its own incremental implementation; keeping this one simple and separate means the end-to-end
test compares two independent computations rather than one with itself.
"""

from __future__ import annotations

from typing import Iterable

from gpuphase.model.phase import DECODE, PHASES, PREFILL, phase_of


def phase_durations(windows: Iterable[tuple[float, float, str]], start: float, end: float) -> dict[str, float]:
    """Seconds of prefill / decode / mixed / idle in [start, end] given (start, end, phase) windows."""
    events: list[tuple[float, int, str]] = []
    for w_start, w_end, phase in windows:
        lo, hi = max(w_start, start), min(w_end, end)
        if hi > lo:
            events.append((lo, +1, phase))
            events.append((hi, -1, phase))
    events.sort(key=lambda e: (e[0], e[1]))
    out = dict.fromkeys(PHASES, 0.0)
    active = {PREFILL: 0, DECODE: 0}
    cursor = start
    for time_point, delta, phase in events:
        if time_point > cursor:
            out[phase_of(active[PREFILL] > 0, active[DECODE] > 0)] += time_point - cursor
            cursor = time_point
        active[phase] += delta
    if end > cursor:
        out[phase_of(active[PREFILL] > 0, active[DECODE] > 0)] += end - cursor
    return out

