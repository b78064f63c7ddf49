"""TGI v3 on 2 shards: decoding the spans TGI really sends gives each GPU's phase time (within 2%)
and the decode tokens of the schedule, whatever order the router's and shards' exports arrive in.

The fixtures (tests/fixtures/tgi/schedules.py) are built from the sources of
huggingface/text-generation-inference @ db931fc, cited there line by line:
- one trace per step, its router spans INTERNAL and of one name: backend `prefill`/`decode`
  (backends/v3/src/backend.rs:296, :341, no fields), ShardedClient (backends/v3/src/client/
  sharded_client.rs:141 `fields(id, size)`, :175 `fields(size)`), one gRPC client span per shard
  (backends/v3/src/client/grpc_client.rs:229, :257);
- `size` and `id` as strings: tracing-opentelemetry 0.21 (router/Cargo.toml:43) has no
  record_u64 (src/layer.rs:301-356), so tracing-core's default Visit::record_u64 → record_debug;
- the shard's SERVER span (server/text_generation_server/tracing.py:49-54) > `concatenate`
  (server.py:178 Prefill with a cached batch, chunking only; server.py:210 Decode of >1 batches)
  and `generate_token` (models/flash_causal_lm.py:1890);
- the launcher passes one --otlp-service-name, default `text-generation-inference.router`, to the
  router and every shard (launcher/src/main.rs:842, :1030, :1937); no span or resource has a pid.
"""

from __future__ import annotations

import random

import pytest

from gpuphase.agent.phases import PhaseAccountant
from gpuphase.agent.spans.decoders import decode_request, tgi
from gpuphase.agent.spans.mapping import SpanMapper
from gpuphase.agent.spans.receiver import SpanIntake
from gpuphase.model.phase import DECODE, IDLE, MIXED, PREFILL, phase_of
from gpuphase.model.snapshot import GpuSample, Snapshot
from tests import spanfactory as f
from tests.fixtures.tgi import schedules as s
from tests.phase_helpers import GPU0, GPU1, KEY0, KEY1, sample

TOLERANCE = 0.02


@pytest.fixture(autouse=True)
def fresh_step_table():
    tgi.STEPS.clear()
    yield
    tgi.STEPS.clear()


def exports(schedule: s.Schedule, order: str, seed: int = 0) -> list:
    """The schedule's spans as export requests: the router's in batches, each shard's in its own
    (different processes, different BatchSpanProcessors), in the given arrival order."""
    rng = random.Random(seed)

    def batches(spans, service, scope):
        out, i = [], 0
        while i < len(spans):
            n = rng.randint(1, 40)
            out.append(f.tgi_request(spans[i:i + n], service, scope))
            i += n
        return out

    router = batches(schedule.router, s.SERVICE, "opentelemetry-otlp")
    shards = [batches(spans, s.SERVICE, f.TGI_SHARD_SCOPE) for spans in schedule.shards]
    if order == "router_first":
        return router + [r for shard in shards for r in shard]
    if order == "shards_first":
        return [r for shard in shards for r in shard] + router
    mixed = router + [r for shard in shards for r in shard]
    rng.shuffle(mixed)
    return mixed


def decode_all(requests):
    windows, received, rejected, unmatched = [], 0, 0, 0
    for request in requests:
        outcome = decode_request(request)
        windows += outcome.windows
        received += sum(outcome.received.values())
        rejected += outcome.rejected_spans
        unmatched += sum(outcome.unmatched.values())
    return windows, received, rejected, unmatched


def swept(windows, start: float, end: float) -> dict[str, float]:
    """Phase seconds of one GPU over [start, end] from the windows (an independent sweep)."""
    edges = sorted({start, end, *(w.start for w in windows), *(w.end for w in windows)})
    out = {PREFILL: 0.0, DECODE: 0.0, MIXED: 0.0, IDLE: 0.0}
    for a, b in zip(edges, edges[1:]):
        if a < start or b > end:
            continue
        mid = (a + b) / 2
        active = {w.phase for w in windows if w.start <= mid < w.end}
        out[phase_of(PREFILL in active, DECODE in active)] += b - a
    return out


def assert_close(got: dict[str, float], truth: dict[str, float]) -> None:
    for phase, expected in truth.items():
        if expected == 0:
            assert got[phase] == 0, (phase, got, truth)
        else:
            assert abs(got[phase] - expected) <= TOLERANCE * expected, (phase, got[phase], expected)


@pytest.mark.parametrize("build", s.DECIDABLE)
@pytest.mark.parametrize("order", ["router_first", "shards_first", "shuffled"])
def test_phase_seconds_and_decode_tokens_match_the_truth(build, order):
    schedule = build()
    windows, received, rejected, unmatched = decode_all(exports(schedule, order))
    assert rejected == 0
    steps = len(schedule.steps)
    concatenated = sum(step.concatenate for step in schedule.steps)
    # the 2 + num_shard `prefill`/`decode` router spans are claimed, the root `batch` is not; of the
    # shard spans only `concatenate` (the SERVER span and generate_token are unknown_span)
    assert received == steps * (2 + s.SHARDS) + concatenated * s.SHARDS
    assert unmatched == steps * (1 + s.SHARDS * 2)
    # exactly one window per step, plus the decode half of each mixed (chunked) prefill
    mixed_prefills = sum(step.rpc == "prefill" and step.phase == MIXED for step in schedule.steps)
    assert len(windows) == steps + mixed_prefills
    assert len({w.key for w in windows}) == len(windows)
    assert_close(swept(windows, schedule.start, schedule.end), schedule.phase_seconds(schedule.start, schedule.end))
    assert sum(w.tokens for w in windows if w.phase == DECODE) == schedule.decode_rpc_tokens
    assert sum(w.tokens for w in windows if w.phase == PREFILL) == 0
    assert {w.service for w in windows} == {s.SERVICE} and {w.pid for w in windows} == {None}


def test_decode_tokens_are_the_tokens_of_decode_rpcs_not_the_first_tokens():
    # What the spans can count: one token per request per Decode RPC. The first token of each
    # request (made by the prefill forward) and the cached batch's tokens in a chunked Prefill are
    # on no span's `size` (sharded_client.rs:141 counts the new batch only).
    schedule = s.chunked_prefill_with_decoding_batch()
    windows, *_ = decode_all(exports(schedule, "shuffled"))
    got = sum(w.tokens for w in windows if w.phase == DECODE)
    assert got == schedule.decode_rpc_tokens == 20 * 2 + 15 + 10 + 12 * 3
    assert schedule.generated - got == 1 + 2 + 1 + 3  # per prefill step: first tokens + cached tokens


def test_string_sizes_are_counted_and_garbled_ones_rejected():
    trace = f.tgi_id(1, 16)

    def decode_span(size):
        return f.tgi_router_span("decode", f.T0, f.T0 + 0.03, "sharded", trace, f.tgi_id(2, 8), f.tgi_id(3, 8),
                                 {"size": size})

    assert [w.tokens for w in decode_request(f.tgi_request([decode_span("17")])).windows] == [17]
    assert [w.tokens for w in decode_request(f.tgi_request([decode_span(17)])).windows] == [17]
    for bad in ["-3", "3.0", " 3", "0x10", "１７", "9" * 11, "", "3e2"]:
        outcome = decode_request(f.tgi_request([decode_span(bad)]))
        assert outcome.rejected == {"invalid_window": 1} and not outcome.windows, bad


def test_only_the_sharded_client_span_gives_the_window():
    trace = f.tgi_id(5, 16)
    spans = [f.tgi_router_span("decode", f.T0, f.T0 + 0.031, "backend", trace, f.tgi_id(6, 8), f.tgi_id(7, 8)),
             f.tgi_router_span("decode", f.T0 + 1e-5, f.T0 + 0.030, "sharded", trace, f.tgi_id(8, 8),
                               f.tgi_id(6, 8), {"size": "4"})]
    spans += [f.tgi_router_span("decode", f.T0 + 2e-5, f.T0 + 0.029, "grpc", trace, f.tgi_id(9 + i, 8),
                                f.tgi_id(8, 8), {"size": "4"}) for i in range(4)]
    outcome = decode_request(f.tgi_request(spans))
    assert outcome.received == {"tgi": 6}
    [w] = outcome.windows
    assert (w.phase, w.tokens, w.key) == (DECODE, 4, trace + f.tgi_id(8, 8) + b"decode")


def test_tgi_2x_module_paths_are_understood_too():
    # TGI 2.x: router/client/src/v3/{sharded_client,client}.rs, router/src/infer/v3/scheduler.rs
    trace = f.tgi_id(20, 16)
    spans = [f.span("decode", f.T0, f.T0 + 0.03, {"code.namespace": ns, "size": "2"}, trace_id=trace)
             for ns in ("text_generation_client::v3::sharded_client", "text_generation_client::v3::client")]
    spans.append(f.span("decode", f.T0, f.T0 + 0.03, {"code.namespace": "text_generation_router::infer::v3::scheduler"},
                        trace_id=trace))
    assert [(w.phase, w.tokens) for w in decode_request(f.request(spans, {"service.name": "x"})).windows] \
        == [(DECODE, 2)]


def test_without_locations_the_field_less_backend_span_gives_the_window():
    spans = [f.span("prefill", f.T0, f.T0 + 0.1), f.span("prefill", f.T0, f.T0 + 0.1, {"id": "1", "size": "3"})]
    outcome = decode_request(f.request(spans, {"service.name": s.SERVICE}))
    assert [(w.phase, w.tokens) for w in outcome.windows] == [(PREFILL, 0)]


def test_concatenate_in_a_decode_rpc_does_not_make_the_step_mixed():
    schedule = s.concurrent_requests_without_chunking()
    windows, *_ = decode_all(exports(schedule, "shards_first"))
    assert MIXED not in {phase for phase, t in swept(windows, schedule.start, schedule.end).items() if t > 0}


def test_step_table_is_bounded():
    table = tgi.StepTable(max_steps=8)
    for i in range(100):
        table.concatenated(f.tgi_id(i, 16))
    assert len(table) == 8
    # the oldest are forgotten: a late prefill of step 0 is then plain prefill
    assert not table.prefill(f.tgi_id(0, 16), f.T0, f.T0 + 1, b"k" * 24, None)


def test_known_limit_a_decode_rpc_that_finishes_a_chunked_prompt_is_labelled_decode():
    schedule = s.long_prompt_chunked_over_a_decode()
    windows, *_ = decode_all(exports(schedule, "shuffled"))
    got = swept(windows, schedule.start, schedule.end)
    truth = schedule.phase_seconds(schedule.start, schedule.end)
    hidden = next(step for step in schedule.steps if step.rpc == "decode" and step.phase == MIXED)
    # the mixed Prefill RPC is found; the Decode RPC that prefills (180 ms) is counted as decode
    assert got[MIXED] == pytest.approx(truth[MIXED] - hidden.forward, rel=TOLERANCE)
    assert got[DECODE] == pytest.approx(truth[DECODE] + hidden.forward, rel=TOLERANCE)
    assert sum(w.tokens for w in windows if w.phase == DECODE) == schedule.decode_rpc_tokens


def snapshot(ts: float) -> Snapshot:
    return Snapshot(timestamp=ts, gpus=tuple(GpuSample(identity=g, up=True, timestamp=ts) for g in (GPU0, GPU1)))


@pytest.mark.parametrize("build", s.DECIDABLE)
def test_end_to_end_through_intake_mapping_and_accountant(build):
    schedule = build()
    settle = 60.0
    accountant = PhaseAccountant(settle, 600.0, 8)
    mapper = SpanMapper([(s.SERVICE, ("0", "1"))], on_mapped=accountant.mark_mapped)
    mapper.update_gpus(snapshot(schedule.start))
    for key, services in mapper.service_map().items():
        accountant.set_mapping(key, services)
    unplaced = {}

    def sink(windows):
        placements, unmatched = mapper.map(windows)
        for reason, n in unmatched.items():
            unplaced[reason] = unplaced.get(reason, 0) + n
        for gpus, placed in placements.items():
            accountant.place(gpus, placed)

    ticks = [schedule.start + 0.25 * i for i in range(int((schedule.end - schedule.start) / 0.25) + 1)]
    for ts in ticks:
        for gpu in (GPU0, GPU1):
            accountant.add_sample(sample(ts, gpu, sm=0.5, energy=100.0 * ts - 100.0 * f.T0))
    intake = SpanIntake(sink, max_spans_per_second=0)
    intake.start()
    try:
        for request in exports(schedule, "shuffled", seed=7):
            assert not intake.submit(request).queue_full
        assert intake.wait_idle(10)
    finally:
        intake.stop()
    accountant.advance(ticks[-1] + settle + 1)
    assert not unplaced and not accountant.rejected()
    truth = schedule.phase_seconds(ticks[0], ticks[-1])
    for key in (KEY0, KEY1):
        series = {x.phase: x for x in accountant.series() if (x.gpu, x.uuid) == key and x.service == s.SERVICE}
        assert_close({phase: x.seconds for phase, x in series.items()}, truth)
        assert series[DECODE].tokens == schedule.decode_rpc_tokens
        assert series[PREFILL].tokens == 0
