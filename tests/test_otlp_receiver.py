"""The OTLP receivers end to end: real OTel SDK exporters, raw hostile payloads, backpressure."""

from __future__ import annotations

import gzip
import http.client
import json
import threading

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from gpuphase.agent.spans.grpc_server import start_grpc_server
from gpuphase.agent.spans.http_server import start_http_server
from gpuphase.agent.spans.receiver import SpanIntake
from gpuphase.model.phase import DECODE, PREFILL
from tests import spanfactory as f
from tests.spanfactory import T0

LIMIT = 64 * 1024
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Receivers:
    def __init__(self, sink=None, queue_size=16, max_queued_windows=10_000):
        self.windows = []
        self.intake = SpanIntake(sink or self.windows.extend, max_request_bytes=LIMIT, queue_size=queue_size,
                                 max_queued_windows=max_queued_windows)
        self.intake.start()
        self.grpc = start_grpc_server(self.intake, "127.0.0.1:0")
        self.http = start_http_server(self.intake, "127.0.0.1:0")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.export = self.channel.unary_unary(EXPORT)

    def post(self, body: bytes, content_type="application/x-protobuf", path="/v1/traces", method="POST",
             headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": content_type, **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def grpc_code(self, body: bytes):
        try:
            self.export(body, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    def rejected(self):
        return dict(self.intake.stats().rejected)

    def assert_still_answering(self):
        """A valid request still gets through both transports and reaches the sink."""
        before = len(self.windows)
        body = f.request([f.vllm_span()]).SerializeToString()
        assert self.post(body)[0] == 200
        assert self.grpc_code(body) == grpc.StatusCode.OK
        assert self.intake.wait_idle(10)
        assert len(self.windows) == before + 4

    def close(self):
        self.channel.close()
        self.grpc.stop()
        self.http.stop()
        self.intake.stop()


@pytest.fixture
def receivers():
    r = Receivers()
    yield r
    r.close()


def send_vllm_span_with_sdk(exporter):
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm-llama", "process.pid": 4321}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("vllm.tracing")
    start_ns = int(T0 * 1e9)
    span = tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=start_ns, attributes={
        **f.vllm_attributes(ttft=0.25, prefill=0.2, decode=1.25, prompt_tokens=100, completion_tokens=50)})
    span.end(end_time=start_ns + 1_500_000_000)
    provider.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http", "http-gzip"])
def test_sdk_exporter_spans_become_windows(receivers, transport):
    if transport == "grpc":
        exporter = GrpcExporter(endpoint=f"127.0.0.1:{receivers.grpc.port}", insecure=True, timeout=10)
    else:
        exporter = HttpExporter(endpoint=f"http://127.0.0.1:{receivers.http.port}/v1/traces", timeout=10,
                                compression=Compression.Gzip if transport == "http-gzip" else Compression.NoCompression)
    send_vllm_span_with_sdk(exporter)
    assert receivers.intake.wait_idle(10)
    windows = {w.phase: w for w in receivers.windows}
    assert set(windows) == {PREFILL, DECODE}
    assert (windows[PREFILL].start, windows[PREFILL].end) == pytest.approx((T0 + 0.05, T0 + 0.25))
    assert (windows[DECODE].start, windows[DECODE].end) == pytest.approx((T0 + 0.25, T0 + 1.5))
    assert (windows[PREFILL].tokens, windows[DECODE].tokens) == (100, 50)
    assert {(w.service, w.pid, w.decoder) for w in windows.values()} == {("vllm-llama", 4321, "vllm")}
    assert receivers.intake.stats().received == {"vllm": 1}


def test_otlp_json_with_hex_ids_is_accepted_and_answered_in_json(receivers):
    span = f.vllm_span()
    document = json_format.MessageToDict(f.request([span]))
    for key in ("traceId", "spanId"):  # OTLP/JSON: ids are hex, not base64
        document["resourceSpans"][0]["scopeSpans"][0]["spans"][0][key] = getattr(span, key[:-2] + "_id").hex()
    status, headers, body = receivers.post(json.dumps(document).encode(), "application/json")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert json.loads(body) == {}
    assert receivers.intake.wait_idle(10)
    assert receivers.windows[0].key == span.trace_id + span.span_id + b"prefill"


def test_partial_success_counts_invalid_windows_on_both_transports(receivers):
    body = f.request([f.vllm_span(), f.vllm_span(ttft="soon"), f.vllm_span(decode=-1.0)]).SerializeToString()
    status, headers, payload = receivers.post(body)
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    from_http = ExportTraceServiceResponse.FromString(payload)
    from_grpc = ExportTraceServiceResponse.FromString(receivers.export(body, timeout=10))
    for response in (from_http, from_grpc):
        assert response.partial_success.rejected_spans == 2
        assert "vllm" in response.partial_success.error_message
    assert receivers.rejected() == {"invalid_window": 4}
    assert receivers.intake.wait_idle(10) and len(receivers.windows) == 4


def test_http_refusals_have_spec_status_codes_and_are_counted(receivers):
    bomb = gzip.compress(b"\0" * (LIMIT * 64))
    assert len(bomb) < LIMIT
    cases = [
        (dict(body=b"\x0a\xff\xff\xff\xff"), 400, "application/x-protobuf"),
        (dict(body=b"{not json", content_type="application/json"), 400, "application/json"),
        (dict(body=b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}',
              content_type="application/json; charset=utf-8"), 400, "application/json"),
        (dict(body=b"x", content_type="text/plain"), 415, "application/x-protobuf"),
        (dict(body=b"x", headers={"Content-Encoding": "br"}), 415, "application/x-protobuf"),
        (dict(body=bomb, headers={"Content-Encoding": "gzip"}), 413, "application/x-protobuf"),
        (dict(body=b"\x1f\x8b garbage", headers={"Content-Encoding": "gzip"}), 400, "application/x-protobuf"),
        (dict(body=b"x" * (LIMIT + 1)), 413, "application/x-protobuf"),
    ]
    for kwargs, expected_status, expected_type in cases:
        status, headers, body = receivers.post(**kwargs)
        assert (status, headers["Content-Type"]) == (expected_status, expected_type), kwargs.get("headers")
        if expected_type == "application/x-protobuf":
            assert status_pb2.Status.FromString(body).message
        else:
            assert json.loads(body)["message"]
    assert receivers.post(b"", method="GET")[0] == 405
    assert receivers.post(b"", path="/v1/metrics")[0] == 404
    assert receivers.rejected() == {"malformed": 4, "unsupported_media_type": 1, "unsupported_encoding": 1,
                                    "too_large": 2}
    receivers.assert_still_answering()


def test_grpc_refusals_are_counted(receivers):
    assert receivers.grpc_code(b"\x0a\xff\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT
    # Beyond the limit grpc core refuses by itself, before any Python runs: uncounted (see grpc_server.py).
    assert receivers.grpc_code(b"x" * (LIMIT + 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert receivers.grpc_code(b"x" * (3 * LIMIT)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert receivers.rejected() == {"malformed": 1}
    receivers.assert_still_answering()


def test_full_queue_answers_retryable_on_both_transports():
    entered, release = threading.Event(), threading.Event()
    delivered = []

    def slow_sink(windows):
        entered.set()
        release.wait(10)
        delivered.extend(windows)

    r = Receivers(sink=slow_sink, queue_size=1)
    try:
        body = f.request([f.vllm_span(), f.vllm_span()]).SerializeToString()
        assert r.post(body)[0] == 200  # taken by the worker, which now blocks in the sink
        assert entered.wait(10)
        assert r.post(body)[0] == 200  # fills the one queue slot
        status, headers, payload = r.post(body)
        assert (status, headers["Retry-After"]) == (503, "1")
        assert status_pb2.Status.FromString(payload).code == 14
        try:
            r.export(body, timeout=10)
            pytest.fail("expected UNAVAILABLE")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            details = dict(error.trailing_metadata())["grpc-status-details-bin"]
            assert status_pb2.Status.FromString(details).details[0].type_url.endswith("google.rpc.RetryInfo")
        assert r.rejected() == {"queue_full": 4}  # two spans per refused request
        assert r.intake.stats().received == {"vllm": 4}  # refused requests are not counted as received
        release.set()
        assert r.intake.wait_idle(10) and len(delivered) == 8
        r.windows = delivered
        r.assert_still_answering()
    finally:
        release.set()
        r.close()


def test_queue_is_bounded_in_windows_too_and_an_empty_queue_takes_any_request():
    entered, release = threading.Event(), threading.Event()

    def slow_sink(windows):
        entered.set()
        release.wait(10)

    r = Receivers(sink=slow_sink, queue_size=16, max_queued_windows=6)
    try:
        two_spans = f.request([f.vllm_span(), f.vllm_span()]).SerializeToString()  # 4 windows
        assert r.post(two_spans)[0] == 200  # held by the worker, in the sink: still counts
        assert entered.wait(10)
        assert r.post(two_spans)[0] == 503  # 8 windows > 6, though the queue has 16 free places
        assert r.grpc_code(two_spans) == grpc.StatusCode.UNAVAILABLE
        assert r.rejected() == {"queue_full": 4}
        release.set()
        assert r.intake.wait_idle(10)
        four_spans = f.request([f.vllm_span() for _ in range(4)]).SerializeToString()  # 8 windows > 6
        assert r.post(four_spans)[0] == 200  # alone it would never fit: an empty queue takes it
        assert r.intake.wait_idle(10) and r.intake.stats().received == {"vllm": 6}
    finally:
        release.set()
        r.close()


def test_sink_failure_is_counted_and_intake_keeps_going():
    calls = []

    def flaky_sink(windows):
        calls.append(len(windows))
        if len(calls) == 1:
            raise RuntimeError("accountant bug")

    r = Receivers(sink=flaky_sink)
    try:
        body = f.request([f.vllm_span()]).SerializeToString()
        assert r.post(body)[0] == 200 and r.post(body)[0] == 200
        assert r.intake.wait_idle(10)
        assert calls == [2, 2] and r.rejected() == {"sink_error": 2}
    finally:
        r.close()


def test_mapper_unmatched_counts_merge_with_unknown_spans(receivers):
    receivers.post(f.request([f.span("db.query", T0, T0 + 1)]).SerializeToString())
    receivers.intake.count_unmatched("no_mapping", 3)
    assert receivers.intake.stats().unmatched == {"unknown_span": 1, "no_mapping": 3}


def test_auth_checker_refuses_before_reading_payload():
    intake = SpanIntake(lambda windows: None, max_request_bytes=LIMIT)
    handle = start_http_server(intake, "127.0.0.1:0", auth_checker=lambda header: header == "Bearer ok")
    try:
        for token, expected in (("Bearer nope", 401), ("Bearer ok", 200)):
            connection = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
            connection.request("POST", "/v1/traces", body=b"", headers={
                "Content-Type": "application/x-protobuf", "Authorization": token})
            response = connection.getresponse()
            response.read()
            connection.close()
            assert response.status == expected
        assert intake.stats().rejected == {"unauthorized": 1}
    finally:
        handle.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048), gzipped=st.booleans(),
       content_type=st.sampled_from(["application/x-protobuf", "application/json"]))
def test_fuzzed_payloads_never_break_the_receivers(receivers, body, gzipped, content_type):
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    assert receivers.post(body, content_type, headers=headers)[0] in (200, 400)
    assert receivers.grpc_code(body) in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
    assert "decoder_error" not in receivers.rejected()
