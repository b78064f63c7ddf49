"""Request budgets (agent/spans/budget.py), the span rate and the parse slots (receiver.py).

The budget scan must never undercount: for every input upb parses, the scan counts at least the
spans and items the parsed message holds (exactly as many for a message serialised by protobuf
itself), and it refuses as malformed only what upb refuses too. Hypothesis checks both on valid
requests of every shape, on raw wire data built field by field, and on random bytes; the cases
below them sit just under and just over each cap, for each path of the check (none, spans only,
full walk) and for OTLP/JSON.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    EntityRef,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from gpuphase.agent.config import OPTIONS_BY_FLAG, ConfigError, Setting, build_config
from gpuphase.agent.spans import budget
from gpuphase.agent.spans.budget import (
    TOO_MANY_ITEMS,
    TOO_MANY_SPANS,
    Counts,
    MalformedRequest,
    OverBudget,
    RequestBudget,
    check_json_body,
    check_protobuf,
    count_json_document,
    scan_protobuf,
)
from gpuphase.agent.spans.grpc_server import start_grpc_server
from gpuphase.agent.spans.otlp_json import parse_otlp_json
from gpuphase.agent.spans.receiver import BUSY, RATE_LIMITED, SpanIntake, parse_protobuf
from tests import spanfactory as f
from tests.wire import field, varint

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
UNLIMITED = RequestBudget(max_spans=2**62, max_items=2**62)


# --- the reference: what a full parse holds ------------------------------------------------------


def parsed_counts(message) -> Counts:
    """Spans and items of a parsed request, walked with ListFields (an independent count: every
    message present, a KeyValue's value counted with its KeyValue)."""
    counts = Counts()

    def walk(msg) -> None:
        for descriptor, value in msg.ListFields():
            if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            for child in (value if descriptor.is_repeated else [value]):
                if isinstance(child, Span):
                    counts.spans += 1
                elif not (isinstance(msg, KeyValue) and descriptor.name == "value"):
                    counts.items += 1
                walk(child)

    walk(message)
    return counts


def upb_parse(body: bytes) -> ExportTraceServiceRequest | None:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return None
    return request


# --- valid requests of every shape ---------------------------------------------------------------

scalar_values = st.one_of(
    st.just(AnyValue()),
    st.builds(lambda v: AnyValue(string_value=v), st.text(max_size=3)),
    st.builds(lambda v: AnyValue(string_value=v), st.sampled_from(["x" * 126, "x" * 127, "x" * 200])),
    st.builds(lambda v: AnyValue(int_value=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: AnyValue(double_value=v), st.floats(allow_nan=False)),
    st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
    st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=3)),
)


def _kv(key: str, value: AnyValue | None) -> KeyValue:
    return KeyValue(key=key) if value is None else KeyValue(key=key, value=value)


keys = st.one_of(st.text(max_size=2), st.sampled_from(["k" * 127, "k" * 128, "k" * 300]))
any_values = st.recursive(scalar_values, lambda children: st.one_of(
    st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(children, max_size=3)),
    st.builds(lambda kvs: AnyValue(kvlist_value=KeyValueList(values=kvs)),
              st.lists(st.builds(_kv, keys, st.none() | children), max_size=3)),
), max_leaves=8)
attributes = st.lists(st.builds(_kv, keys, st.none() | any_values), max_size=4)


@st.composite
def spans(draw) -> Span:
    span = Span(name=draw(st.text(max_size=2)), attributes=draw(attributes),
                events=[Span.Event(name="e", attributes=draw(attributes)) for _ in range(draw(st.integers(0, 2)))],
                links=[Span.Link(trace_id=b"\1" * 16, attributes=draw(attributes))
                       for _ in range(draw(st.integers(0, 2)))])
    if draw(st.booleans()):
        span.status.SetInParent()  # present though empty: a message all the same
    return span


@st.composite
def requests(draw) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        resource_spans = ResourceSpans()
        if draw(st.booleans()):
            resource_spans.resource.SetInParent()
            resource_spans.resource.attributes.extend(draw(attributes))
            resource_spans.resource.entity_refs.extend(EntityRef(type="t") for _ in range(draw(st.integers(0, 2))))
        for _ in range(draw(st.integers(0, 3))):
            scope_spans = ScopeSpans(spans=draw(st.lists(spans(), max_size=3)))
            if draw(st.booleans()):
                scope_spans.scope.CopyFrom(InstrumentationScope(name="s", attributes=draw(attributes)))
            resource_spans.scope_spans.append(scope_spans)
        request.resource_spans.append(resource_spans)
    return request


@settings(max_examples=300, deadline=None)
@given(request=requests())
def test_scan_counts_exactly_what_a_full_parse_holds(request):
    body = request.SerializeToString()
    expected = parsed_counts(ExportTraceServiceRequest.FromString(body))
    assert scan_protobuf(body) == expected
    document = json_format.MessageToDict(request)
    assert count_json_document(document) == expected
    assert count_json_document(json_format.MessageToDict(request, preserving_proto_field_name=True)) == expected
    # every cap just at the count passes; one below is refused, whatever path the check takes
    check_protobuf(body, RequestBudget(max(expected.spans, 1), max(expected.items, 1)))
    if expected.spans > 1:
        with pytest.raises(OverBudget) as refused:
            check_protobuf(body, RequestBudget(expected.spans - 1, 2**40))
        assert refused.value.reason == TOO_MANY_SPANS
    if expected.items > 1:
        with pytest.raises(OverBudget) as refused:
            scan_protobuf(body, RequestBudget(2**40, expected.items - 1))
        assert refused.value.reason == TOO_MANY_ITEMS


@settings(max_examples=100, deadline=None)
@given(first=requests(), second=requests())
def test_concatenated_requests_merge_and_the_scan_adds_them_up(first, second):
    body = first.SerializeToString() + second.SerializeToString()  # protobuf: concatenation is a merge
    total = scan_protobuf(body)
    assert total == parsed_counts(ExportTraceServiceRequest.FromString(body))
    parts = [scan_protobuf(request.SerializeToString()) for request in (first, second)]
    assert total.spans == parts[0].spans + parts[1].spans


# --- raw wire data: the scan is never stricter than upb and never counts less ---------------------


def _raw_fields(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    numbers = st.one_of(st.integers(0, 16), st.sampled_from([2**29 - 1, 2**29, 2**32]))
    scalar = st.tuples(numbers, st.sampled_from([0, 1, 3, 4, 5, 6, 7]), st.binary(max_size=10)).map(
        lambda t: varint(t[0] << 3 | t[1]) + t[2])
    nested = st.tuples(numbers, children).map(lambda t: varint(t[0] << 3 | 2) + varint(len(t[1])) + t[1])
    odd_length = st.tuples(numbers, children, st.integers(-2, 2)).map(
        lambda t: varint(t[0] << 3 | 2) + varint(max(len(t[1]) + t[2], 0)) + t[1])
    group = st.tuples(numbers, children).map(lambda t: varint(t[0] << 3 | 3) + t[1] + varint(t[0] << 3 | 4))
    overlong_tag = st.tuples(st.integers(1, 16), children).map(
        lambda t: bytes([(t[0] << 3 | 2) | 0x80, 0]) + varint(len(t[1])) + t[1])
    return st.lists(st.one_of(scalar, nested, odd_length, group, overlong_tag), max_size=5).map(b"".join)


raw_messages = st.recursive(st.just(b""), _raw_fields, max_leaves=25)


def assert_scan_agrees_with_upb(body: bytes) -> None:
    parsed = upb_parse(body)
    try:
        counts = scan_protobuf(body)
    except MalformedRequest:
        assert parsed is None, "the scan refused what upb parses"
        return
    if parsed is not None:
        expected = parsed_counts(parsed)
        assert counts.spans >= expected.spans and counts.items >= expected.items, (counts, expected)
        # and the checks on their shortcut paths agree with it
        if expected.spans > 1:
            with pytest.raises(OverBudget):
                check_protobuf(body, RequestBudget(expected.spans - 1, 2**40))
        if expected.items > 1:
            with pytest.raises(OverBudget):
                check_protobuf(body, RequestBudget(2**40, expected.items - 1))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=raw_messages)
@example(body=field(1, field(2, field(2, field(9, field(1, b"k") + field(2, field(5, field(1, b"") * 3)))))))
def test_scan_of_raw_wire_data_never_undercounts_nor_refuses_more_than_upb(body):
    assert_scan_agrees_with_upb(body)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=256))
def test_scan_of_random_bytes_agrees_with_upb(body):
    assert_scan_agrees_with_upb(body)


@pytest.mark.parametrize("key_length", [126, 127, 128, 129, 200])
def test_the_plain_attribute_fast_path_is_not_fooled_by_a_two_byte_length(key_length):
    """A key length of two bytes read as one would point into the key; make the key look like a
    plain value there, and hide a real array after it: the scan must still find the array."""
    array = field(5, field(1, b"") * 4)  # AnyValue.array_value holding four empty AnyValues
    real_value = field(2, array)
    key = bytearray(b"a" * key_length)
    if key_length >= 128:  # what the one-byte reading would take for "value": 12 <len> 21 <8 bytes>
        fake_at = (key_length & 0x7F) + 2 - 3  # buf[pos + 2 + first length byte], within the key
        if 0 <= fake_at < key_length - 2:
            key[fake_at:fake_at + 2] = bytes([0x12, 9])
    kv = field(1, bytes(key)) + real_value
    body = field(1, field(2, field(2, field(9, kv))))
    expected = parsed_counts(ExportTraceServiceRequest.FromString(body))
    assert expected.items == 3 + 1 + 4  # rs, ss, kv; the ArrayValue; its four values
    assert scan_protobuf(body) == expected


@pytest.mark.parametrize("depth, parses", [(31, True), (32, False)])
def test_nesting_beyond_upbs_limit_is_malformed_for_the_scan_too(depth, parses):
    """request 0 > resource_spans 1 > scope_spans 2 > span 3 > attribute 4 > its value 5, then 3
    levels per kvlist (KeyValueList, KeyValue, AnyValue) and an array of one value: 31 kvlists put
    that value at depth 100, the deepest upb parses."""
    value = field(5, field(1, b""))  # AnyValue.array_value holding one empty AnyValue
    for _ in range(depth):  # AnyValue.kvlist_value -> KeyValueList.values -> KeyValue.value
        value = field(6, field(1, field(1, b"k") + field(2, value)))
    body = in_span(field(9, field(2, value)))
    assert (upb_parse(body) is not None) is parses
    if parses:
        assert scan_protobuf(body) == parsed_counts(upb_parse(body))
    else:  # the scan refuses it itself (were it not to, upb would)
        with pytest.raises(MalformedRequest):
            scan_protobuf(body)


# --- just under and just over each cap -----------------------------------------------------------

EMPTY = b""


def in_span(payload: bytes) -> bytes:
    return field(1, field(2, field(2, payload)))


# (name, unit, wrap(units) -> body, spans per unit, items per unit, fixed (spans, items) of the wrapper).
# A singular message sent again merges into the first when parsed: the scan counts every copy
# (upb did allocate for them), so "repeated empty status" is where the scan counts more.
SHAPES = [
    ("empty spans", field(2, EMPTY), lambda u: field(1, field(2, u)), 1, 0, (0, 2)),
    ("empty resource_spans", field(1, EMPTY), lambda u: u, 0, 1, (0, 0)),
    ("empty scope_spans", field(2, EMPTY), lambda u: field(1, u), 0, 1, (0, 1)),
    ("empty attributes", field(9, EMPTY), in_span, 0, 1, (1, 2)),
    ("attributes with empty values", field(9, field(2, EMPTY)), in_span, 0, 1, (1, 2)),
    ("empty events", field(11, EMPTY), in_span, 0, 1, (1, 2)),
    ("empty links", field(13, EMPTY), in_span, 0, 1, (1, 2)),
    ("repeated empty status", field(15, EMPTY), in_span, 0, 1, (1, 2)),
    ("empty values in an array", field(1, EMPTY),
     lambda u: in_span(field(9, field(2, field(5, u)))), 0, 1, (1, 4)),
    ("empty kvlist entries", field(1, EMPTY), lambda u: in_span(field(9, field(2, field(6, u)))), 0, 1, (1, 4)),
    ("empty resource attributes", field(1, EMPTY), lambda u: field(1, field(1, u)), 0, 1, (0, 2)),
    ("empty entity refs", field(3, EMPTY), lambda u: field(1, field(1, u)), 0, 1, (0, 2)),
    ("event attributes", field(3, field(1, b"k") + field(2, field(3, b"\x01"))),
     lambda u: in_span(field(11, u)), 0, 1, (1, 3)),
]


@pytest.mark.parametrize("name, unit, wrap, spans_each, items_each, fixed", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("cap", [300, 5000])
def test_just_under_and_just_over_each_cap(name, unit, wrap, spans_each, items_each, fixed, cap):
    fixed_spans, fixed_items = fixed
    kind = "spans" if spans_each else "items"
    fixed_kind = fixed_spans if spans_each else fixed_items
    n = cap - fixed_kind  # units that bring the count to exactly the cap
    generous = 10**9
    for units, over in ((n, False), (n + 1, True)):
        body = wrap(unit * units)
        counts, parsed = scan_protobuf(body), parsed_counts(ExportTraceServiceRequest.FromString(body))
        if name == "repeated empty status":
            assert parsed.items == fixed_items + 1 and counts.spans == parsed.spans
        else:
            assert counts == parsed
        assert getattr(counts, kind) == cap + over
        budget_ = RequestBudget(cap, generous) if spans_each else RequestBudget(generous, cap)
        if over:
            with pytest.raises(OverBudget) as refused:
                parse_protobuf(body, budget_)
            assert refused.value.reason == (TOO_MANY_SPANS if spans_each else TOO_MANY_ITEMS)
            assert (budget.SPANS_FLAG if spans_each else budget.ITEMS_FLAG) in str(refused.value)
        else:
            parse_protobuf(body, budget_)


def test_the_check_takes_the_cheap_path_only_where_the_caps_cannot_be_reached(monkeypatch):
    walked = []
    monkeypatch.setattr(budget, "scan_protobuf", lambda body, b=None: walked.append("full") or Counts())
    monkeypatch.setattr(budget, "_count_spans_only", lambda body, cap: walked.append("spans") or 0)
    small = RequestBudget(max_spans=100, max_items=1000)
    check_protobuf(b"\x0a\x00" * 100, small)  # 200 bytes: at most 100 of anything
    assert walked == []
    check_protobuf(b"\x0a\x00" * 101, small)  # could exceed the span cap, not the item cap
    assert walked == ["spans"]
    check_protobuf(b"\x0a\x00" * 1001, small)
    assert walked == ["spans", "full"]


def test_the_span_only_walk_counts_spans_across_resources_and_scopes():
    scope = field(1, field(1, b"name")) + field(2, EMPTY) * 3 + field(3, b"url")
    body = field(1, field(1, EMPTY) + field(2, scope) * 2) * 5
    assert budget._count_spans_only(body, 10**6) == 30 == scan_protobuf(body).spans
    assert budget._count_spans_only(body, 7) == 8  # stops one past the cap
    with pytest.raises(MalformedRequest):
        budget._count_spans_only(body[:-1], 10**6)


def test_the_two_million_empty_span_request_is_refused_before_parsing(monkeypatch):
    body = field(1, field(2, b"\x12\x00" * ((4 * 1024 * 1024 - 16) // 2)))
    monkeypatch.setattr(ExportTraceServiceRequest, "ParseFromString",
                        lambda self, data: pytest.fail("parsed"), raising=False)
    with pytest.raises(OverBudget) as refused:
        parse_protobuf(body)
    assert refused.value.reason == TOO_MANY_SPANS
    assert "--otlp.max-spans-per-request" in str(refused.value)


def otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as an exporter sends it: hex trace and span ids."""
    document = json_format.MessageToDict(request)
    for resource_spans, rs in zip(document.get("resourceSpans", []), request.resource_spans):
        for scope_spans, ss in zip(resource_spans.get("scopeSpans", []), rs.scope_spans):
            for span, message in zip(scope_spans.get("spans", []), ss.spans):
                span["traceId"], span["spanId"] = message.trace_id.hex(), message.span_id.hex()
    return json.dumps(document).encode()


def test_ordinary_traffic_fits_the_default_budget():
    """vLLM's batches (512 spans, ~20 attributes) and a 4 MiB request of ordinary spans."""
    def vllm(extra: int) -> Span:
        span = f.vllm_span()
        span.attributes.extend(KeyValue(key=f"gen_ai.extra.attribute_{i}", value=AnyValue(double_value=1.5))
                               for i in range(extra))
        return span

    resource = {"service.name": "vllm", "process.pid": 1}
    for extra, count in ((10, 512), (0, 9_000), (10, 4_800)):
        body = f.request([vllm(extra) for _ in range(count)], resource=resource).SerializeToString()
        assert len(body) <= 4.5 * 1024 * 1024
        assert len(parse_protobuf(body).resource_spans[0].scope_spans[0].spans) == count
    for extra, count in ((10, 512), (0, 4_300), (10, 2_500)):  # OTLP/JSON: 4 MiB of ordinary spans too
        body = otlp_json(f.request([vllm(extra) for _ in range(count)], resource=resource))
        assert len(body) <= 4 * 1024 * 1024
        assert len(parse_otlp_json(body).resource_spans[0].scope_spans[0].spans) == count


# --- OTLP/JSON -----------------------------------------------------------------------------------


def json_spans(n: int) -> bytes:
    return b'{"resourceSpans":[{"scopeSpans":[{"spans":[' + b",".join([b"{}"] * n) + b"]}]}]}"


def test_json_is_bounded_before_json_loads(monkeypatch):
    body = json_spans(1_398_000)  # 4 MiB of `{}` spans
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("json.loads ran"))
    with pytest.raises(OverBudget) as refused:
        parse_otlp_json(body)
    assert refused.value.reason == TOO_MANY_ITEMS and "--otlp.max-items-per-request" in str(refused.value)


@pytest.mark.parametrize("junk", [b'"ab"', b"1000", b"{}", b"[]", b'{"a":1}'])
def test_json_token_cap_just_under_and_over(junk):
    small = RequestBudget(max_spans=10, max_items=500)
    tokens_each = sum(junk.count(c) for c in (b",", b":", b"{", b"[")) + 1  # + the comma after it
    head, tail = b'{"x":[', b"]}"  # an unknown field: json.loads builds it, ParseDict ignores it
    fixed = 3  # `{`, `:`, `[`
    n = (small.max_json_tokens - fixed + 1) // tokens_each
    for units in (n, n + 1):
        body = head + b",".join([junk] * units) + tail
        tokens = sum(body.count(c) for c in (b",", b":", b"{", b"["))
        if tokens <= small.max_json_tokens:
            parse_otlp_json(body, small)
        else:
            with pytest.raises(OverBudget):
                check_json_body(body, small)
    assert tokens > small.max_json_tokens  # the last one was over


def test_json_document_caps_are_the_protobuf_caps():
    small = RequestBudget(max_spans=10, max_items=100)
    parse_otlp_json(json_spans(10), small)
    with pytest.raises(OverBudget) as refused:
        parse_otlp_json(json_spans(11), small)
    assert refused.value.reason == TOO_MANY_SPANS
    attrs = b",".join([b'{"key":"k","value":{"intValue":"1"}}'] * 98)  # + resource_spans and scope_spans
    body = b'{"resource_spans":[{"scopeSpans":[{"spans":[{"attributes":[' + attrs + b"]}]}]}]}"
    document = json.loads(body)
    assert count_json_document(document, small) == Counts(spans=1, items=100)
    protobuf = json_format.ParseDict(document, ExportTraceServiceRequest()).SerializeToString()
    assert scan_protobuf(protobuf) == Counts(spans=1, items=100)
    document["resource_spans"][0]["scopeSpans"][0]["spans"][0]["events"] = [{}]
    with pytest.raises(OverBudget) as refused:
        count_json_document(document, small)
    assert refused.value.reason == TOO_MANY_ITEMS
    # ... and before either, the token bound: 7 tokens an attribute, 2 allowed per item
    with pytest.raises(OverBudget, match="JSON values"):
        parse_otlp_json(body, small)


def test_json_still_converts_hex_ids_and_refuses_junk():
    span = f.vllm_span()
    document = json_format.MessageToDict(f.request([span]))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = span.trace_id.hex()
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = span.span_id.hex()
    request = parse_otlp_json(json.dumps(document).encode())
    assert request.resource_spans[0].scope_spans[0].spans[0].trace_id == span.trace_id
    for junk in (b"{not json", b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}', b"[" * 100_000):
        with pytest.raises(MalformedRequest):
            parse_otlp_json(junk)


# --- the span rate and the parse slots -----------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_span_rate_is_a_token_bucket_shared_by_every_request(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    windows = []
    intake = SpanIntake(windows.extend, max_spans_per_second=10)
    five = f.request([f.vllm_span() for _ in range(5)])
    assert not intake.submit(five).queue_full
    assert not intake.submit(five).queue_full  # the bucket held 10
    refused = intake.submit(five)
    assert refused.queue_full and "--otlp.max-spans-per-second" in refused.message
    assert intake.stats().rejected == {RATE_LIMITED: 5}
    clock.now += 0.5  # 5 more tokens
    assert not intake.submit(five).queue_full
    assert intake.submit(five).queue_full
    clock.now += 10  # refills to one second's worth, no more
    big = f.request([f.vllm_span() for _ in range(25)])
    assert not intake.submit(big).queue_full  # a full bucket takes any request, going into debt
    clock.now += 1.0
    assert intake.submit(five).queue_full  # 10 - 25 + 10 = -5
    assert intake.stats().rejected == {RATE_LIMITED: 15}
    assert intake.stats().received == {"vllm": 40}


def test_rate_limit_zero_is_off_and_the_default_does_not_bite():
    for rate in (0, None):
        intake = SpanIntake(lambda w: None, queue_size=1000, max_queued_windows=10**6,
                            **({} if rate is None else {"max_spans_per_second": rate}))
        batch = f.request([f.vllm_span() for _ in range(512)])
        results = [intake.submit(batch).queue_full for _ in range(100)]  # 51,200 spans at once
        assert not any(results)


def test_parse_slots_bound_concurrent_parses_and_the_rest_get_retry_later():
    intake = SpanIntake(lambda w: None, parse_slots=2, parse_wait=0.2)
    body = f.request([f.vllm_span()]).SerializeToString()
    entered, release = threading.Barrier(3), threading.Event()
    inside = []

    def slow_parse(data, budget_):
        inside.append(1)
        entered.wait(5)
        release.wait(5)
        return parse_protobuf(data, budget_)

    threads = [threading.Thread(target=intake.handle, args=(body, slow_parse)) for _ in range(2)]
    for thread in threads:
        thread.start()
    entered.wait(5)  # both slots taken
    started = time.monotonic()
    busy = intake.handle(body, parse_protobuf)
    assert busy.queue_full and "--otlp.max-concurrent-parses" in busy.message
    assert 0.15 < time.monotonic() - started < 5
    assert intake.stats().rejected == {BUSY: 1}
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(inside) == 2
    assert not intake.handle(body, parse_protobuf).queue_full  # slots given back
    with pytest.raises(OverBudget):  # and given back when the parse raises
        intake.handle(body * 3, lambda data, b: parse_protobuf(data, RequestBudget(1, 1)))
    assert not intake.handle(body, parse_protobuf).queue_full
    assert not intake.handle(body, parse_protobuf).queue_full


def test_grpc_answers_over_budget_and_rate_limited_as_the_spec_says():
    intake = SpanIntake(lambda w: None, max_spans_per_request=4, max_spans_per_second=6)
    intake.start()
    server = start_grpc_server(intake, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    export = channel.unary_unary(EXPORT)
    try:
        too_many = f.request([f.span("x", f.T0, f.T0 + 1) for _ in range(40)]).SerializeToString()
        with pytest.raises(grpc.RpcError) as refused:
            export(too_many, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--otlp.max-spans-per-request" in refused.value.details()
        assert "grpc-status-details-bin" not in dict(refused.value.trailing_metadata() or ())  # not retryable
        four = f.request([f.vllm_span() for _ in range(4)]).SerializeToString()
        export(four, timeout=10)
        with pytest.raises(grpc.RpcError) as throttled:
            export(four, timeout=10)
        assert throttled.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "--otlp.max-spans-per-second" in throttled.value.details()
        details = dict(throttled.value.trailing_metadata())["grpc-status-details-bin"]
        assert status_pb2.Status.FromString(details).details[0].type_url.endswith("google.rpc.RetryInfo")
        assert intake.stats().rejected == {TOO_MANY_SPANS: 1, RATE_LIMITED: 4}
    finally:
        channel.close()
        server.stop()
        intake.stop()


# --- configuration -------------------------------------------------------------------------------


def test_flags_exist_with_help_and_reach_the_intake():
    from gpuphase.agent.app import Agent

    for flag in ("otlp.max-spans-per-request", "otlp.max-items-per-request", "otlp.max-spans-per-second",
                 "otlp.max-concurrent-parses", "otlp.grpc-max-concurrent-rpcs"):
        assert OPTIONS_BY_FLAG[flag].help
    config = build_config([{"otlp.max-spans-per-request": Setting("100", "flag"),
                            "otlp.max-items-per-request": Setting("2000", "flag"),
                            "otlp.max-concurrent-parses": Setting("3", "flag")}])
    agent = Agent(config)
    assert agent.intake.budget == RequestBudget(100, 2000) and agent.intake.parse_slots == 3
    default = Agent(build_config([]))
    assert default.intake.budget == budget.DEFAULT_BUDGET
    for flag in ("otlp.max-spans-per-request", "otlp.max-items-per-request", "otlp.max-concurrent-parses",
                 "otlp.grpc-max-concurrent-rpcs"):
        with pytest.raises(ConfigError, match=flag):
            build_config([{flag: Setting("0", "flag")}])
    build_config([{"otlp.max-spans-per-second": Setting("0", "flag")}])  # 0: no limit


def test_reasons_are_documented():
    from gpuphase.model.metricdefs import load

    help_text = load()["gpu_spans_rejected_total"].help
    for reason in (TOO_MANY_SPANS, TOO_MANY_ITEMS, RATE_LIMITED, BUSY):
        assert reason in help_text
