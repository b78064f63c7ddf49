"""The soak CI runs: `gpuphase run` on 8 simulated GPUs under 2,000 vLLM spans/s for two minutes.

The same code path as `python -m benchmarks.soak --duration 30m` (benchmarks/footprint.soak), cut
to a length CI can afford. It checks what a soak is for — the agent stays up, loses no span and its
memory stays flat — never how fast anything was: durations live in docs/performance.md.
"""

from __future__ import annotations

import pytest

from benchmarks.footprint import LOAD_SPANS_PER_SECOND, RSS_GOAL_MIB, soak
from tests.agentproc import Metrics

pytestmark = pytest.mark.e2e

SOAK_MINUTES = 2.0
SAMPLE_EVERY_SECONDS = 10.0
# RSS may still grow while the first windows fill phase.settle and the allocator warms up; after
# that a leak of even 10 bytes per span (240k spans) would show as more than this.
WARM_UP_SECONDS = 30.0
MAX_GROWTH_AFTER_WARM_UP_MIB = 3.0


@pytest.fixture(scope="module")
def result() -> dict:
    return soak(SOAK_MINUTES, LOAD_SPANS_PER_SECOND, SAMPLE_EVERY_SECONDS)


def test_every_span_sent_is_received(result):
    sent = result["sent"]
    assert sent.failed_requests == 0 and sent.refused_requests == 0, sent
    # 2,000/s for the whole window, give or take the sender's start and pacing.
    assert sent.accepted_spans >= 0.9 * LOAD_SPANS_PER_SECOND * SOAK_MINUTES * 60, sent
    assert result["received"] == sent.accepted_spans


def test_memory_stays_flat_and_within_the_goal(result):
    rows = result["rows"]
    assert len(rows) >= SOAK_MINUTES * 60 / SAMPLE_EVERY_SECONDS - 1, rows
    assert max(rss for _, rss, _ in rows) <= RSS_GOAL_MIB, rows
    after_warm_up = [rss for t, rss, _ in rows if t >= WARM_UP_SECONDS]
    assert after_warm_up[-1] - after_warm_up[0] <= MAX_GROWTH_AFTER_WARM_UP_MIB, rows


def test_agent_still_samples_every_gpu_and_accounts_phases(result):
    metrics = Metrics(result["metrics"])
    assert {s.labels["gpu"]: s.value for s in metrics["gpu_up"]} == {str(g): 1.0 for g in range(8)}
    # Sampling never stalled for long: at 1 Hz, at least half the ticks of the window happened.
    assert metrics.value("gpu_sampler_ticks_total") >= SOAK_MINUTES * 60 / 2
    decode_seconds = sum(s.value for s in metrics.samples("gpu_phase_seconds_total", phase="decode"))
    assert decode_seconds > 0, "spans arrived for two minutes but no decode time was accounted"
