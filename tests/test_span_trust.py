"""What a span sender can and cannot do to accounting (docs/security.md).

- A window's GPUs are limited to those its service is entitled to: `--phase.map`, its pid found on
  the GPU, or its pod on the GPU. Claims (`gpuphase.gpu.ids`) beyond that are refused and counted
  `gpu_not_permitted`; a GPU in phase.map takes only its own services' windows.
- The `service` label is bounded without being first-come-forever: configured and mapped services
  keep their own value whatever junk arrives; unmapped ones share the slots, which expire.
- Token counts must be plausible for the window's length.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuphase.agent.app import Agent
from gpuphase.agent.config import Config
from gpuphase.agent.phases import OTHER_SERVICE, PhaseAccountant
from gpuphase.agent.spans.attributes import InvalidSpan
from gpuphase.agent.spans.decoders import decode_request
from gpuphase.agent.spans.decoders.common import (MAX_TOKENS_AT_ONCE, MAX_TOKENS_PER_SECOND, ResourceInfo,
                                                  make_window, token_ceiling)
from gpuphase.agent.spans.mapping import GPU_NOT_PERMITTED, SpanMapper
from gpuphase.model.phase import DECODE, PREFILL
from gpuphase.model.snapshot import GpuIdentity, GpuSample, ProcessSample, Snapshot
from tests import spanfactory as f
from tests.phase_helpers import decode, prefill
from tests.test_mapping import fake_proc, gpus_of

SETTLE, RETENTION = 15.0, 300.0
GPUS = [GpuIdentity(index=i, uuid=f"GPU-{i}{i}{i}{i}-trust", name="NVIDIA H100 80GB HBM3") for i in range(8)]
KEYS = [(g.index, g.uuid) for g in GPUS]

# Host processes: service A's server 100 (child 101 on GPU 0), service B's server 200 (child 201 on
# GPU 3), and a pod whose two containers each hold a GPU: 300 on GPU 4 and 400 on GPU 5.
PROCS = {
    1: (0, (1,)),
    100: (1, (100,)), 101: (100, (101,)),
    200: (1, (200,)), 201: (200, (201,)),
    300: (1, (300,)), 400: (1, (400,)),
}
POD = {300: ("serving", "tp-pod"), 400: ("serving", "tp-pod")}


def snapshot(holders: dict[int, list[int]], ts: float = 1.0) -> Snapshot:
    def process(pid: int) -> ProcessSample:
        namespace, pod = POD.get(pid, ("", ""))
        return ProcessSample(pid=pid, pod=pod, namespace=namespace)
    return Snapshot(timestamp=ts, gpus=tuple(
        GpuSample(identity=g, up=True, timestamp=ts, processes=tuple(process(pid) for pid in holders.get(g.index, [])))
        for g in GPUS))


HOLDERS = {0: [101], 3: [201], 4: [300], 5: [400]}


@pytest.fixture
def proc_root(tmp_path) -> str:
    return str(fake_proc(tmp_path / "proc", PROCS))


def mapper(proc_root: str, phase_map=(), **kw) -> SpanMapper:
    m = SpanMapper(phase_map, proc_root=proc_root, **kw)
    m.update_gpus(snapshot(HOLDERS))
    return m


def accountant(**kw) -> PhaseAccountant:
    kw.setdefault("settle", SETTLE)
    kw.setdefault("retention", RETENTION)
    kw.setdefault("max_services", 4)
    return PhaseAccountant(**kw)


def feed(acc: PhaseAccountant, times, gpus=range(8)) -> None:
    for ts in times:
        for i in gpus:
            acc.add_sample(GpuSample(identity=GPUS[i], up=True, timestamp=ts, values={"gpu_power_watts": 100.0}))


def run(m: SpanMapper, acc: PhaseAccountant, windows) -> dict[str, int]:
    """What the agent's span worker does: map, then place; returns the unmatched counts."""
    mapped, unmatched = m.map(windows)
    for gpus, batch in mapped.items():
        acc.place(gpus, batch)
    return unmatched


def seconds_by(acc: PhaseAccountant) -> dict[tuple[int, str], float]:
    out: dict[tuple[int, str], float] = {}
    for s in acc.series():
        out[(s.gpu, s.service)] = out.get((s.gpu, s.service), 0.0) + s.seconds
    return out


# --- 1. GPU claims ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", [False, True])
def test_service_a_cannot_add_time_to_a_gpu_mapped_only_to_service_b(proc_root, trust):
    # The acceptance case: B is mapped to GPU 3. A names GPU 3 (by index or UUID), claims B's
    # sender pid, or both; none of it lands on GPU 3, with or without trusted claims.
    m = mapper(proc_root, [("B", ("3",))], trust_span_gpus=trust)
    acc = accountant()
    acc.set_mapping(KEYS[3], ["B"])
    feed(acc, [100, 101, 102, 103])
    attempts = [decode(100.0, 103.0, service="A", gpu_ids=("3",)),
                decode(100.0, 103.0, service="A", gpu_ids=(KEYS[3][1],)),
                decode(100.0, 103.0, service="A", pid=200),  # B's server: its child holds GPU 3
                decode(100.0, 103.0, service="A", pid=201, gpu_ids=("3",)),
                decode(100.0, 103.0, service="A", pid=100, gpu_ids=("0", "3"))]  # A's own GPU plus B's
    unmatched = run(m, acc, attempts)
    assert unmatched == {GPU_NOT_PERMITTED: len(attempts)}
    acc.advance(103 + SETTLE)
    by = seconds_by(acc)
    assert {service for gpu, service in by if gpu == 3} == {"B"}
    totals = {s.phase: s.seconds for s in acc.series() if s.gpu == 3}
    assert totals == {"prefill": 0.0, "decode": 0.0, "mixed": 0.0, "idle": pytest.approx(3.0)}
    assert by == {(3, "B"): pytest.approx(3.0)}  # and no series appeared anywhere else


def test_b_itself_is_placed_on_its_gpu_and_may_narrow_but_not_leave_its_mapping(proc_root):
    m = mapper(proc_root, [("B", ("2", "3"))])
    assert gpus_of(m, decode(0, 1, service="B")) == (KEYS[2], KEYS[3])
    assert gpus_of(m, decode(0, 1, service="B", gpu_ids=("3",))) == (KEYS[3],)
    assert gpus_of(m, decode(0, 1, service="B", gpu_ids=("3", "4"))) == GPU_NOT_PERMITTED
    # The mapping is the operator's word: B's pid on GPU 0 does not widen it.
    assert gpus_of(m, decode(0, 1, service="B", pid=100, gpu_ids=("0",))) == GPU_NOT_PERMITTED


def test_claims_without_any_entitlement_are_refused_by_default_and_make_no_series(proc_root):
    # Before entitlements, a span naming GPUs 0-7 put time on all eight and created phase series
    # on GPUs nobody serves. Now it is counted, and those GPUs stay without series.
    m = mapper(proc_root)
    acc = accountant()
    feed(acc, [100, 101, 102])
    junk = [prefill(100.0, 102.0, service=f"junk-{n}", gpu_ids=tuple(str(i) for i in range(8))) for n in range(3)]
    junk.append(prefill(100.0, 102.0, service="junk-pid", pid=4242, gpu_ids=("1",)))  # pid on no GPU
    assert run(m, acc, junk) == {GPU_NOT_PERMITTED: 4}
    acc.advance(102 + SETTLE)
    assert acc.series() == ()


def test_trusted_claims_place_like_before_except_on_mapped_gpus(proc_root):
    m = mapper(proc_root, [("B", ("3",))], trust_span_gpus=True)
    assert gpus_of(m, decode(0, 1, service="custom", gpu_ids=("6", "7"))) == (KEYS[6], KEYS[7])
    assert gpus_of(m, decode(0, 1, service="custom", gpu_ids=("3", "7"))) == GPU_NOT_PERMITTED
    assert gpus_of(m, decode(0, 1, service="custom", gpu_ids=("GPU-nope",))) == "unknown_gpu"
    # A pid that resolves still bounds the claim, trusted or not.
    assert gpus_of(m, decode(0, 1, service="A", pid=100, gpu_ids=("7",))) == GPU_NOT_PERMITTED


def test_pid_entitles_its_gpus_and_a_claim_may_narrow_within_them(proc_root):
    m = mapper(proc_root)
    assert gpus_of(m, decode(0, 1, service="A", pid=100)) == (KEYS[0],)
    assert gpus_of(m, decode(0, 1, service="A", pid=100, gpu_ids=("0",))) == (KEYS[0],)
    assert gpus_of(m, decode(0, 1, service="A", pid=100, gpu_ids=("1",))) == GPU_NOT_PERMITTED
    assert gpus_of(m, decode(0, 1, service="A", pid=100, gpu_ids=("3",))) == GPU_NOT_PERMITTED  # B's process


def test_a_pod_entitles_the_gpus_of_its_other_containers(proc_root):
    # 300 and 400 are containers of one pod, on GPUs 4 and 5: a sender found on GPU 4 may name GPU
    # 5 too, and nothing outside the pod.
    m = mapper(proc_root)
    assert gpus_of(m, decode(0, 1, service="tp", pid=300)) == (KEYS[4],)
    assert gpus_of(m, decode(0, 1, service="tp", pid=300, gpu_ids=("4", "5"))) == (KEYS[4], KEYS[5])
    assert gpus_of(m, decode(0, 1, service="tp", pid=300, gpu_ids=("5", "6"))) == GPU_NOT_PERMITTED
    assert gpus_of(m, decode(0, 1, service="A", pid=100, gpu_ids=("5",))) == GPU_NOT_PERMITTED  # not its pod


def test_refusals_are_counted_per_window_in_the_agents_view(proc_root):
    agent = Agent(Config(phase_map=(("B", ("3",)),)))
    agent.mapper = SpanMapper((("B", ("3",)),), proc_root=proc_root, on_mapped=agent.accountant.mark_mapped)
    agent.mapper.update_gpus(snapshot(HOLDERS))
    agent._on_windows([decode(0.0, 1.0, service="A", gpu_ids=("3",)), prefill(0.0, 1.0, service="A", gpu_ids=("3",)),
                       decode(0.0, 1.0, service="C", gpu_ids=("7",)), decode(0.0, 1.0, service="B")])
    assert agent.view().spans.unmatched == {GPU_NOT_PERMITTED: 3}


def test_the_agent_wires_the_mapper_to_the_accountants_label_priority():
    agent = Agent(Config())
    agent.mapper.update_gpus(snapshot({}))
    agent._on_windows([decode(0.0, 1.0, service="B", gpu_ids=("3",))])
    assert agent.accountant.services() == {}  # refused: nothing reached the accountant
    agent = Agent(Config(phase_map=(("B", ("3",)),)))
    agent.mapper.update_gpus(snapshot({}))
    agent._on_windows([decode(0.0, 1.0, service="B")])
    assert agent.accountant.services() == {"B": "mapped"}  # placed by the map, before set_mapping ran


# --- 2. service label slots -----------------------------------------------------------------------------


def labels(acc: PhaseAccountant) -> set[str]:
    return {s.service for s in acc.series()}


def test_junk_services_cannot_evict_a_configured_services_label():
    acc = accountant(max_services=4)
    acc.set_mapping(KEYS[3], ["B"])
    feed(acc, [100, 101, 102], gpus=[3])
    acc.add_windows(KEYS[3], [decode(100.0 + n / 100, 100.01 + n / 100, service=f"junk-{n}") for n in range(50)])
    acc.add_windows(KEYS[3], [decode(101.0, 102.0, service="B")])
    acc.advance(102 + SETTLE)
    assert labels(acc) == {"B", OTHER_SERVICE} | {f"junk-{n}" for n in range(4)}
    assert {s.phase: s.seconds for s in acc.series() if s.service == "B"}["decode"] == pytest.approx(1.0)


def test_more_configured_services_than_slots_all_keep_their_labels():
    acc = accountant(max_services=1)
    acc.set_mapping(KEYS[0], ["a", "b", "c"])
    acc.add_windows(KEYS[0], [decode(1.0, 2.0, service="late")])
    assert {"a", "b", "c", "late"} <= labels(acc)


def test_a_mapped_service_takes_a_junk_slot_and_junk_never_takes_a_mapped_one(proc_root):
    # Junk with trusted claims fills every slot first; the pid-mapped real service still gets its
    # label (the least recently used junk slot is given up), and more junk then cannot take it back.
    acc = accountant(max_services=3)
    m = mapper(proc_root, trust_span_gpus=True, on_mapped=acc.mark_mapped)
    feed(acc, [100, 101, 102, 103])
    junk = [decode(100.0, 100.5 + n / 10, service=f"junk-{n}", gpu_ids=("7",)) for n in range(10)]
    assert run(m, acc, junk) == {}
    assert labels(acc) == {"junk-0", "junk-1", "junk-2", OTHER_SERVICE}
    assert run(m, acc, [decode(101.0, 102.0, service="real", pid=100)]) == {}
    assert run(m, acc, [decode(102.0, 102.5, service=f"junk-{n}", gpu_ids=("7",)) for n in range(10, 40)]) == {}
    assert run(m, acc, [decode(102.5, 103.0, service="real", pid=100)]) == {}
    acc.advance(103 + SETTLE)
    assert acc.services() == {"real": "mapped", "junk-1": "unmapped", "junk-2": "unmapped"}
    real = {s.phase: s.seconds for s in acc.series() if s.service == "real"}
    assert real["decode"] == pytest.approx(1.5)
    assert "real" not in {s.service for s in acc.series() if s.gpu == 7}


def test_only_junk_names_get_other_when_every_slot_is_mapped():
    acc = accountant(max_services=2)
    acc.mark_mapped({"m1", "m2"})
    acc.add_windows(KEYS[0], [decode(1.0, 2.0, service="m1"), decode(1.0, 2.0, service="m2")])
    acc.mark_mapped(set())
    acc.add_windows(KEYS[0], [decode(2.0, 3.0, service="junk")])
    assert acc.services() == {"m1": "mapped", "m2": "mapped"}
    assert set(acc.last_span()) == {(0, KEYS[0][1], "m1"), (0, KEYS[0][1], "m2"), (0, KEYS[0][1], OTHER_SERVICE)}


def test_unused_slots_expire_and_their_series_go_so_the_label_set_stays_bounded():
    ttl = 1000.0
    acc = accountant(max_services=2, service_ttl=ttl)
    feed(acc, [100, 101])
    acc.add_windows(KEYS[0], [decode(100.0, 100.5, service="old-a"), decode(100.5, 101.0, service="old-b")])
    acc.advance(101 + SETTLE)
    assert labels(acc) == {"old-a", "old-b"}
    # Much later, new services: the slots unused for longer than the ttl are handed over.
    later = 101 + ttl + 10
    feed(acc, [later, later + 1])
    acc.advance(later)
    acc.add_windows(KEYS[0], [decode(later, later + 1, service="new-a"), decode(later, later + 1, service="new-b"),
                              decode(later, later + 1, service="new-c")])
    acc.advance(later + 1 + SETTLE)
    assert labels(acc) == {"new-a", "new-b", OTHER_SERVICE}
    assert all(label[2] not in ("old-a", "old-b") for label in acc.last_span())


def test_a_displaced_services_series_stay_until_its_windows_are_counted():
    acc = accountant(max_services=1)
    feed(acc, [100, 101, 102])
    acc.add_windows(KEYS[0], [decode(100.0, 101.0, service="junk", tokens=7)])
    acc.mark_mapped({"real"})
    acc.add_windows(KEYS[0], [decode(101.0, 102.0, service="real")])
    acc.advance(102 + SETTLE)
    assert acc.services() == {"real": "mapped"}
    junk = {s.phase: s for s in acc.series() if s.service == "junk"}
    assert junk["decode"].tokens == 7 and junk["decode"].seconds == pytest.approx(1.0)
    acc.mark_mapped(set())
    acc.add_windows(KEYS[0], [decode(102.0, 102.5, service="junk")])  # now folded into other
    acc.advance(102.5 + SETTLE + RETENTION + 1)
    assert "junk" not in labels(acc)
    assert OTHER_SERVICE in labels(acc) and "real" in labels(acc)


def test_label_values_stay_bounded_under_a_rolling_flood():
    max_services = 4
    acc = accountant(max_services=max_services, service_ttl=0.0)  # the ttl is raised to retention + settle
    acc.set_mapping(KEYS[0], ["configured"])
    worst = 0
    for step in range(40):
        t = 100.0 + step * 100.0
        feed(acc, [t, t + 1], gpus=[0])
        acc.mark_mapped({f"mapped-{step}"} if step % 3 == 0 else set())
        acc.add_windows(KEYS[0], [decode(t, t + 0.5, service=f"mapped-{step}")]
                        + [decode(t + 0.5, t + 1, service=f"junk-{step}-{n}") for n in range(20)])
        acc.advance(t + 1 + SETTLE)
        worst = max(worst, len(labels(acc)))
    assert worst <= 1 + 2 * max_services + 1  # configured + slots + displaced ones still held + other


# --- 3. plausible token counts ---------------------------------------------------------------------------


def test_token_ceiling_is_a_base_plus_a_rate():
    assert token_ceiling(PREFILL, 0.0) == MAX_TOKENS_AT_ONCE[PREFILL]
    assert token_ceiling(DECODE, 2.0) == MAX_TOKENS_AT_ONCE[DECODE] + 2 * MAX_TOKENS_PER_SECOND[DECODE]


@pytest.mark.parametrize("phase, seconds, tokens, ok", [
    (PREFILL, 0.0, MAX_TOKENS_AT_ONCE[PREFILL], True),  # a whole long prompt from the prefix cache
    (PREFILL, 0.0, MAX_TOKENS_AT_ONCE[PREFILL] + 1, False),
    (PREFILL, 10.0, 10_000_000, True),
    (PREFILL, 0.001, 10**9, False),
    (DECODE, 0.0, 1, True),  # max_tokens=1: a zero-length decode window with its one token
    (DECODE, 0.01, 65_536, True),
    (DECODE, 0.01, 100_000, False),
    (DECODE, 60.0, 60 * 250_000, True),
    (DECODE, 60.0, 20_000_000, False),
])
def test_make_window_refuses_tokens_implausible_for_the_windows_length(phase, seconds, tokens, ok):
    build = lambda: make_window(phase, f.T0, f.T0 + seconds, bytes(24), ResourceInfo(), "generic", tokens)
    if ok:
        assert build().tokens == tokens
    else:
        with pytest.raises(InvalidSpan, match="implausible"):
            build()


def test_implausible_tokens_reject_the_span_and_say_why():
    spans = [f.vllm_span(prefill=0.1, prompt_tokens=5_000_000),
             f.vllm_span(decode=0.5, completion_tokens=10_000_000),
             f.span("step", f.T0, f.T0 + 0.001, {"gpuphase.phase": "decode", "gpuphase.tokens": 900_000}),
             f.vllm_span(prefill=0.2, prompt_tokens=120_000, completion_tokens=4000)]  # long but real
    outcome = decode_request(f.request(spans))
    assert outcome.rejected == {"invalid_window": 3}
    assert "implausible" in outcome.first_error
    assert sorted(w.tokens for w in outcome.windows) == [4000, 120_000]


def test_plausible_high_token_rates_are_kept_end_to_end(proc_root):
    # A batch step: 4096 requests decoding one token each in 20 ms (~200k tokens/s).
    step = f.span("step", f.T0, f.T0 + 0.02, {"gpuphase.phase": "decode", "gpuphase.tokens": 4096})
    outcome = decode_request(f.request([step], {"service.name": "batcher"}))
    assert outcome.rejected == {}
    m = mapper(proc_root, [("batcher", ("1",))])
    acc = accountant()
    feed(acc, [f.T0 - 1, f.T0 + 1], gpus=[1])
    assert run(m, acc, outcome.windows) == {}
    acc.advance(f.T0 + 1 + SETTLE)
    assert {s.phase: s.tokens for s in acc.series() if s.service == "batcher"}["decode"] == 4096


def test_docs_name_the_new_reason_and_the_ceilings():
    root = Path(__file__).resolve().parents[1]
    metrics_yaml = (root / "gpuphase/model/metrics.yaml").read_text()
    assert "gpu_not_permitted" in metrics_yaml
    security = (root / "docs/security.md").read_text()
    for needle in ("gpu_not_permitted", "## Request and connection limits", "internalTrafficPolicy: Local",
                   "NetworkPolicy", f"{MAX_TOKENS_PER_SECOND[PREFILL]:,.0f}"):
        assert needle in security, needle
