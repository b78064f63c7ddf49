"""Coverage-guided fuzzing of span intake with atheris (libFuzzer): bytes -> parser -> decoders -> accountant.

Hypothesis (tests/test_fuzz_otlp.py, tests/test_otlp_receiver.py) tries the hostile shapes we
thought of; this lets coverage find the ones we did not. The first input byte picks the path: the
body as a receiver gets it (OTLP protobuf, OTLP JSON, gzip-compressed protobuf), or, since
mutated protobuf bytes rarely parse, a request built from the input (structure-aware: spans with
the names and attributes the decoders look for, every value of every type, any timestamps).

Oracles, for every input: nothing but the receivers' documented MalformedRequest escapes; no
decoder fails internally (that would be rejected{reason="decoder_error"}); every window is one
the accountant can hold (known phase, finite ordered times between 2000 and 2100, no longer than
a day, tokens in range, a bounded service name); and the accountant takes the windows and
finalises them without raising, its totals finite and never negative.

    .venv/bin/python -m tests.fuzz.fuzz_spans --write-seeds DIR    # valid requests of every shape
    .venv/bin/python -m tests.fuzz.fuzz_spans DIR -max_total_time=600   # libFuzzer flags after it

tests/test_fuzz_coverage.py runs it for a bounded number of inputs in CI.
"""

from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["gpuphase"]):  # coverage of our code, not of protobuf or json
    from gpuphase.agent.phases import PhaseAccountant
    from gpuphase.agent.spans import attributes as attrs
    from gpuphase.agent.spans.decoders import ALL_KEYS, DECODER_ERROR, decode_request
    from gpuphase.agent.spans.decoders.common import _RESOURCE_KEYS, MAX_TIMESTAMP, MAX_WINDOW_SECONDS, MIN_TIMESTAMP
    from gpuphase.agent.spans.http_server import JSON, PARSERS, PROTOBUF, gunzip_capped
    from gpuphase.agent.spans.receiver import MalformedRequest
    from gpuphase.model.phase import WORK_PHASES

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.proto.common.v1.common_pb2 import AnyValue  # noqa: E402

MAX_BODY = 1024 * 1024
GPU = (0, "GPU-fuzz")
PATHS = (PROTOBUF, JSON, "gzip", "structured")
SPAN_KEYS = sorted(ALL_KEYS)
RESOURCE_KEYS = sorted(_RESOURCE_KEYS)
SPAN_NAMES = ("llm_request", "prefill", "decode", "prefill_forward", "chunked_prefill", "decode_loop",
              "generate", "Req 7", "")
T0_NS = 1_700_000_000 * 10**9
TIMES_NS = (0, 1, 10**9, T0_NS, T0_NS + 10**9, 4_102_444_800 * 10**9, 2**63 - 1, 2**64 - 1)


def fill_value(value: AnyValue, data: atheris.FuzzedDataProvider, depth: int = 0) -> None:
    """Any AnyValue: every scalar kind with edge values, arrays and key-value lists (nested)."""
    kind = data.ConsumeIntInRange(0, 7 if depth < 3 else 5)
    if kind == 0:
        value.double_value = data.ConsumeFloat()  # NaN, infinities, subnormals included
    elif kind == 1:
        value.int_value = data.ConsumeIntInRange(-2**63, 2**63 - 1)
    elif kind == 2:
        value.string_value = data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 300))
    elif kind == 3:
        value.bool_value = data.ConsumeBool()
    elif kind == 4:
        value.bytes_value = data.ConsumeBytes(data.ConsumeIntInRange(0, 32))
    elif kind == 5:
        pass  # an empty AnyValue: no kind set
    elif kind == 6:
        for _ in range(data.ConsumeIntInRange(0, 20)):
            fill_value(value.array_value.values.add(), data, depth + 1)
    else:
        for _ in range(data.ConsumeIntInRange(0, 4)):
            pair = value.kvlist_value.values.add()
            pair.key = data.PickValueInList(SPAN_KEYS)
            fill_value(pair.value, data, depth + 1)


def fill_attributes(attributes, keys: list[str], data: atheris.FuzzedDataProvider) -> None:
    for _ in range(data.ConsumeIntInRange(0, 14)):
        pair = attributes.add()
        pair.key = data.PickValueInList(keys) if data.ConsumeBool() else data.ConsumeUnicodeNoSurrogates(8)
        fill_value(pair.value, data)


def structured_request(data: atheris.FuzzedDataProvider) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(data.ConsumeIntInRange(1, 2)):
        resource_spans = request.resource_spans.add()
        fill_attributes(resource_spans.resource.attributes, RESOURCE_KEYS, data)
        spans = resource_spans.scope_spans.add().spans
        for _ in range(data.ConsumeIntInRange(1, 4)):
            span = spans.add()
            span.name = data.PickValueInList(list(SPAN_NAMES)) if data.ConsumeBool() else data.ConsumeUnicodeNoSurrogates(12)
            span.kind = data.ConsumeIntInRange(0, 5)
            span.trace_id = data.ConsumeBytes(data.PickValueInList([16, 16, 0, 3]))
            span.span_id = data.ConsumeBytes(data.PickValueInList([8, 8, 0, 3]))
            for field in ("start_time_unix_nano", "end_time_unix_nano"):
                nanos = data.PickValueInList(list(TIMES_NS)) if data.ConsumeBool() else data.ConsumeIntInRange(0, 2**64 - 1)
                setattr(span, field, nanos)
            fill_attributes(span.attributes, SPAN_KEYS, data)
    return request


def parse(data: bytes):
    """What a receiver does with a body before the decoders; MalformedRequest for a bad one."""
    path, body = PATHS[data[0] % len(PATHS)] if data else PROTOBUF, data[1:]
    if path == "structured":
        return structured_request(atheris.FuzzedDataProvider(body))
    if path == "gzip":
        try:
            return PARSERS[PROTOBUF](gunzip_capped(body, MAX_BODY))
        except ValueError:  # a broken or oversized gzip stream: the receiver answers 400/413
            raise MalformedRequest("bad gzip") from None
    return PARSERS[path](body)


def check_window(window) -> None:
    assert window.phase in WORK_PHASES, window
    assert math.isfinite(window.start) and math.isfinite(window.end), window
    assert MIN_TIMESTAMP <= window.start <= window.end <= MAX_TIMESTAMP, window
    assert window.end - window.start <= MAX_WINDOW_SECONDS, window
    assert isinstance(window.tokens, int) and 0 <= window.tokens <= attrs.MAX_TOKENS, window
    assert 0 < len(window.service) <= attrs.MAX_SERVICE_NAME_LENGTH, window
    assert len(window.gpu_ids) <= attrs.MAX_GPU_IDS, window


def test_one_input(data: bytes) -> None:
    try:
        request = parse(data)
    except MalformedRequest:
        return
    outcome = decode_request(request)
    assert outcome.rejected[DECODER_ERROR] == 0, outcome.first_error
    for window in outcome.windows:
        check_window(window)
    if not outcome.windows:
        return
    # The accountant's clock follows the windows, as the agent's follows the wall clock they share.
    now = max(window.end for window in outcome.windows)
    accountant = PhaseAccountant(settle=5.0, retention=300.0, max_services=4)
    accountant.set_mapping(GPU, ["fuzz"])
    accountant.advance(now - 10.0)
    accountant.add_windows(GPU, outcome.windows)
    accountant.advance(now + 10.0)
    for series in accountant.series():
        for value in (series.seconds, series.tokens, series.energy_joules, series.sm_active_seconds):
            assert value is None or (math.isfinite(value) and value >= 0), series


def write_seeds(directory: Path) -> int:
    """Valid requests shaped like each server's, in each encoding: where mutation starts from."""
    from google.protobuf import json_format

    from tests import spanfactory as f

    requests = [
        f.request([f.vllm_span()], {"service.name": "vllm", "vllm.process_id": 4242}),
        f.request([f.vllm_span(prefill=None, decode=None)]),
        f.request([f.sglang_span(name) for name in ("prefill_forward", "chunked_prefill", "decode_loop")]),
        f.request([f.tgi_span("prefill"), f.tgi_span("decode", client=False)]),
        f.request([f.span("work", f.T0, f.T0 + 1, {"gpuphase.phase": "decode", "gpuphase.tokens": 12})],
                  {"service.name": "mine", "gpuphase.gpu.ids": ["GPU-fuzz", "0"]}),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for n, request in enumerate(requests):
        body = request.SerializeToString()
        encodings = {PROTOBUF: body, JSON: json_format.MessageToJson(request).encode(), "gzip": gzip.compress(body)}
        for path, payload in encodings.items():
            (directory / f"seed-{n}-{PATHS.index(path)}").write_bytes(bytes([PATHS.index(path)]) + payload)
            count += 1
    return count


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--write-seeds":
        print(f"wrote {write_seeds(Path(argv[2]))} seeds to {argv[2]}")
        return
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
