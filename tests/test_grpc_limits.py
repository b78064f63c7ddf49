"""The OTLP/gRPC receiver's own limits (agent/spans/grpc_server.py) and the memory one request
may cost (the amplification issue's acceptance figure).

 - a second server on the same port fails to start (SO_REUSEPORT off) with an OSError naming it;
 - a message over the request limit is refused by grpc core (RESOURCE_EXHAUSTED, uncounted);
 - calls beyond max_concurrent_rpcs get RESOURCE_EXHAUSTED from grpc and the server lives on;
 - in a subprocess running a SpanIntake and the gRPC server, no request of any shape within the
   4 MiB limit raises the peak RSS (the kernel's VmHWM) by 64 MiB or more over the idle RSS:
   the 2M-empty-span protobuf and the 1.4M-`{}` OTLP/JSON requests are refused, and the worst
   shapes the default caps still accept stay under it, decoding to windows included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans.grpc_server import KEEPALIVE_OPTIONS, start_grpc_server
from gpuphase.agent.spans.receiver import SpanIntake
from tests import spanfactory as f
from tests.agentproc import ROOT
from tests.test_span_budgets import field, otlp_json

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LIMIT = 64 * 1024
MIB = 1024 * 1024
MAX_REQUEST = 4 * MIB  # the default --otlp.max-request-size
RSS_GROWTH_LIMIT = 64 * MIB  # the acceptance figure, for one request of any shape


def call(port: int, body: bytes, timeout: float = 20) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(EXPORT)(body, timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


@pytest.fixture
def intake():
    intake = SpanIntake(lambda windows: None, max_request_bytes=LIMIT, parse_slots=1, parse_wait=30)
    intake.start()
    yield intake
    intake.stop()


def test_a_second_server_on_the_same_port_is_refused_naming_the_address(intake):
    first = start_grpc_server(intake, "127.0.0.1:0")
    try:
        address = f"127.0.0.1:{first.port}"
        with pytest.raises(OSError, match=address):
            start_grpc_server(intake, address)
        assert call(first.port, f.request([f.vllm_span()]).SerializeToString()) == grpc.StatusCode.OK
    finally:
        first.stop()


def test_a_message_over_the_limit_is_refused_by_grpc_itself(intake):
    server = start_grpc_server(intake, "127.0.0.1:0")
    try:
        valid = f.request([f.vllm_span()]).SerializeToString()
        exactly = valid + field(99, b"\0" * (LIMIT - len(valid) - 5))  # an unknown field: tag 2 bytes, length 3
        assert len(exactly) == LIMIT
        assert call(server.port, exactly) == grpc.StatusCode.OK
        assert call(server.port, b"x" * (LIMIT + 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(server.port, b"x" * (64 * LIMIT)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # grpc core refused those before any Python ran: they are not counted (docs/spans.md)
        assert "too_large" not in intake.stats().rejected
        assert call(server.port, valid) == grpc.StatusCode.OK
    finally:
        server.stop()


def test_calls_beyond_the_concurrency_cap_are_refused_and_the_server_lives_on(intake):
    server = start_grpc_server(intake, "127.0.0.1:0", max_concurrent_rpcs=3)
    body = f.request([f.vllm_span()]).SerializeToString()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    export = channel.unary_unary(EXPORT)
    try:
        with intake.parse_slot() as slot:  # the one parse slot: calls that get in wait for it
            assert slot
            futures = [export.future(body, timeout=30) for _ in range(12)]
            deadline = time.monotonic() + 20
            while sum(fut.done() for fut in futures) < 9 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused = [fut for fut in futures if fut.done()]
            assert len(refused) == 9, "all but the three calls in progress are refused at once"
            for fut in refused:
                assert fut.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "Concurrent RPC limit" in fut.exception().details()
            time.sleep(0.2)
            assert sum(fut.done() for fut in futures) == 9  # the three still wait for the slot
        waiting = [fut for fut in futures if fut not in refused]
        for fut in waiting:
            fut.result(timeout=20)  # the slot came free: all three succeed
        with ThreadPoolExecutor(8) as pool:  # and the server keeps answering
            codes = list(pool.map(lambda _: call(server.port, body), range(8)))
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert grpc.StatusCode.OK in codes
        assert call(server.port, body) == grpc.StatusCode.OK
    finally:
        channel.close()
        server.stop()


def test_connection_options_are_sane():
    options = dict(KEEPALIVE_OPTIONS)
    assert options["grpc.keepalive_timeout_ms"] < options["grpc.keepalive_time_ms"]
    assert options["grpc.max_connection_age_grace_ms"] >= 10_000  # the OTel exporters' default timeout
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= options["grpc.keepalive_time_ms"]


# --- memory: one request of any shape within the size limit ---------------------------------------

CHILD = r"""
import gc, json, sys
from gpuphase.agent.spans.budget import MalformedRequest
from gpuphase.agent.spans.decoders import decode_request
from gpuphase.agent.spans.grpc_server import start_grpc_server
from gpuphase.agent.spans.otlp_json import parse_otlp_json
from gpuphase.agent.spans.receiver import SpanIntake

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

intake = SpanIntake(lambda windows: None)  # every default: 4 MiB requests, the default budget
intake.start()
server = start_grpc_server(intake, "127.0.0.1:0")
print(json.dumps({"port": server.port}), flush=True)
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if command == "idle":
        intake.wait_idle(30)
        gc.collect()
        print(json.dumps({"rss": status("VmRSS"), "hwm": status("VmHWM")}), flush=True)
    elif command == "json":  # the OTLP/JSON path, as a receiver would run it on a body it holds
        body = open(argument, "rb").read()
        try:
            outcome = decode_request(parse_otlp_json(body, intake.budget))
            answer = {"accepted": outcome.span_count, "windows": len(outcome.windows)}
        except MalformedRequest as error:
            answer = {"refused": getattr(error, "reason", "malformed"), "message": str(error)}
        del body
        print(json.dumps(answer), flush=True)
    elif command == "peak":
        intake.wait_idle(30)
        print(json.dumps({"hwm": status("VmHWM"), "rejected": intake.stats().rejected,
                          "received": intake.stats().received}), flush=True)
    else:
        break
server.stop()
intake.stop()
"""


class IntakeProcess:
    def __init__(self):
        self.popen = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT)})
        self.port = self.ask(None)["port"]

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.popen.stdin.write(command + "\n")
            self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        assert line, f"the intake process died ({self.popen.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.stdin.write("quit\n")
            self.popen.stdin.close()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(20)


def empty_spans_protobuf() -> bytes:
    return field(1, field(2, b"\x12\x00" * ((MAX_REQUEST - 16) // 2)))  # ~2M empty spans


def empty_links_protobuf() -> bytes:
    return field(1, field(2, field(2, field(13, b"") * ((MAX_REQUEST - 32) // 2))))


def worst_accepted_protobuf() -> bytes:
    """16,384 spans that each decode to two windows (the span cap), then empty resource attributes
    up to the item cap: the most memory the default caps let one protobuf request cost."""
    from gpuphase.agent.spans.budget import DEFAULT_MAX_ITEMS, scan_protobuf

    spans = [f.span("llm_request", f.T0, f.T0 + 2, {"gen_ai.latency.time_to_first_token": 0.3,
                                                     "gen_ai.latency.time_in_model_prefill": 0.2,
                                                     "gen_ai.latency.time_in_model_decode": 1.0},
                    kind=Span.SPAN_KIND_SERVER) for _ in range(16_384)]
    body = f.request(spans, resource={"service.name": "vllm"}).SerializeToString()
    counts = scan_protobuf(body)
    body += field(1, field(1, field(1, b"") * (DEFAULT_MAX_ITEMS - counts.items - 2)))
    assert len(body) <= MAX_REQUEST
    return body


def empty_spans_json() -> bytes:
    head, tail = b'{"resourceSpans":[{"scopeSpans":[{"spans":[', b"]}]}]}"
    return head + b",".join([b"{}"] * ((MAX_REQUEST - 64) // 3)) + tail  # ~1.4M `{}` spans


def links_json_at_the_cap() -> bytes:
    head, tail = b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"links":[', b"]}]}]}]}"
    return head + b",".join([b"{}"] * 262_100) + tail  # just under the token and item caps


def strings_json_at_the_cap() -> bytes:
    return b'{"x":[' + b",".join([b'"ab"'] * 524_000) + b"]}"  # an unknown field: json.loads only


def vllm_json() -> bytes:
    return otlp_json(f.request([f.vllm_span() for _ in range(3_000)]))  # ~2.8 MiB of ordinary spans


SCENARIOS = {
    # name: (transport, body, expected outcome)
    "protobuf: 2M empty spans": ("grpc", empty_spans_protobuf, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "protobuf: 2M empty links": ("grpc", empty_links_protobuf, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "protobuf: the worst the caps accept": ("grpc", worst_accepted_protobuf, grpc.StatusCode.OK),
    "json: 1.4M empty spans": ("json", empty_spans_json, "too_many_items"),
    "json: empty links at the caps": ("json", links_json_at_the_cap, "accepted"),
    "json: short strings at the token cap": ("json", strings_json_at_the_cap, "accepted"),
    "json: 3,000 vLLM spans": ("json", vllm_json, "accepted"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_request_of_any_shape_raises_peak_rss_by_less_than_64_mib(scenario, tmp_path: Path):
    transport, build, expected = SCENARIOS[scenario]
    body = build()
    assert len(body) <= MAX_REQUEST
    child = IntakeProcess()
    try:
        warm = f.request([f.vllm_span()])  # the first request allocates what every later one reuses
        assert call(child.port, warm.SerializeToString()) == grpc.StatusCode.OK
        warm_json = tmp_path / "warm.json"
        warm_json.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x"}]}]}]}))
        assert "accepted" in child.ask(f"json {warm_json}")
        idle = child.ask("idle")["rss"]
        if transport == "grpc":
            assert call(child.port, body, timeout=60) == expected
        else:
            path = tmp_path / "body.json"
            path.write_bytes(body)
            del body
            answer = child.ask(f"json {path}")
            assert (answer.get("refused") or "accepted") == expected, answer
        peak = child.ask("peak")
        growth = peak["hwm"] - idle
        print(f"{scenario}: idle RSS {idle / MIB:.1f} MiB, peak {peak['hwm'] / MIB:.1f} MiB, "
              f"+{growth / MIB:.1f} MiB; rejected {peak['rejected']}")
        assert growth < RSS_GROWTH_LIMIT, f"{scenario}: peak RSS grew by {growth / MIB:.1f} MiB"
        if expected == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert set(peak["rejected"]) <= {"too_many_spans", "too_many_items"} and peak["rejected"]
    finally:
        child.close()


def test_requests_in_flight_together_stay_bounded(tmp_path: Path):
    """Sixteen worst-case requests at once (the default max_concurrent_rpcs): two are parsed at a
    time, the rest wait with their bodies; the peak stays under the formula of docs/spans.md."""
    body = worst_accepted_protobuf()
    child = IntakeProcess()
    try:
        assert call(child.port, f.request([f.vllm_span()]).SerializeToString()) == grpc.StatusCode.OK
        idle = child.ask("idle")["rss"]
        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def send() -> None:
            code = call(child.port, body, timeout=120)
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=send) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        peak = child.ask("peak")
        growth = peak["hwm"] - idle
        print(f"16 at once: idle {idle / MIB:.1f} MiB, +{growth / MIB:.1f} MiB, codes {sorted(map(str, codes))}, "
              f"rejected {peak['rejected']}")
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert grpc.StatusCode.OK in codes
        # docs/spans.md: P × R + 4 × 2L + (C − 4) × 64 KiB + 2 × W × 270 B ≈ 132 MiB at the defaults
        formula = 2 * 41 * MIB + 4 * 2 * MAX_REQUEST + 12 * 64 * 1024 + 2 * 32_768 * 270
        assert growth < formula, f"16 requests at once raised the peak by {growth / MIB:.1f} MiB"
    finally:
        child.close()
