"""Decoders on spans shaped like each server's, plus the untrusted-input rules (attributes.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuphase.agent.spans.decoders import decode_request
from gpuphase.model.phase import DECODE, PREFILL
from tests import spanfactory as f
from tests.spanfactory import T0


def one_window_each(outcome):
    by_phase = {w.phase: w for w in outcome.windows}
    assert len(by_phase) == len(outcome.windows)
    return by_phase


def test_vllm_windows_rebuilt_from_latencies():
    span = f.vllm_span(ttft=0.3, prefill=0.2, decode=1.5, prompt_tokens=512, completion_tokens=128)
    outcome = decode_request(f.request([span], {"service.name": "llama", "vllm.process_id": 321,
                                                "gpuphase.gpu.ids": "GPU-aaaa,1"}))
    assert outcome.received == {"vllm": 1} and not outcome.rejected and not outcome.unmatched
    w = one_window_each(outcome)
    assert w[PREFILL].start == pytest.approx(T0 + 0.1) and w[PREFILL].end == pytest.approx(T0 + 0.3)
    assert w[DECODE].start == pytest.approx(T0 + 0.3) and w[DECODE].end == pytest.approx(T0 + 1.8)
    assert (w[PREFILL].tokens, w[DECODE].tokens) == (512, 128)
    assert {x.service for x in outcome.windows} == {"llama"}
    assert {x.pid for x in outcome.windows} == {321}
    assert {x.gpu_ids for x in outcome.windows} == {("GPU-aaaa", "1")}
    assert w[PREFILL].key == span.trace_id + span.span_id + b"prefill"
    assert w[DECODE].key != w[PREFILL].key


def test_vllm_new_token_names_win_over_old():
    span = f.vllm_span()
    span.attributes.extend(f.key_values({"gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 9}))
    w = one_window_each(decode_request(f.request([span])))
    assert (w[PREFILL].tokens, w[DECODE].tokens) == (7, 9)


def test_tensorrt_llm_style_span_without_model_times_falls_back_to_queue_ttft_e2e():
    span = f.vllm_span(prefill=None, decode=None, queue=0.05, ttft=0.3, e2e=1.7)
    w = one_window_each(decode_request(f.request([span])))
    assert (w[PREFILL].start, w[PREFILL].end) == pytest.approx((T0 + 0.05, T0 + 0.3))
    assert (w[DECODE].start, w[DECODE].end) == pytest.approx((T0 + 0.3, T0 + 1.7))


def test_vllm_span_without_ttft_is_unmatched_with_reason():
    span = f.span("llm_request", T0, T0 + 1, {"gen_ai.usage.prompt_tokens": 3})
    outcome = decode_request(f.request([span]))
    assert outcome.unmatched == {"no_time_to_first_token": 1} and not outcome.windows


@pytest.mark.parametrize("overrides, start", [
    ({"ttft": "0.3"}, T0),  # string instead of float
    ({"prefill": -0.1}, T0),
    ({"decode": math.nan}, T0),
    ({"decode": math.inf}, T0),
    ({"decode": 30.0}, T0),  # decode far longer than the request itself
    ({"ttft": 50.0}, T0),
    ({"prefill": 5.0}, T0),  # prefill starts long before the request arrived
    ({"prompt_tokens": -4}, T0),
    ({"completion_tokens": "many"}, T0),
    ({}, 1.0),  # 1970
    ({}, 4_200_000_000.0),  # after 2100
])
def test_vllm_absurd_values_are_rejected_as_invalid_window(overrides, start):
    outcome = decode_request(f.request([f.vllm_span(start=start, **overrides)]))
    assert outcome.rejected == {"invalid_window": 1}
    assert not outcome.windows and not outcome.received
    assert outcome.first_error.startswith("vllm:")


def test_small_clock_skew_is_clamped_into_the_span():
    # decode end 0.4 s past the span end (engine clock vs. API server clock): clamped, not rejected
    w = one_window_each(decode_request(f.request([f.vllm_span(duration=1.8, ttft=0.3, decode=1.9)])))
    assert w[DECODE].end == pytest.approx(T0 + 1.8)


def test_sglang_slices_become_windows_with_span_pid():
    spans = [f.sglang_span("prefill_forward", T0, 0.2, pid=11), f.sglang_span("chunked_prefill", T0 + 0.2, 0.1),
             f.sglang_span("decode_loop", T0 + 0.3, 2.0, pid=12), f.sglang_span("decode_waiting", T0, 0.1)]
    outcome = decode_request(f.request(spans, {"service.name": "sglang", "process.pid": 99}))
    assert outcome.received == {"sglang": 3} and outcome.unmatched == {"unknown_span": 1}
    got = [(w.phase, round(w.start - T0, 6), round(w.end - T0, 6), w.pid) for w in outcome.windows]
    assert got == [(PREFILL, 0.0, 0.2, 11), (PREFILL, 0.2, 0.3, 4242), (DECODE, 0.3, 2.3, 12)]


def test_sglang_garbled_pid_falls_back_to_resource_pid():
    outcome = decode_request(f.request([f.sglang_span("decode_loop", pid="x" * 40)], {"process.pid": 99}))
    assert [w.pid for w in outcome.windows] == [99]


def test_tgi_batch_spans_tokens_only_from_client_decode_size():
    spans = [f.tgi_span("prefill", client=False), f.tgi_span("prefill", client=True, size=4),
             f.tgi_span("decode", T0 + 0.05, client=False), f.tgi_span("decode", T0 + 0.05, client=True, size=4)]
    outcome = decode_request(f.request(spans, {"service.name": "text-generation-inference.router"}))
    assert outcome.received == {"tgi": 4}
    # One window per step, from the sharded client's span (tests/test_tgi_fidelity.py has the shapes).
    assert [(w.phase, w.tokens) for w in outcome.windows] == [(PREFILL, 0), (DECODE, 4)]


def test_spans_named_prefill_from_unknown_servers_are_not_tgi():
    outcome = decode_request(f.request([f.span("prefill", T0, T0 + 1)], {"service.name": "my-app"}))
    assert outcome.unmatched == {"unknown_span": 1} and not outcome.windows


def test_generic_convention_with_span_gpu_ids_and_tokens():
    span = f.span("my_forward", T0, T0 + 0.5, {"gpuphase.phase": "decode", "gpuphase.tokens": 32,
                                                "gpuphase.gpu.ids": ["GPU-1234", 3]})
    [w] = decode_request(f.request([span], {"service.name": "custom", "gpuphase.gpu.ids": "0"})).windows
    assert (w.phase, w.decoder, w.tokens, w.gpu_ids, w.service) == (DECODE, "generic", 32, ("GPU-1234", "3"), "custom")
    assert (w.start, w.end) == pytest.approx((T0, T0 + 0.5))


def test_generic_annotation_wins_over_server_shape():
    span = f.vllm_span()
    span.attributes.extend(f.key_values({"gpuphase.phase": "prefill"}))
    assert [w.decoder for w in decode_request(f.request([span])).windows] == ["generic"]


@pytest.mark.parametrize("attributes, resource", [
    ({"gpuphase.phase": "training"}, {}),
    ({"gpuphase.phase": "decode", "gpuphase.gpu.ids": "GPU-1,{evil=\"x\"}"}, {}),
    ({"gpuphase.phase": "decode", "gpuphase.gpu.ids": [str(i) for i in range(17)]}, {}),
    ({"gpuphase.phase": "decode"}, {"gpuphase.gpu.ids": 1.5}),
    ({"gpuphase.phase": "decode", "gpuphase.tokens": 1.5}, {}),
])
def test_generic_bad_values_rejected(attributes, resource):
    outcome = decode_request(f.request([f.span("x", T0, T0 + 1, attributes)], resource))
    assert outcome.rejected == {"invalid_window": 1} and not outcome.windows


def test_reversed_span_and_missing_ids_are_rejected():
    reversed_span = f.span("x", T0 + 1, T0, {"gpuphase.phase": "decode"})
    no_ids = f.span("x", T0, T0 + 1, {"gpuphase.phase": "decode"}, trace_id=b"", span_id=b"")
    assert decode_request(f.request([reversed_span, no_ids])).rejected == {"invalid_window": 2}


@pytest.mark.parametrize("service, expected", [("s" * 200, "s" * 128), ("s" * 10_000, "unknown_service")])
def test_long_service_names_are_capped(service, expected):
    assert {w.service for w in decode_request(f.request([f.vllm_span()], {"service.name": service})).windows} \
        == {expected}


def test_untrusted_sizes_are_bounded():
    overlong_phase = f.span("x", T0, T0 + 1, {"gpuphase.phase": "decode" + " " * 300})
    # the phase attribute hidden beyond the inspected prefix is not seen: unknown span, not a window
    padded = {f"pad.{i}": i for i in range(200)}
    padded["gpuphase.phase"] = "decode"
    hidden = f.span("x", T0, T0 + 1, padded)
    outcome = decode_request(f.request([overlong_phase, hidden]))
    assert outcome.rejected == {"invalid_window": 1}
    assert outcome.unmatched == {"unknown_span": 1}


def test_missing_service_name_is_unknown_service():
    [w, _] = decode_request(f.request([f.vllm_span()], {})).windows
    assert w.service == "unknown_service"


_attribute_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300), st.binary(max_size=8),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=5)), max_size=20),
)
_keys = st.sampled_from([
    "gen_ai.latency.time_to_first_token", "gen_ai.latency.time_in_model_prefill",
    "gen_ai.latency.time_in_model_decode", "gen_ai.latency.time_in_queue", "gen_ai.latency.e2e",
    "gen_ai.usage.prompt_tokens", "gen_ai.usage.output_tokens", "gpuphase.phase", "gpuphase.tokens",
    "gpuphase.gpu.ids", "pid", "size", "code.namespace",
])


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["llm_request", "prefill_forward", "decode_loop", "decode", "other"]),
       attributes=st.dictionaries(_keys, _attribute_values, max_size=8),
       resource=st.dictionaries(st.sampled_from(["service.name", "process.pid", "vllm.process_id",
                                                 "gpuphase.gpu.ids"]), _attribute_values, max_size=4),
       start=st.floats(min_value=-1e12, max_value=1e12), duration=st.floats(min_value=-10, max_value=1e6))
def test_fuzzed_attributes_only_ever_give_windows_or_counted_outcomes(name, attributes, resource, start, duration):
    attributes = {k: v for k, v in attributes.items() if v is not None}
    resource = {k: v for k, v in resource.items() if v is not None}
    start_ns = min(max(round(start * 1e9), 0), 2**64 - 1)
    end_ns = min(max(round((start + duration) * 1e9), 0), 2**64 - 1)
    span = f.span(name, 0, 0, attributes)
    span.start_time_unix_nano, span.end_time_unix_nano = start_ns, end_ns
    outcome = decode_request(f.request([span], resource))
    settled = sum(outcome.received.values()) + outcome.rejected_spans + sum(outcome.unmatched.values())
    assert settled == 1
    assert "decoder_error" not in outcome.rejected
    for w in outcome.windows:
        assert math.isfinite(w.start) and w.start <= w.end and w.tokens >= 0
