"""Phase of a GPU over time from a set of prefill/decode windows: the reference sweep.

Used by the demo for its ground truth and for the simulated counters. The phase accountant has
its own incremental implementation; keeping this one simple and separate means the end-to-end
test compares two independent computations rather than one with itself.
"""

from __future__ import annotations

from typing import Iterable

from agent.spans.windows import DECODE, PREFILL


def phase_durations(windows: Iterable[tuple[float, float, str]], start: float, end: float) -> dict[str, float]:
    """Seconds of prefill / decode / mixed / idle in [start, end] given (start, end, phase) windows."""
    events: list[tuple[float, int, str]] = []
    for w_start, w_end, phase in windows:
        lo, hi = max(w_start, start), min(w_end, end)
        if hi > lo:
            events.append((lo, +1, phase))
            events.append((hi, -1, phase))
    events.sort(key=lambda e: (e[0], e[1]))
    out = {"prefill": 0.0, "decode": 0.0, "mixed": 0.0, "idle": 0.0}
    active = {PREFILL: 0, DECODE: 0}
    cursor = start
    for time_point, delta, phase in events:
        if time_point > cursor:
            out[_phase_of(active)] += time_point - cursor
            cursor = time_point
        active[phase] += delta
    if end > cursor:
        out[_phase_of(active)] += end - cursor
    return out


def _phase_of(active: dict[str, int]) -> str:
    if active[PREFILL] and active[DECODE]:
        return "mixed"
    if active[PREFILL]:
        return "prefill"
    if active[DECODE]:
        return "decode"
    return "idle"
