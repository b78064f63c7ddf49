"""PhaseWindow: the one thing every span decoder produces and the phase accountant consumes."""

from __future__ import annotations

from dataclasses import dataclass

PREFILL = "prefill"
DECODE = "decode"
WORK_PHASES = (PREFILL, DECODE)


@dataclass(frozen=True, slots=True)  # slots: the accountant holds many for phase.settle
class PhaseWindow:
    """A stretch of wall-clock time in which one request (or batch) was in prefill or decode.

    Times are unix seconds (float). `key` identifies the window for de-duplication: the same span
    delivered twice (sender retry) yields the same key and is counted once. The GPU is found later
    by the mapper from `service`, `gpu_ids` (explicit UUIDs/indices named by the sender) or `pid`
    (the sending process, matched against NVML's compute processes and their relatives).
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
