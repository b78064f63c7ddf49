"""PhaseAccountant on hand-computed timelines: every expected number is worked out in the comments."""

from __future__ import annotations

import threading

import pytest

from gpuphase.agent.phases import OTHER_SERVICE, Interval, PhaseAccountant, Segment, timeline
from tests.phase_helpers import GPU0, GPU1, KEY0, KEY1, decode, prefill, sample, totals

SETTLE = 15.0


def accountant(**kw) -> PhaseAccountant:
    kw.setdefault("settle", SETTLE)
    kw.setdefault("retention", 300.0)
    kw.setdefault("max_services", 8)
    return PhaseAccountant(**kw)


def feed(acc: PhaseAccountant, readings) -> None:
    for reading in readings:
        acc.add_sample(reading)


def approx(value):
    return pytest.approx(value, abs=1e-9)


def test_overlapping_windows_give_prefill_mixed_decode_and_idle_gaps():
    # Samples each second from 100 to 104; prefill [100.5, 101.5] straddles the sample at 101.
    # Timeline: idle 100-100.5, prefill 100.5-101, mixed 101-101.5, decode 101.5-103, idle 103-104.
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    feed(acc, [sample(100, sm=0.0, energy=1000), sample(101, sm=0.4, energy=1300),
               sample(102, sm=0.8, energy=1800), sample(103, sm=0.6, energy=2200),
               sample(104, sm=0.1, energy=2250)])
    acc.add_windows(KEY0, [prefill(100.5, 101.5, tokens=512), decode(101.0, 103.0, tokens=64)])
    acc.advance(104 + SETTLE)

    t = totals(acc)
    assert {p: t[p].seconds for p in t} == {"prefill": approx(0.5), "mixed": approx(0.5),
                                            "decode": approx(1.5), "idle": approx(1.5)}
    # sm x overlap: (100,101] 0.4 -> idle .2 prefill .2; (101,102] 0.8 -> mixed .4 decode .4;
    # (102,103] 0.6 -> decode .6; (103,104] 0.1 -> idle .1
    assert {p: t[p].sm_active_seconds for p in t} == {"prefill": approx(0.2), "mixed": approx(0.4),
                                                      "decode": approx(1.0), "idle": approx(0.3)}
    # energy deltas 300, 500, 400, 50 split by share: idle 150+50, prefill 150, mixed 250, decode 250+400
    assert {p: t[p].energy_joules for p in t} == {"prefill": approx(150), "mixed": approx(250),
                                                  "decode": approx(650), "idle": approx(200)}
    assert {p: t[p].tokens for p in t} == {"prefill": 512, "mixed": 0, "decode": 64, "idle": 0}
    # The samples carried no tensor/DRAM figures: those integrals are absent, not zero.
    assert all(s.tensor_active_seconds is None and s.dram_active_seconds is None for s in t.values())


def test_only_time_older_than_settle_is_finalised_and_tokens_wait_for_the_window_end():
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    feed(acc, [sample(100, energy=0), sample(101, energy=10), sample(102, energy=20)])
    acc.add_windows(KEY0, [prefill(100.5, 101.5, tokens=7)])
    acc.advance(101 + SETTLE)  # only (100, 101] is final; the window is half done
    t = totals(acc)
    assert t["idle"].seconds == approx(0.5) and t["prefill"].seconds == approx(0.5)
    assert t["prefill"].tokens == 0
    acc.advance(102 + SETTLE)
    t = totals(acc)
    assert t["idle"].seconds == approx(1.0) and t["prefill"].seconds == approx(1.0)
    assert t["prefill"].tokens == 7


def test_late_windows_counted_within_settle_clipped_when_partly_final_refused_when_wholly_final():
    acc = accountant()
    feed(acc, [sample(100), sample(101), sample(102), sample(103)])
    acc.add_windows(KEY0, [decode(100.0, 100.2)])  # teaches the GPU its service
    acc.advance(101 + SETTLE)  # (100, 101] final
    acc.add_windows(KEY0, [decode(101.0, 102.0, tokens=3)])  # late, but time not final yet: counted
    acc.add_windows(KEY0, [decode(100.5, 101.5, tokens=9)])  # half in final time: keeps 101-101.5, 4.5 tokens
    acc.add_windows(KEY0, [decode(100.3, 100.9, tokens=5)])  # wholly in final time: refused
    acc.advance(103 + SETTLE)

    t = totals(acc)
    assert t["decode"].seconds == approx(0.2 + 1.0)
    assert t["idle"].seconds == approx(3.0 - 1.2)
    assert t["decode"].tokens == approx(3 + 4.5)
    assert acc.rejected() == {"too_late": 1}
    assert acc.clipped() == 1


def test_clipped_windows_reach_the_agents_view():
    """The operator watches gpu_spans_clipped_total (docs/phases.md): the agent's view carries the count."""
    from gpuphase.agent.app import Agent
    from gpuphase.agent.config import Config

    agent = Agent(Config(phase_settle=SETTLE))
    acc = agent.accountant
    feed(acc, [sample(100), sample(101), sample(102)])
    acc.add_windows(KEY0, [decode(100.0, 100.2)])
    acc.advance(101 + SETTLE)
    acc.add_windows(KEY0, [decode(100.5, 101.5)])  # began in final time: clipped
    assert agent.view().spans.clipped == 1


def test_duplicates_count_once_while_held_and_after_counting():
    acc = accountant()
    feed(acc, [sample(100), sample(102)])
    first = prefill(100.0, 101.0, tokens=5, key=b"trace-span-prefill")
    acc.add_windows(KEY0, [first, first])
    acc.advance(102 + SETTLE)
    acc.add_windows(KEY0, [first])  # a sender retry after the window was counted: its time is final
    t = totals(acc)
    assert t["prefill"].seconds == approx(1.0) and t["prefill"].tokens == 5
    assert acc.rejected() == {"duplicate": 1, "too_late": 1}


def test_same_window_on_two_gpus_counts_on_each():
    # Tensor parallelism: one request's window belongs to both GPUs; dedupe is per GPU.
    acc = accountant()
    feed(acc, [sample(100, GPU0), sample(101, GPU0), sample(100, GPU1), sample(101, GPU1)])
    shared = prefill(100.0, 101.0, key=b"tp2")
    acc.add_windows(KEY0, [shared])
    acc.add_windows(KEY1, [shared])
    acc.advance(101 + SETTLE)
    assert totals(acc, gpu=0)["prefill"].seconds == approx(1.0)
    assert totals(acc, gpu=1)["prefill"].seconds == approx(1.0)
    assert acc.rejected() == {}


def test_a_tensor_parallel_group_holds_its_windows_once_and_each_gpu_counts_them():
    acc = accountant(max_windows_per_gpu=3)
    # GPU 1 is read 10 ms after GPU 0, as the sampler reads GPUs one after another.
    feed(acc, [sample(100, GPU0), sample(100.01, GPU1), sample(102, GPU0), sample(102.01, GPU1)])
    acc.place((KEY0, KEY1), [prefill(100.5, 101.0, tokens=8), decode(101.0, 101.5, tokens=2)])
    assert [ledger.held() for ledger in acc._ledgers.values()] == [2, 2]  # one store, seen by both
    assert len(acc._stores) == 1
    acc.place((KEY0, KEY1), [decode(101.0, 101.5), decode(101.5, 102.0)])  # room for one more
    assert acc.rejected() == {"buffer_full": 2}  # once per GPU it was placed on
    acc.advance(102.01 + SETTLE)
    for gpu in (0, 1):
        t = totals(acc, gpu=gpu)
        assert (t["prefill"].seconds, t["decode"].seconds) == (approx(0.5), approx(0.5))
        assert (t["prefill"].tokens, t["decode"].tokens) == (8, 2)
    assert acc.last_span() == {(0, "GPU-aaaa", "llm"): 101.5, (1, "GPU-bbbb", "llm"): 101.5}
    assert acc._stores == {}  # everything counted by both: the store is gone


def test_a_lost_gpu_of_a_group_delays_only_its_own_tokens():
    acc = accountant(retention=60.0)
    feed(acc, [sample(100, GPU0), sample(100, GPU1), sample(101, GPU0), sample(101, GPU1), sample(102, GPU0)])
    acc.place((KEY0, KEY1), [decode(101.2, 101.8, tokens=5)])
    acc.advance(102 + SETTLE)  # GPU 1 answered last at 101: its time after that is not final
    assert totals(acc, gpu=0)["decode"].tokens == 5 and totals(acc, gpu=1)["decode"].tokens == 0
    assert acc._ledgers[KEY1].held() == 1  # still held for GPU 1
    acc.advance(101 + 60.0 + 1)  # GPU 1 silent for longer than retention: that time is unknown
    assert totals(acc, gpu=1)["decode"].tokens == 5 and totals(acc, gpu=1)["decode"].seconds == 0.0
    assert acc._stores == {}


def test_too_old_too_new_and_invalid_windows_are_refused():
    acc = accountant(retention=60.0)
    acc.advance(1000.0)
    acc.add_windows(KEY0, [prefill(900.0, 930.0), decode(1100.0, 1101.0), prefill(5.0, 4.0),
                           prefill(float("nan"), 1.0)])
    assert acc.rejected() == {"too_old": 1, "too_new": 1, "invalid_window": 2}
    assert acc.series() == ()  # nothing accepted: the GPU learned no service


def test_unmapped_gpu_has_no_series_and_mapped_gpu_without_spans_is_idle():
    acc = accountant()
    for ts in (100, 101, 102):
        acc.add_sample(sample(ts, GPU0, power=75.0))
        acc.add_sample(sample(ts, GPU1, power=80.0))
    acc.set_mapping(KEY1, ["vllm"])
    acc.advance(102 + SETTLE)
    assert {s.gpu for s in acc.series()} == {1}  # GPU 0: unknown, not idle
    t = totals(acc, gpu=1, service="vllm")
    assert t["idle"].seconds == approx(2.0)
    assert t["idle"].energy_joules == approx(160.0)  # no energy counter: 80 W x 2 s
    assert t["idle"].sm_active_seconds is None  # no GPM on these readings
    assert t["prefill"].seconds == 0.0


def test_service_learned_from_windows_owns_idle_time_from_its_first_window_on():
    # No phase.map: before the first span nobody is known to hold the GPU, so 100-101 is
    # unknown (not counted); from 101 the service owns the GPU: decode 101-102, idle 102-104.
    acc = accountant()
    feed(acc, [sample(100), sample(101), sample(102), sample(103), sample(104)])
    acc.add_windows(KEY0, [decode(101.0, 102.0)])
    acc.advance(104 + SETTLE)
    t = totals(acc)
    assert {p: t[p].seconds for p in t} == {"prefill": 0, "mixed": 0, "decode": approx(1.0), "idle": approx(2.0)}


def test_energy_counter_reset_counts_the_value_since_the_reset():
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    feed(acc, [sample(100, energy=5000.0), sample(101, energy=5400.0), sample(102, energy=30.0)])
    acc.advance(102 + SETTLE)
    assert totals(acc)["idle"].energy_joules == approx(400.0 + 30.0)


def test_power_fallback_uses_the_mean_of_both_ends():
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    feed(acc, [sample(100, power=100.0), sample(102, power=300.0)])
    acc.add_windows(KEY0, [decode(100.0, 101.5)])
    acc.advance(102 + SETTLE)
    t = totals(acc)
    # 200 W mean x 2 s = 400 J, split 1.5 : 0.5
    assert t["decode"].energy_joules == approx(300.0) and t["idle"].energy_joules == approx(100.0)


def test_all_three_activity_integrals_split_by_share():
    acc = accountant()
    feed(acc, [sample(0, sm=0, tensor=0, dram=0), sample(4, sm=0.5, tensor=0.25, dram=1.0)])
    acc.add_windows(KEY0, [prefill(1.0, 2.0), decode(2.0, 4.0)])
    acc.advance(4 + SETTLE)
    t = totals(acc)
    assert (t["prefill"].sm_active_seconds, t["prefill"].tensor_active_seconds,
            t["prefill"].dram_active_seconds) == (approx(0.5), approx(0.25), approx(1.0))
    assert (t["decode"].sm_active_seconds, t["decode"].tensor_active_seconds,
            t["decode"].dram_active_seconds) == (approx(1.0), approx(0.5), approx(2.0))
    assert t["mixed"].sm_active_seconds == 0.0  # GPM present: a phase with no time integrates to 0


def test_readings_of_a_gpu_that_did_not_answer_are_skipped():
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    feed(acc, [sample(100, energy=0.0), sample(101, up=False), sample(102, energy=90.0)])
    acc.advance(102 + SETTLE)
    t = totals(acc)
    assert t["idle"].seconds == approx(2.0) and t["idle"].energy_joules == approx(90.0)


def test_two_services_on_one_gpu_share_joint_and_idle_time_equally():
    # a prefills 0-2, b decodes 1-3, both configured on the GPU; samples 0 and 4.
    # 0-1 prefill (a), 1-2 mixed (a, b: half each), 2-3 decode (b), 3-4 idle (a, b: half each).
    acc = accountant()
    acc.set_mapping(KEY0, ["a", "b"])
    feed(acc, [sample(0, energy=0.0), sample(4, energy=400.0)])
    acc.add_windows(KEY0, [prefill(0.0, 2.0, service="a"), decode(1.0, 3.0, service="b")])
    acc.advance(4 + SETTLE)
    a, b = totals(acc, service="a"), totals(acc, service="b")
    assert {p: a[p].seconds for p in a} == {"prefill": approx(1), "mixed": approx(0.5), "decode": 0,
                                            "idle": approx(0.5)}
    assert {p: b[p].seconds for p in b} == {"prefill": 0, "mixed": approx(0.5), "decode": approx(1),
                                            "idle": approx(0.5)}
    assert sum(s.energy_joules for s in acc.series()) == approx(400.0)


def test_refused_windows_take_no_place_under_the_service_cap():
    acc = accountant(max_services=1)
    acc.advance(1000.0)
    acc.add_windows(KEY0, [prefill(1.0, 2.0, service="ancient"), prefill(999.0, 999.5, service="live")])
    assert acc.rejected() == {"too_old": 1}
    assert {s.service for s in acc.series()} == {"live"}


def test_service_names_beyond_the_cap_become_other():
    acc = accountant(max_services=2)
    feed(acc, [sample(0), sample(1)])
    acc.add_windows(KEY0, [prefill(0.0, 0.1, service="a"), prefill(0.1, 0.2, service="b"),
                           prefill(0.2, 0.3, service="c"), prefill(0.3, 0.4, service="d")])
    acc.advance(1 + SETTLE)
    assert {s.service for s in acc.series()} == {"a", "b", OTHER_SERVICE}
    assert totals(acc, service=OTHER_SERVICE)["prefill"].seconds == approx(0.2)


def test_last_span_tracks_the_newest_window_end_per_gpu_and_service():
    acc = accountant()
    acc.add_windows(KEY0, [prefill(10.0, 11.0), decode(11.0, 19.5), prefill(12.0, 13.0, service="x")])
    acc.add_windows(KEY1, [decode(5.0, 6.0)])
    assert acc.last_span() == {(0, "GPU-aaaa", "llm"): 19.5, (0, "GPU-aaaa", "x"): 13.0,
                               (1, "GPU-bbbb", "llm"): 6.0}


def test_window_cap_per_gpu_drops_and_counts():
    acc = accountant(max_windows_per_gpu=3)
    acc.add_windows(KEY0, [prefill(float(i), i + 0.5) for i in range(5)])
    assert acc.rejected() == {"buffer_full": 2}


def test_counted_windows_free_their_places_in_the_buffer():
    acc = accountant(max_windows_per_gpu=2)
    feed(acc, [sample(100), sample(101), sample(102)])
    acc.add_windows(KEY0, [prefill(100.0, 100.5), decode(100.5, 101.0)])
    acc.advance(101 + SETTLE)  # both ended by 101: counted and forgotten
    acc.add_windows(KEY0, [prefill(101.0, 101.5, tokens=1), decode(101.5, 102.0, tokens=2)])
    assert acc.rejected() == {}
    acc.advance(102 + SETTLE)
    t = totals(acc)
    assert (t["prefill"].seconds, t["decode"].seconds) == (approx(1.0), approx(1.0))
    assert (t["prefill"].tokens, t["decode"].tokens) == (1, 2)


def test_a_window_is_counted_when_time_passes_its_end_even_among_others_ending_close_by():
    # Ends 101.05 and 101.2 fall in one quarter-second bucket; finalising to 101.1 counts only
    # the first, and each is then recognised for what it is when sent again.
    acc = accountant()
    feed(acc, [sample(100), sample(101.1), sample(102)])
    early = decode(100.0, 101.05, tokens=3, key=b"early")
    late = decode(100.0, 101.2, tokens=5, key=b"late")
    acc.add_windows(KEY0, [early, late])
    acc.advance(101.1 + SETTLE)
    assert totals(acc)["decode"].tokens == 3
    acc.add_windows(KEY0, [early, late])
    assert acc.rejected() == {"too_late": 1, "duplicate": 1}
    acc.advance(102 + SETTLE)
    t = totals(acc)
    assert t["decode"].tokens == 8 and t["decode"].seconds == approx(1.2)


def test_gpu_never_sampled_still_counts_tokens_and_frees_its_windows():
    acc = accountant()
    acc.add_windows(KEY0, [decode(100.0, 101.0, tokens=4)])
    acc.advance(101 + SETTLE)
    t = totals(acc)
    assert t["decode"].tokens == 4 and t["decode"].seconds == 0.0  # no readings: no time claimed
    acc.add_windows(KEY0, [decode(100.5, 100.9)])
    assert acc.rejected() == {"too_late": 1}


def test_timeline_merges_equal_neighbours_and_ignores_order():
    windows = [Interval(1.0, 2.0, "prefill", "s"), Interval(2.0, 3.0, "prefill", "s"),
               Interval(2.5, 4.0, "decode", "s")]
    expected = [Segment(0.0, 1.0, "idle", ()), Segment(1.0, 2.5, "prefill", ("s",)),
                Segment(2.5, 3.0, "mixed", ("s",)), Segment(3.0, 4.0, "decode", ("s",)),
                Segment(4.0, 5.0, "idle", ())]
    assert timeline(windows, 0.0, 5.0) == expected
    assert timeline(list(reversed(windows)), 0.0, 5.0) == expected


def test_series_object_is_reused_until_something_changes():
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    feed(acc, [sample(0), sample(1)])
    acc.advance(1 + SETTLE)
    first = acc.series()
    assert acc.series() is first
    acc.add_sample(sample(2))
    acc.advance(2 + SETTLE)
    assert acc.series() is not first


def test_concurrent_producers_keep_time_exact():
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    span_count = 400

    def send_spans():
        for i in range(span_count):
            acc.add_windows(KEY0, [prefill(100 + i * 0.1, 100 + i * 0.1 + 0.05, tokens=1)])

    def sample_and_scrape():
        for tick in range(100, 141):
            acc.add_sample(sample(float(tick)))
            acc.series()

    threads = [threading.Thread(target=send_spans), threading.Thread(target=sample_and_scrape)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    acc.advance(140 + SETTLE)
    t = totals(acc)
    assert sum(s.seconds for s in t.values()) == approx(40.0)
    assert t["prefill"].seconds == pytest.approx(span_count * 0.05, abs=1e-6)
    assert t["prefill"].tokens == span_count


def test_add_sample_never_waits_for_the_lock_and_its_readings_still_count():
    # The tick thread calls add_sample(); a long add_windows()/advance() on another thread holds the
    # lock. Simulated by holding the lock here: add_sample must return, and advance() files the reading.
    acc = accountant()
    acc.set_mapping(KEY0, ["llm"])
    acc.add_sample(sample(100))
    with acc._lock:
        done = threading.Event()
        threading.Thread(target=lambda: (acc.add_sample(sample(101)), done.set()), daemon=True).start()
        assert done.wait(5), "add_sample blocked on the accountant's lock"
    acc.advance(101 + SETTLE)
    assert sum(s.seconds for s in totals(acc).values()) == approx(1.0)


@pytest.mark.parametrize("start, end", [(float("nan"), 101.0), (100.0, float("nan")), (float("-inf"), 101.0),
                                        (100.0, float("inf")), (float("-inf"), float("inf")), (101.0, 100.0)])
def test_non_finite_or_reversed_windows_are_invalid_before_and_after_the_first_advance(start, end):
    for advanced in (False, True):
        acc = accountant()
        if advanced:
            acc.advance(100.0)
        acc.add_windows(KEY0, [prefill(start, end)])
        assert acc.rejected() == {"invalid_window": 1}
