"""The soak CI runs: `gpuphase run` on 8 simulated GPUs under 2,000 vLLM spans/s for two minutes.

The same code path as `python -m benchmarks.soak --duration 30m` (benchmarks/footprint.soak), cut
to a length CI can afford. It checks what a soak is for — the agent stays up, loses no span and its
memory stays flat — never how fast or how big: those figures live in docs/performance.md.
"""

from __future__ import annotations

import pytest

from benchmarks.footprint import LOAD_SPANS_PER_SECOND, soak
from tests.agentproc import Metrics

pytestmark = pytest.mark.e2e

SOAK_MINUTES = 2.0
SAMPLE_EVERY_SECONDS = 10.0
# Windows are held for phase.settle before they are counted and freed, so RSS grows until the
# first ones are: a 15 s settle (the default 60 s would not reach steady state within the soak)
# plus the spans' own length and the allocator's warm-up. After that memory must be flat: a leak of
# even 10 bytes per span (~200k spans left) would show as more than MAX_GROWTH.
SETTLE = "15s"
WARM_UP_SECONDS = 40.0
MAX_GROWTH_AFTER_WARM_UP_MIB = 3.0


@pytest.fixture(scope="module")
def result() -> dict:
    return soak(SOAK_MINUTES, LOAD_SPANS_PER_SECOND, SAMPLE_EVERY_SECONDS, extra_args=("--phase.settle", SETTLE))


def test_every_span_sent_is_received(result):
    sent = result["sent"]
    assert sent.failed_requests == 0 and sent.refused_requests == 0, sent
    # 2,000/s for the whole window, give or take the sender's start and pacing.
    assert sent.accepted_spans >= 0.9 * LOAD_SPANS_PER_SECOND * SOAK_MINUTES * 60, sent
    assert result["received"] == sent.accepted_spans


def test_memory_stays_flat_once_windows_are_counted_and_freed(result):
    # The absolute figure is a performance goal, measured by `python -m benchmarks` (docs/performance.md).
    rows = result["rows"]
    assert len(rows) >= SOAK_MINUTES * 60 / SAMPLE_EVERY_SECONDS - 1, rows
    after_warm_up = [rss for t, rss, _ in rows if t >= WARM_UP_SECONDS]
    assert after_warm_up[-1] - after_warm_up[0] <= MAX_GROWTH_AFTER_WARM_UP_MIB, rows


def test_agent_still_samples_every_gpu_and_accounts_phases(result):
    metrics = Metrics(result["metrics"])
    assert {s.labels["gpu"]: s.value for s in metrics["gpu_up"]} == {str(g): 1.0 for g in range(8)}
    # Sampling never stalled for long: at 1 Hz, at least half the ticks of the window happened.
    assert metrics.value("gpu_sampler_ticks_total") >= SOAK_MINUTES * 60 / 2
    # At 2,000 requests/s prefills and decodes always overlap, so the busy time is mostly "mixed".
    busy = sum(s.value for s in metrics.samples("gpu_phase_seconds_total") if s.labels["phase"] != "idle")
    assert busy > 0, "spans arrived for two minutes but no busy phase time was accounted"
    assert not metrics.samples("gpu_spans_rejected_total", reason="buffer_full")
