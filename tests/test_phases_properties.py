"""Properties of the PhaseAccountant over random timelines (hypothesis).

(a) the phase seconds of a mapped GPU sum to the finalised wall time;
(b) no counter ever goes down, and no series disappears, across successive advance() calls;
(c) the result does not depend on the order or batching in which windows arrive;
(d) the phase seconds equal those of gpuphase/demo/truth.py's reference sweep over the raw windows,
    although the accountant keeps only their union per (service, phase).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuphase.agent.phases import PhaseAccountant
from gpuphase.agent.phases.intervals import Lane
from gpuphase.demo.truth import phase_durations
from gpuphase.model.view import PhaseSeries
from tests.phase_helpers import GPU0, GPU1, KEY0, KEY1, decode, prefill, sample

SETTLE = 5.0
FIELDS = ("seconds", "tokens", "energy_joules", "sm_active_seconds", "tensor_active_seconds",
          "dram_active_seconds")
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

timestamps = st.lists(st.floats(0.0, 60.0).map(lambda t: round(t, 3)), min_size=2, max_size=25, unique=True).map(sorted)


@st.composite
def windows(draw):
    out = []
    for i in range(draw(st.integers(0, 25))):
        start = round(draw(st.floats(0.0, 60.0)), 3)
        length = round(draw(st.floats(0.0, 10.0)), 3)
        make = draw(st.sampled_from([prefill, decode]))
        out.append(make(start, start + length, service=draw(st.sampled_from(["a", "b"])),
                        tokens=draw(st.integers(0, 500)), key=b"k%d" % i))
    return out


def readings(times, draw_values, identity=GPU0):
    """Samples at `times` with increasing energy and random GPM ratios."""
    energy, out = 0.0, []
    for ts, (sm, watts) in zip(times, draw_values):
        energy += watts
        out.append(sample(ts, identity, sm=sm, tensor=sm / 2, dram=1 - sm, energy=energy))
    return out


gpu_values = st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 700.0)), min_size=25, max_size=25)


def mapped_accountant() -> PhaseAccountant:
    acc = PhaseAccountant(settle=SETTLE, retention=300.0, max_services=4)
    acc.set_mapping(KEY0, ["a"])
    return acc


def as_table(acc: PhaseAccountant) -> dict:
    return {(s.gpu, s.uuid, s.service, s.phase): s for s in acc.series()}


@PROPERTY_SETTINGS
@given(times=timestamps, values=gpu_values, spans=windows(), nows=st.lists(st.floats(0.0, 80.0), max_size=8))
def test_phase_seconds_sum_to_finalised_wall_time(times, values, spans, nows):
    acc = mapped_accountant()
    for reading in readings(times, values):
        acc.add_sample(reading)
    acc.add_windows(KEY0, spans)
    reached = float("-inf")
    for now in nows + [times[-1] + SETTLE]:
        reached = max(reached, now)
        acc.advance(now)
        final = [t for t in times if t <= reached - SETTLE]
        wall = final[-1] - final[0] if final else 0.0
        assert sum(s.seconds for s in acc.series()) == pytest.approx(wall, abs=1e-6)


@PROPERTY_SETTINGS
@given(times=timestamps, values=gpu_values, spans=windows(), steps=st.lists(st.floats(0.0, 4.0), min_size=1, max_size=20))
def test_counters_never_decrease(times, values, spans, steps):
    acc = mapped_accountant()
    for reading in readings(times, values):
        acc.add_sample(reading)
    now, before = 0.0, {}
    for i, step in enumerate(steps):
        acc.add_windows(KEY0, spans[i::len(steps)])  # some windows arrive late, some too late
        now += step
        acc.advance(now)
        after = as_table(acc)
        assert before.keys() <= after.keys()
        for key, old in before.items():
            for name in FIELDS:
                old_value, new_value = getattr(old, name), getattr(after[key], name)
                assert old_value is None or new_value >= old_value, (key, name)
        before = after


@PROPERTY_SETTINGS
@given(times=timestamps, values=gpu_values, spans=windows(), data=st.data())
def test_result_does_not_depend_on_arrival_order(times, values, spans, data):
    samples = readings(times, values)
    in_order = mapped_accountant()
    for reading in samples:
        in_order.add_sample(reading)
    in_order.add_windows(KEY0, spans)
    in_order.advance(100.0)

    shuffled = data.draw(st.permutations(spans))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(spans)), max_size=4)))
    batches = [shuffled[i:j] for i, j in zip([0] + cuts, cuts + [len(spans)])]
    earliest = min((w.start for w in spans), default=0.0)
    other = mapped_accountant()
    for reading in samples:
        other.add_sample(reading)
    for batch in batches:
        other.add_windows(KEY0, batch)
        other.advance(earliest + SETTLE - 0.001)  # finalises only time before every window: nothing refused
    other.advance(100.0)

    assert other.rejected() == in_order.rejected() == {}
    expected, got = as_table(in_order), as_table(other)
    assert got.keys() == expected.keys()
    for key in expected:
        for name in FIELDS:
            assert getattr(got[key], name) == pytest.approx(getattr(expected[key], name), abs=1e-9), (key, name)


@PROPERTY_SETTINGS
@given(times=timestamps, spans=windows(), data=st.data())
def test_phase_seconds_equal_the_reference_sweep_over_the_raw_windows(times, spans, data):
    acc = mapped_accountant()
    for reading in readings(times, [(0.5, 100.0)] * len(times)):
        acc.add_sample(reading)
    acc.add_windows(KEY0, data.draw(st.permutations(spans)))
    acc.advance(100.0)
    expected = phase_durations([(w.start, w.end, w.phase) for w in spans], times[0], times[-1])
    got: dict[str, float] = {}
    for series in acc.series():
        got[series.phase] = got.get(series.phase, 0.0) + series.seconds
    for phase, seconds in expected.items():
        assert got[phase] == pytest.approx(seconds, abs=1e-6), phase


@PROPERTY_SETTINGS
@given(times=timestamps, lag=st.floats(0.0, 0.5), spans=windows(),
       nows=st.lists(st.floats(0.0, 80.0), min_size=1, max_size=6))
def test_a_group_placement_counts_on_each_gpu_as_placing_on_each_alone(times, lag, spans, nows):
    """One store shared by a tensor-parallel group gives every GPU what it would have alone,
    with the GPUs read at different instants (the sampler reads them one after another)."""
    values = [(0.5, 300.0)] * len(times)
    shared, alone = mapped_accountant(), mapped_accountant()
    for acc in (shared, alone):
        acc.set_mapping(KEY1, ["a"])
        for reading in readings(times, values) + readings([t + lag for t in times], values, GPU1):
            acc.add_sample(reading)
    shared.place((KEY0, KEY1), spans)
    alone.add_windows(KEY0, spans)
    alone.add_windows(KEY1, spans)
    for now in sorted(nows) + [100.0]:
        shared.advance(now)
        alone.advance(now)
        expected, got = as_table(alone), as_table(shared)
        assert got.keys() == expected.keys()
        for key in expected:
            for name in FIELDS:
                assert getattr(got[key], name) == pytest.approx(getattr(expected[key], name), abs=1e-9), (key, name)
    assert shared.rejected() == alone.rejected()  # both count a refusal once per GPU


@PROPERTY_SETTINGS
@given(intervals=st.lists(st.tuples(st.integers(0, 100), st.integers(1, 20)), max_size=40))
def test_a_lane_holds_exactly_the_union_of_its_intervals(intervals):
    # (The ledger never adds an empty interval: a zero-length window has tokens but no time.)
    lane = Lane(0, "s", "decode")
    covered: set[int] = set()  # unit cells [t, t+1) covered, for a brute-force union
    for start, length in intervals:
        lane.add(float(start), float(start + length))
        covered.update(range(start, start + length))
    starts, ends = lane.starts, lane.ends
    assert all(e > s for s, e in zip(starts, ends))
    assert all(ends[i] < starts[i + 1] for i in range(len(starts) - 1)), "touching intervals must merge"
    assert {t for s, e in zip(starts, ends) for t in range(int(s), int(e))} == covered


def test_fields_compared_are_all_the_totals():
    """Guards the properties above: a new PhaseSeries total must be added to FIELDS."""
    names = {f.name for f in dataclasses.fields(PhaseSeries)} - {"gpu", "uuid", "service", "phase"}
    assert names == set(FIELDS)
