"""Hostile input against the running agent: OTLP payloads and config files.

tests/test_otlp_receiver.py fuzzes the receivers in-process with random bytes and checks the
documented refusals. This module aims at what random bytes rarely reach, against a real agent
subprocess (so a crash is a dead process and memory is the process's real RSS):
structurally valid OTLP whose *content* is hostile (every gen_ai.* attribute with every wrong
type, NaN/inf/negative latencies, timestamps from 1970 to 2100 and beyond, deep AnyValue
nesting, megabyte strings, 100k attributes on one span) and compression bombs on both transports.

Oracles, for every request: a protocol-correct answer (HTTP 200/400/413 in the request's
content type; gRPC OK/INVALID_ARGUMENT/RESOURCE_EXHAUSTED), no decoder exception
(rejected{reason="decoder_error"} stays absent), every exported value finite, the agent alive and
ready, and its RSS within a wide margin of where it started.
"""

from __future__ import annotations

import gzip
import http.client
import json
import math
import time

import grpc
import pytest
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.config import OPTIONS, ConfigError
from tests import spanfactory as f
from tests.agentproc import AgentProcess, poll
from tests.wire import field

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF, JSON = "application/x-protobuf", "application/json"
MIB = 1024 * 1024
MAX_REQUEST = 4 * MIB  # the agent's default --otlp.max-request-size
# Generous on purpose: the point is "bounded", not a budget. A leak of the payloads below (many
# MiB each, hundreds of them) or an inflated gzip bomb (1 GiB) would blow far through it.
RSS_GROWTH_LIMIT = 300 * MIB
SERVICE = "fuzz"

# Every attribute a decoder reads, so that wrong types hit real code paths.
DECODER_ATTRIBUTES = (
    "gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token", "gen_ai.latency.e2e",
    "gen_ai.latency.time_in_model_prefill", "gen_ai.latency.time_in_model_decode",
    "gen_ai.latency.time_in_model_inference", "gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.request.id", "gen_ai.request.max_tokens",
    "gen_ai.request.temperature", "gen_ai.request.top_p", "gen_ai.request.n", "gen_ai.request.model",
    "gpuphase.phase", "gpuphase.tokens", "gpuphase.gpu.ids", "pid", "tp_rank", "host_id", "code.namespace",
    "id", "size",
)
RESOURCE_ATTRIBUTES = ("service.name", "vllm.process_id", "process.pid", "gpuphase.gpu.ids")
SPAN_NAMES = ("llm_request", "prefill", "decode", "prefill_forward", "chunked_prefill", "decode_loop", "generate",
              "Req 1", "")
NOW = time.time()
YEAR_2100_NS = 4_102_444_800 * 10**9
INTERESTING_NS = (0, 1, 10**9, int((NOW - 3) * 1e9), int(NOW * 1e9), YEAR_2100_NS, 2**63 - 1, 2**64 - 1)


class OtlpClient:
    """Raw HTTP and gRPC requests to one agent; every answer is checked to be protocol-correct."""

    def __init__(self, agent: AgentProcess):
        self.agent = agent
        self.channel = grpc.insecure_channel(agent.otlp_grpc_address)
        self.export = self.channel.unary_unary(EXPORT)

    def post(self, body: bytes, content_type: str = PROTOBUF, headers: dict | None = None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.agent.otlp_http_port, timeout=60)
        try:
            connection.request("POST", "/v1/traces", body=body, headers={"Content-Type": content_type, **(headers or {})})
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        status = response.status
        assert status in (200, 400, 413), (status, payload[:200])
        answer_type = content_type if content_type in (PROTOBUF, JSON) else PROTOBUF
        assert response.getheader("Content-Type") == answer_type
        if answer_type == JSON:
            document = json.loads(payload)
            assert status == 200 or document["message"]
        elif status == 200:
            ExportTraceServiceResponse.FromString(payload)
        else:
            assert status_pb2.Status.FromString(payload).message
        return status

    def grpc(self, body: bytes, compression: grpc.Compression | None = None) -> grpc.StatusCode:
        try:
            ExportTraceServiceResponse.FromString(self.export(body, timeout=60, compression=compression))
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), code
        return code

    def both(self, body: bytes) -> tuple[int, grpc.StatusCode]:
        return self.post(body), self.grpc(body)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def agent():
    args = ["--backend", "sim", "--sim.gpus", "1", "--sample.interval", "100ms", "--phase.map", f"{SERVICE}=0",
            "--phase.settle", "1s", "--phase.retention", "10s"]
    with AgentProcess(args) as process:
        process.baseline_rss = process.process().memory_info().rss
        yield process


@pytest.fixture(scope="module")
def client(agent):
    c = OtlpClient(agent)
    c.both(f.request([f.vllm_span(start=NOW - 3)], resource={"service.name": SERVICE}).SerializeToString())
    agent.baseline_rss = max(agent.baseline_rss, agent.process().memory_info().rss)  # after the first request
    yield c
    c.close()


def assert_healthy(agent: AgentProcess) -> None:
    """Alive, ready, every exported value finite, no decoder crash, RSS bounded."""
    metrics = agent.assert_answering()
    for samples in metrics.values():
        for sample in samples:
            assert math.isfinite(sample.value), sample
    assert metrics.samples("gpu_spans_rejected_total", reason="decoder_error") == [], "a decoder raised"
    growth = agent.process().memory_info().rss - agent.baseline_rss
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / MIB:.0f} MiB"


# --- wire-format building blocks (hand-encoded where protobuf's own encoder refuses the shape) ----


def request_with_span(span_bytes: bytes, service: str = SERVICE) -> bytes:
    """ExportTraceServiceRequest{resource_spans{resource{service.name}, scope_spans{spans}}} by hand."""
    resource = f.request([], resource={"service.name": service}).resource_spans[0].resource.SerializeToString()
    return field(1, field(1, resource) + field(2, field(2, span_bytes)))


def nested_any_value(depth: int, kind: str) -> bytes:
    """AnyValue nested `depth` levels through arrays or kvlists, built inside out as raw bytes."""
    value = AnyValue(string_value="leaf").SerializeToString()
    for _ in range(depth):
        if kind == "array":  # AnyValue.array_value(5) -> ArrayValue.values(1)
            value = field(5, field(1, value))
        else:  # AnyValue.kvlist_value(6) -> KeyValueList.values(1) -> KeyValue{key(1), value(2)}
            value = field(6, field(1, field(1, b"k") + field(2, value)))
    return value


def vllm_span_bytes(extra_attributes: bytes = b"", **overrides) -> bytes:
    return f.vllm_span(start=NOW - 3, **overrides).SerializeToString() + extra_attributes


def attribute(key: str, value_bytes: bytes) -> bytes:
    """Span.attributes(9) entry: KeyValue{key, value}."""
    return field(9, field(1, key.encode()) + field(2, value_bytes))


# --- structured hostile content ------------------------------------------------------------------


def any_values(max_leaves: int = 8) -> st.SearchStrategy[AnyValue]:
    scalars = st.one_of(
        st.builds(lambda v: AnyValue(string_value=v), st.text(max_size=20)),
        st.sampled_from([AnyValue(string_value=s) for s in ("0.5", "nan", "inf", "-1", "1e999", "0,1", "GPU-x")]),
        st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
        st.builds(lambda v: AnyValue(int_value=v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: AnyValue(double_value=v), st.floats(allow_nan=True, allow_infinity=True)),
        st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=16)),
        st.just(AnyValue()),  # a value with no member set
    )
    return st.recursive(scalars, lambda children: st.one_of(
        st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(children, max_size=3)),
        st.builds(lambda vs: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=f"k{i}", value=v)
                                                                         for i, v in enumerate(vs)])),
                  st.lists(children, max_size=3)),
    ), max_leaves=max_leaves)


attribute_lists = st.lists(st.tuples(st.sampled_from(DECODER_ATTRIBUTES), any_values()), max_size=10)


@st.composite
def hostile_spans(draw) -> Span:
    start, end = draw(st.sampled_from(INTERESTING_NS)), draw(st.sampled_from(INTERESTING_NS))
    return Span(
        name=draw(st.sampled_from(SPAN_NAMES)), kind=draw(st.sampled_from([0, 1, 2, 3])),
        trace_id=draw(st.sampled_from([b"", b"\1" * 16, b"\2" * 7])), span_id=draw(st.sampled_from([b"", b"\3" * 8])),
        start_time_unix_nano=start, end_time_unix_nano=end,
        attributes=[KeyValue(key=k, value=v) for k, v in draw(attribute_lists)],
    )


@st.composite
def hostile_requests(draw) -> bytes:
    spans = draw(st.lists(hostile_spans(), min_size=1, max_size=4))
    request = f.request(spans, resource={})
    resource = request.resource_spans[0].resource
    for key in draw(st.lists(st.sampled_from(RESOURCE_ATTRIBUTES), max_size=3, unique=True)):
        value = draw(st.one_of(st.just(AnyValue(string_value=SERVICE)), any_values(4)))
        resource.attributes.append(KeyValue(key=key, value=value))
    return request.SerializeToString()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=hostile_requests())
def test_wrong_types_and_odd_timestamps_are_answered_not_crashed_on(agent, client, body):
    http_status, grpc_code = client.both(body)
    # Structurally valid OTLP is always accepted; bad spans are refused one by one (partial_success).
    assert (http_status, grpc_code) == (200, grpc.StatusCode.OK)


def test_hostile_content_leaves_the_agent_healthy(agent, client):
    """Runs after the property test above (module order) and checks what it left behind."""
    assert_healthy(agent)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 1e308, -0.0])
def test_non_finite_and_negative_latencies_are_rejected_per_span(agent, client, value):
    spans = [f.vllm_span(start=NOW - 3, ttft=value), f.vllm_span(start=NOW - 3, decode=value),
             f.vllm_span(start=NOW - 3, prefill=value, e2e=value)]
    body = f.request(spans, resource={"service.name": SERVICE}).SerializeToString()
    assert client.both(body) == (200, grpc.StatusCode.OK)
    assert_healthy(agent)


@pytest.mark.parametrize("start_ns, end_ns", [(0, 10**9), (10**9, 0), (YEAR_2100_NS, YEAR_2100_NS + 10**9),
                                              (2**64 - 1, 2**64 - 1), (0, 2**64 - 1)])
def test_timestamps_far_in_the_past_or_future(agent, client, start_ns, end_ns):
    vllm = f.vllm_span()
    vllm.start_time_unix_nano, vllm.end_time_unix_nano = start_ns, end_ns
    generic = f.span("work", 0, 0, {"gpuphase.phase": "prefill", "gpuphase.tokens": 10})
    generic.start_time_unix_nano, generic.end_time_unix_nano = start_ns, end_ns
    body = f.request([vllm, generic], resource={"service.name": SERVICE}).SerializeToString()
    assert client.both(body) == (200, grpc.StatusCode.OK)
    assert_healthy(agent)


@pytest.mark.parametrize("kind", ["array", "kvlist"])
@pytest.mark.parametrize("depth, answers", [
    (30, (200, grpc.StatusCode.OK)),  # within protobuf's recursion limit: the decoders see it
    (1000, (400, grpc.StatusCode.INVALID_ARGUMENT)),  # beyond it: refused as malformed, never a crash
])
def test_deeply_nested_values(agent, client, kind, depth, answers):
    nested = nested_any_value(depth, kind)
    span = vllm_span_bytes(attribute("gen_ai.usage.prompt_tokens", nested) + attribute("deep", nested))
    assert client.both(request_with_span(span)) == answers
    deep_json = "[" * depth * 10 + "]" * depth * 10
    assert client.post(b'{"resourceSpans": ' + deep_json.encode() + b"}", JSON) == 400
    assert_healthy(agent)


def test_megabyte_attribute_values(agent, client):
    huge = "x" * MIB
    spans = [
        f.vllm_span(start=NOW - 3),
        f.span("llm_request", NOW - 3, NOW - 1, {**f.vllm_attributes(), "gen_ai.request.id": huge,
                                                  "gen_ai.usage.prompt_tokens": huge}),
    ]
    request = f.request(spans, resource={"service.name": huge})
    assert client.both(request.SerializeToString()) == (200, grpc.StatusCode.OK)
    metrics = agent.scrape()
    assert all(len(value) < 1024 for samples in metrics.values() for s in samples for value in s.labels.values()), \
        "an attribute value became a label value"
    assert_healthy(agent)


def test_one_hundred_thousand_attributes_on_one_span(agent, client):
    span = f.vllm_span(start=NOW - 3)
    span.attributes.extend(KeyValue(key=f"a{i}", value=AnyValue(int_value=i)) for i in range(100_000))
    body = f.request([span], resource={"service.name": SERVICE}).SerializeToString()
    assert MIB < len(body) < MAX_REQUEST
    assert client.both(body) == (200, grpc.StatusCode.OK)
    assert_healthy(agent)


def gzip_bomb(inflated: int, member: int = 16 * MIB) -> bytes:
    """`inflated` zero bytes as concatenated gzip members (valid gzip: gunzip inflates them all).
    Compressing one member and repeating it keeps building a 1 GiB bomb cheap."""
    return gzip.compress(bytes(member), compresslevel=9) * (inflated // member)


def test_gzip_bombs(agent, client):
    bomb = gzip_bomb(1024 * MIB)  # 1 GiB inflated, about 1 MiB on the wire
    assert len(bomb) < MAX_REQUEST
    assert client.post(bomb, headers={"Content-Encoding": "gzip"}) == 413
    assert client.post(bomb, JSON, headers={"Content-Encoding": "gzip"}) == 413
    assert client.post(gzip.compress(gzip.compress(b"\0" * (64 * MIB))), headers={"Content-Encoding": "gzip"}) == 400
    # gRPC's own message compression: the core inflates it, bounded by its receive limit.
    assert client.grpc(bytes(64 * MIB), compression=grpc.Compression.Gzip) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_healthy(agent)


def test_everything_above_left_the_receivers_working(agent, client):
    before = agent.scrape().value("gpu_spans_received_total", decoder="vllm") or 0
    body = f.request([f.vllm_span(start=NOW - 3)], resource={"service.name": SERVICE}).SerializeToString()
    assert client.both(body) == (200, grpc.StatusCode.OK)
    poll(lambda: agent.scrape().value("gpu_spans_received_total", decoder="vllm") == before + 2, 30,
         message="both spans counted")
    assert_healthy(agent)
    print(f"agent RSS: {agent.baseline_rss / MIB:.0f} MiB at start, "
          f"{agent.process().memory_info().rss / MIB:.0f} MiB after the fuzzing")


# --- config files ----------------------------------------------------------------------------------

FLAGS = [option.flag for option in OPTIONS]
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=False),
                         st.text(alphabet="abc019.:,=-_ ", max_size=12))
yaml_values = st.recursive(yaml_scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.sampled_from(["a", "interval", "x"]), children, max_size=2)),
    max_leaves=5)


@settings(max_examples=150, deadline=None)
@given(flag=st.sampled_from(FLAGS), value=yaml_values, padding=st.integers(0, 5), unknown=st.booleans())
def test_config_file_errors_name_the_file_line_and_reason(tmp_path_factory, flag, value, padding, unknown):
    from gpuphase.cli import config_from_cli

    key = flag + "x" if unknown else flag
    path = tmp_path_factory.mktemp("config") / "gpuphase.yaml"
    path.write_text("# comment\n" * padding + json.dumps({key: value}) + "\n")  # JSON is YAML
    line = padding + 1
    try:
        config_from_cli({"config_file": str(path)}, environ={})
    except ConfigError as error:
        message = str(error)
        if unknown:
            assert message.startswith(f"{path}:{line}: unknown setting {key!r}"), message
        elif flag in message and not message.startswith("default:"):
            assert message.startswith(f"{path}:{line}: {flag}: "), message
            assert len(message) > len(f"{path}:{line}: {flag}: ") + 5, "no reason given"
    else:
        assert not unknown, "an unknown key was accepted"


@pytest.mark.parametrize("text, line, reason", [
    ("backend: sim\nsample.interval: [1, 2]\n", 2, "sample.interval: expected a duration"),
    ("backend: sim\nsample:\n  intervall: 1s\n", 3, "unknown setting 'sample.intervall'"),
    ("backend: sim\nsim.gpus: {a: 1}\n", 2, "sim.gpus: expected a whole number"),
    ("- backend\n", 1, "must be a mapping"),
])
def test_bad_config_file_exits_2_with_one_line(tmp_path, text, line, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    agent = AgentProcess(["--config", str(path)], wait_ready=False)
    with agent:
        assert agent.wait_exit(60) == 2
    lines = agent.stderr_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpuphase: {path}:{line}: ") and reason in lines[0], lines
