"""SGLang traces through the real decode path and end to end, against a ground-truth schedule.

The spans are built by tests/spanfactory.py `sglang_request` in the shapes of sgl-project/sglang
(observability/trace.py: root `" Req <rid>"` (TraceReqContext.trace_req_start), thread span
`"Scheduler [TP r] [PP 0] (host:… | pid:N)"` with pid/tp_rank (__create_thread_context), slices
without pid (trace_slice / trace_slice_start); req_time_stats.py: prefill_forward level 1 from
set_forward_entry_time to set_prefill_finished_time, chunked_prefill level 3, decode_forward
level 1 from set_last_scheduled_time to completion (abort), decode_loop level 3 per
set_last_decode_finish_time; tokens only on the root, make_span_attrs) and exported as each
process's BatchSpanProcessor would: its own spans in end order, 64 a batch, resource
{service.name} only.

Ground truth (what each of the two GPUs, TP ranks 0 and 1, computed; seconds after T0):

| request | prefill | decode | prompt / completion tokens |
|---|---|---|---|
| r1 | 0.10–0.40 (2 chunks) | 0.42–2.42 (100 steps) | 2048 / 100 (512 cached) |
| r2 | 0.60–0.70 (1 chunk) | 0.70–1.70 (50 steps) | 512 / 50 |
| r3 | 3.05–3.25 (4 chunks) | 3.25–4.25 (50 steps) | 1000 / 50 |

per GPU: prefill only 0.30 + 0.20 = 0.50 s; mixed (r2's prefill inside r1's decode) 0.10 s;
decode only 2.00 + 1.00 − 0.10 = 2.90 s; tokens prefill 3560, decode 200 on each GPU (a TP group
computes every token of the request on both GPUs, as the vLLM TP windows count them).

Decoding throughput of this traffic is measured in benchmarks/intake.py (docs/performance.md), not asserted here.
"""

from __future__ import annotations

import random
import threading

import pytest

from gpuphase.agent.phases.accountant import PhaseAccountant
from gpuphase.agent.spans.decoders import decode_request, sglang
from gpuphase.agent.spans.mapping import SpanMapper
from gpuphase.agent.spans.receiver import SpanIntake
from gpuphase.model.phase import DECODE, MIXED, PREFILL
from gpuphase.model.snapshot import GpuSample, ProcessSample, Snapshot
from tests import spanfactory as f
from tests.phase_helpers import GPU0, GPU1, KEY0, KEY1, sample
from tests.spanfactory import T0
from tests.test_mapping import fake_proc

API_PID, RANK_PIDS = 1000, {0: 1001, 1: 1002}
TRUTH = {PREFILL: 0.50, MIXED: 0.10, DECODE: 2.90}
TOKENS = {PREFILL: 2048 + 512 + 1000, DECODE: 100 + 50 + 50}


def schedule(level: int = 3, names: str = "0.5.23"):
    kw = dict(level=level, names=names, ranks=RANK_PIDS, api_pid=API_PID)
    return [
        f.sglang_request("r1aaaaaaaa", T0 + 0.0, (T0 + 0.10, T0 + 0.40), (T0 + 0.42, T0 + 2.42), 100, 2048, 100,
                         cached=512, chunks=2, **kw),
        f.sglang_request("r2bbbbbbbb", T0 + 0.5, (T0 + 0.60, T0 + 0.70), (T0 + 0.70, T0 + 1.70), 50, 512, 50, **kw),
        f.sglang_request("r3cccccccc", T0 + 3.0, (T0 + 3.05, T0 + 3.25), (T0 + 3.25, T0 + 4.25), 50, 1000, 50,
                         chunks=4, **kw),
    ]


@pytest.fixture(autouse=True)
def fresh_joiner():
    sglang.JOINER.clear()
    yield
    sglang.JOINER.clear()


def phase_seconds(windows) -> dict[str, float]:
    """An independent sweep: seconds with only prefill, only decode, or both windows active."""
    edges = sorted({w.start for w in windows} | {w.end for w in windows})
    out = {PREFILL: 0.0, DECODE: 0.0, MIXED: 0.0}
    for a, b in zip(edges, edges[1:]):
        mid = (a + b) / 2
        p = any(w.phase == PREFILL and w.start <= mid < w.end for w in windows)
        d = any(w.phase == DECODE and w.start <= mid < w.end for w in windows)
        if p or d:
            out[MIXED if p and d else PREFILL if p else DECODE] += b - a
    return out


def decode_all(exports):
    windows, received, unmatched = [], {}, {}
    for export in exports:
        outcome = decode_request(export)
        assert not outcome.rejected, outcome.first_error
        windows += outcome.windows
        for k, v in outcome.received.items():
            received[k] = received.get(k, 0) + v
        for k, v in outcome.unmatched.items():
            unmatched[k] = unmatched.get(k, 0) + v
    return windows, received, unmatched


def check_truth(windows, service="sglang"):
    assert {w.service for w in windows} == {service}
    assert {w.pid for w in windows} == {API_PID, *RANK_PIDS.values()}  # nothing left without its pid
    for pid in RANK_PIDS.values():
        got = phase_seconds([w for w in windows if w.pid == pid])
        for phase, truth in TRUTH.items():
            assert got[phase] == pytest.approx(truth, rel=0.02), (pid, phase, got)
        assert sum(w.tokens for w in windows if w.pid == pid) == 0  # slices carry no tokens
    api = [w for w in windows if w.pid == API_PID]
    assert all(w.start == w.end for w in api)  # token-only windows: no phase time
    assert {p: sum(w.tokens for w in api if w.phase == p) for p in (PREFILL, DECODE)} == TOKENS


@pytest.mark.parametrize("level", [3, 2, 1])
@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_sglang_0523_tp2_phase_seconds_and_tokens_match_the_truth(level, seed):
    """0.5.23, TP 2: at level 3 decode_loop / chunked_prefill replace their coarse parents; at levels
    1-2 (no decode_loop) decode_forward is the decode window. Any interleaving of the processes'
    export batches gives the same windows."""
    order = random.Random(seed) if seed is not None else None
    windows, received, unmatched = decode_all(f.sglang_exports(schedule(level), order=order))
    check_truth(windows)
    assert "vllm" not in received  # the root's gen_ai.latency.* are not vLLM's
    assert sglang.JOINER.held() == 0 and sglang.JOINER.forced == 0
    # level 3: one merged decode window per request and rank, no decode_forward on top of it
    decodes = [w for w in windows if w.phase == DECODE and w.pid != API_PID]
    assert len(decodes) == 3 * 2
    assert unmatched == {"unknown_span": 3 * (2 + 2 * 3)}  # tokenize, dispatch; request_process, waits


def test_sglang_0520_and_older_send_service_sglang_and_old_slice_names():
    """<= 0.5.20: process_tracing_init(endpoint, "sglang") overrides OTEL_SERVICE_NAME; 0.5.3-0.5.4
    named the slices `prefill` and `decode loop`."""
    windows, received, _ = decode_all(f.sglang_exports(schedule(3, names="0.5.3"), service="sglang",
                                                       order=random.Random(7)))
    check_truth(windows)


def test_0521_service_name_from_otlp_service_name():
    windows, _, _ = decode_all(f.sglang_exports(schedule(), service="qwen-7b", order=random.Random(4)))
    check_truth(windows, service="qwen-7b")


def test_vllm_decoder_leaves_sglang_root_alone_even_outside_its_scope():
    req = schedule()[0]
    root = req["api"][-1]
    outcome = decode_request(f.request([root], {"service.name": "sglang"}, scope_name="other"))
    assert outcome.received == {"sglang": 1} and not outcome.rejected


def test_bounds_force_held_windows_out_without_pid_never_lose_them():
    clock = [0.0]
    joiner = sglang.SglangJoiner(max_traces=4, max_held=8, ttl=10.0, clock=lambda: clock[0])
    old, sglang.JOINER = sglang.JOINER, joiner
    try:
        reqs = [f.sglang_request(f"q{i}xxxxxxx", T0 + i, (T0 + i, T0 + i + 0.1), (T0 + i + 0.1, T0 + i + 0.5), 5,
                                 10, 5, chunks=3, ranks={0: 1001}) for i in range(6)]
        slices = [s for r in reqs for s in r[0] if s.name in sglang.SLICES]  # no thread spans at all
        out = []
        for s in slices:
            out += decode_request(f.request([s], {"service.name": "sglang"})).windows
        assert joiner.held() <= 8 and joiner.traces() <= 4
        clock[0] = 100.0  # everything expires on the next span
        late = f.sglang_request("late-one", T0 + 9, (T0 + 9, T0 + 9.1), (T0 + 9.1, T0 + 9.5), 5, 1, 1,
                                ranks={0: 1001})[0]
        out += decode_request(f.request([late[2]], {"service.name": "sglang"})).windows  # its prefill_forward
        assert joiner.held() == 1 and joiner.traces() == 1  # only the new one is left
        assert all(w.pid is None for w in out) and joiner.forced == len(out)
        for i in range(6):  # each request's time is still all there
            mine = [w for w in out if T0 + i <= w.start < T0 + i + 0.5]
            got = phase_seconds(mine)
            assert got[PREFILL] == pytest.approx(0.1) and got[DECODE] == pytest.approx(0.4)
    finally:
        sglang.JOINER = old


def test_end_to_end_pid_mapping_from_the_thread_span(tmp_path):
    """SpanIntake -> SpanMapper (pid of the thread span; the API server's pid for the tokens, whose
    scheduler children hold GPUs 0 and 1) -> PhaseAccountant, no --phase.map."""
    proc = fake_proc(tmp_path / "proc", {1: (0, (1,)), API_PID: (1, (API_PID,)),
                                         1001: (API_PID, (1001,)), 1002: (API_PID, (1002,))})
    mapper = SpanMapper((), proc_root=str(proc))
    mapper.update_gpus(Snapshot(timestamp=T0, gpus=(
        GpuSample(identity=GPU0, up=True, timestamp=T0, processes=(ProcessSample(pid=1001),)),
        GpuSample(identity=GPU1, up=True, timestamp=T0, processes=(ProcessSample(pid=1002),)))))
    acc = PhaseAccountant(settle=5.0, retention=600.0, max_services=8)
    lock = threading.Lock()
    unmatched: dict[str, int] = {}

    def sink(windows):
        with lock:
            mapped, missed = mapper.map(windows)
            for gpus, run in mapped.items():
                acc.place(gpus, run)
            for k, v in missed.items():
                unmatched[k] = unmatched.get(k, 0) + v

    for i in range(-10, 41):
        ts = T0 + i * 0.25
        acc.add_sample(sample(ts, GPU0, power=300.0))
        acc.add_sample(sample(ts, GPU1, power=300.0))
    intake = SpanIntake(sink, max_spans_per_second=0)
    intake.start()
    try:
        for export in f.sglang_exports(schedule(), order=random.Random(11)):
            assert not intake.submit(export).queue_full
        assert intake.wait_idle(10)
    finally:
        intake.stop()
    acc.advance(T0 + 10 + 5)
    assert not unmatched
    for gpu in (0, 1):
        got = {s.phase: s for s in acc.series() if s.gpu == gpu and s.service == "sglang"}
        for phase, truth in TRUTH.items():
            assert got[phase].seconds == pytest.approx(truth, rel=0.02), (gpu, phase)
        assert got[PREFILL].tokens == TOKENS[PREFILL] and got[DECODE].tokens == TOKENS[DECODE]
    assert acc.rejected() == {} or not any(acc.rejected().values())
