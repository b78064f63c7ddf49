"""The phase vocabulary and PhaseWindow: what every span decoder produces and the accountant consumes.

A GPU's phase at an instant follows from the windows active on it then: prefill (only prefill
windows), decode (only decode), mixed (both) or idle (neither; queued requests do not count as
work). Time on a GPU no service is tied to is unknown, not idle, and gets no phase at all.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

PREFILL = "prefill"
DECODE = "decode"
MIXED = "mixed"
IDLE = "idle"
WORK_PHASES = (PREFILL, DECODE)  # the phases a window can be in
PHASES = (PREFILL, DECODE, MIXED, IDLE)  # the phases a GPU's time is split into, in export order

GpuKey = tuple[int, str]  # (index, uuid): how phase code names a GPU


def phase_of(prefill_active: bool, decode_active: bool) -> str:
    """A GPU's phase from whether some prefill and some decode window is active on it."""
    if prefill_active and decode_active:
        return MIXED
    if prefill_active:
        return PREFILL
    if decode_active:
        return DECODE
    return IDLE


class PhaseWindow(NamedTuple):
    """A stretch of wall-clock time in which one request (or batch) was in prefill or decode.

    Times are unix seconds (float). `key` identifies the window for de-duplication: the same span
    delivered twice (sender retry) yields the same key and is counted once. The GPU is found later
    by the mapper from `service`, `gpu_ids` (explicit UUIDs/indices named by the sender) or `pid`
    (the sending process, matched against NVML's compute processes and their relatives).

    A NamedTuple rather than a frozen dataclass: as immutable, and much cheaper to build on the
    decoders' hot path (docs/design-figures.md).
    """

    phase: str  # PREFILL or DECODE
    start: float
    end: float
    service: str
    decoder: str  # vllm, sglang, tgi, generic
    key: bytes  # trace_id + span_id + phase (bytes), unique per window
    tokens: int = 0  # prompt tokens for prefill windows, output tokens for decode windows
    pid: int | None = None
    gpu_ids: tuple[str, ...] = ()  # GPU UUIDs or indices named by the sender

    @property
    def duration(self) -> float:
        return self.end - self.start


# new_window((phase, start, end, service, decoder, key, tokens, pid, gpu_ids)): all nine fields in
# order, without the generated constructor's argument handling. For the decoders' hot path;
# decoders.common.make_window checks the fields.
new_window = partial(tuple.__new__, PhaseWindow)
