"""Hugging Face TGI (v3 router, Python shards) batch steps → one window per step.

What TGI v3 emits per batch step (huggingface/text-generation-inference @ db931fc; test fixtures
in tests/fixtures/tgi/ cite the same lines):

- router (Rust, tracing-opentelemetry 0.21, all spans INTERNAL: none sets `otel.kind`), one trace
  per step, rooted in a `batch` span made with `info_span!(parent: None, "batch", batch_size)`
  (backends/v3/src/queue.rs:268 for a prefill, backends/v3/src/backend.rs:273-274 for a decode):
    `prefill` / `decode`, `#[instrument(skip_all)]`, no fields (backend.rs:296, :341), once;
    its child `prefill` (fields `id`, `size` = requests of the *new* batch) / `decode` (`size` =
    requests of all cached batches) of the ShardedClient (backends/v3/src/client/
    sharded_client.rs:141, :175), once;
    their children of the same names and fields, one per shard (client/grpc_client.rs:229, :257);
  tracing-opentelemetry adds `code.namespace` (the module path: `text_generation_router_v3::
  backend`, `…::client::sharded_client`, `…::client::grpc_client`; in TGI 2.x
  `text_generation_router::infer::v3::scheduler`, `text_generation_client::v3::sharded_client`,
  `text_generation_client::v3::client`), and records unsigned fields through tracing's default
  `record_u64` → `record_debug`, i.e. as *strings*: `size` arrives as "3" (tracing-opentelemetry
  v0.21.0 src/layer.rs:301-356 has no record_u64; tracing-core src/field.rs `Visit::record_u64`).
- each shard (Python), in the same trace (the gRPC metadata carries the context, backends/
  grpc-metadata/src/lib.rs:23-29): a SERVER span `/generate.v3.TextGenerationService/Prefill`
  or `/Decode` (server/text_generation_server/tracing.py:49-54), with children `concatenate`
  when batches are merged (server.py:178 in Prefill, only with chunking and a cached batch;
  server.py:210 in Decode, when more than one batch) and `generate_token` (the forward,
  models/flash_causal_lm.py:1890), scope `text_generation_server.models.<module>`.

So a step arrives as 2 + num_shard router spans of one name plus num_shard shard spans. Windows
come from the ShardedClient span only: exactly one per step, it covers every shard's RPC, and it
has `size`, which on a decode step is the step's tokens (one per request). The backend and
per-shard client spans are claimed and give nothing. Without `code.namespace` (a router built
with locations off) the field-less backend span gives the window, without tokens.

Chunked prefill (the default with flashinfer/flashdecoding): a Prefill RPC may carry the cached,
decoding batch, which the shard concatenates (server.py:170-179) and runs in the same forward as
the new prompts (flash_causal_lm.py:1895-1897): that step is mixed. The router's spans do not say
so; the shard's `concatenate` span, in the same trace, does. A small bounded table keyed by trace
id (the step) joins the two, in either arrival order: a prefill step whose trace has a
`concatenate` also gets a decode window over the same interval (tokens 0: the cached batch's size
is on no span). In a Decode RPC `concatenate` means two decoding batches merged: nothing changes.
A Decode RPC whose batch is still prefilling a chunk carries no sign of it and stays decode.

`prefill` and `decode` are common words, so a span is TGI's only when its code.namespace or the
resource's service.name (default `text-generation-inference.router`) says so.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.attributes import InvalidSpan
from gpuphase.agent.spans.decoders.common import ResourceInfo, make_window, span_ids, span_seconds
from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow

NAME = "tgi"
PHASE_BY_NAME = {"prefill": PREFILL, "decode": DECODE}
CODE_NAMESPACE_PREFIX = "text_generation"
SERVICE_PREFIX = "text-generation-inference"
SHARD_SCOPE_PREFIX = "text_generation_server"  # trace.get_tracer(__name__) in the shard's modules
STEP_LEVEL_SUFFIX = "sharded_client"  # the module of the once-per-step span
CONCATENATE = "concatenate"
SIZE = "size"
MAX_DECIMAL_DIGITS = 10  # a u32 batch size; longer strings are not counts
MAX_TRACKED_STEPS = 4096  # steps whose prefill or concatenate waits for the other (a few 100 bytes each)

TOKENS_KEYS = (SIZE,)

KEYS = frozenset({"code.namespace", SIZE})


def count(found: attrs.Found, key: str) -> int:
    """A count sent as an integer, an integral double, or a plain decimal string ("3", as
    tracing-opentelemetry records u64 fields); 0 when absent, InvalidSpan when anything else."""
    attribute = found.get(key)
    if attribute is None:
        return 0
    value = attribute.value
    if value.WhichOneof("value") != "string_value":
        return attrs.get_count(found, key)
    text = value.string_value
    if not (0 < len(text) <= MAX_DECIMAL_DIGITS and text.isascii() and text.isdigit()):
        raise InvalidSpan(f"{key} is not a plain decimal count")
    number = int(text)
    if number > attrs.MAX_TOKENS:
        raise InvalidSpan(f"{key} is out of range")
    return number


class _Step:
    __slots__ = ("prefill", "concatenated", "decode_sent")

    def __init__(self) -> None:
        self.prefill: tuple[float, float, bytes, ResourceInfo] | None = None
        self.concatenated = False
        self.decode_sent = False


class StepTable:
    """trace id → what is known of that step: its prefill window, whether a shard concatenated.

    Bounded (the oldest step is forgotten first) and locked: decoders run on several network
    threads. A step forgotten before its other half arrives keeps its prefill label only.
    """

    def __init__(self, max_steps: int = MAX_TRACKED_STEPS) -> None:
        self._max = max_steps
        self._steps: OrderedDict[bytes, _Step] = OrderedDict()
        self._lock = threading.Lock()

    def _step(self, trace_id: bytes) -> _Step:
        step = self._steps.get(trace_id)
        if step is None:
            step = self._steps[trace_id] = _Step()
            if len(self._steps) > self._max:
                self._steps.popitem(last=False)
        return step

    def prefill(self, trace_id: bytes, start: float, end: float, ids: bytes, resource: ResourceInfo) -> bool:
        """Note a prefill step; True when a shard already said it concatenated a cached batch."""
        with self._lock:
            step = self._step(trace_id)
            step.prefill = (start, end, ids, resource)
            if step.concatenated:
                step.decode_sent = True
            return step.concatenated

    def concatenated(self, trace_id: bytes) -> tuple[float, float, bytes, ResourceInfo] | None:
        """Note a shard's concatenate; the step's prefill if its decode window is now due (once)."""
        with self._lock:
            step = self._step(trace_id)
            step.concatenated = True
            if step.prefill is None or step.decode_sent:
                return None
            step.decode_sent = True
            return step.prefill

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()

    def __len__(self) -> int:
        return len(self._steps)


STEPS = StepTable()


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span, name: str,
           found: attrs.Found) -> list[PhaseWindow] | None:
    phase = PHASE_BY_NAME.get(name)
    if phase is None:
        if name == CONCATENATE and (scope.name.startswith(SHARD_SCOPE_PREFIX)
                                    or resource.service.startswith(SERVICE_PREFIX)):
            return _concatenated(span)
        return None
    namespace = attrs.get_string(found, "code.namespace") or ""
    if not (namespace.startswith(CODE_NAMESPACE_PREFIX) or resource.service.startswith(SERVICE_PREFIX)):
        return None
    if namespace:
        if not namespace.endswith(STEP_LEVEL_SUFFIX):
            return []  # the backend's or one shard's client span of a step the sharded client speaks for
        tokens = count(found, SIZE) if phase == DECODE else 0
    elif SIZE in found:
        return []  # a client span of a router without locations: the field-less backend span speaks
    else:
        tokens = 0
    start, end = span_seconds(span)
    ids = span_ids(span)
    window = make_window(phase, start, end, ids, resource, NAME, tokens)
    if phase == PREFILL and STEPS.prefill(span.trace_id, start, end, ids, resource):
        return [window, make_window(DECODE, start, end, ids, resource, NAME)]
    return [window]


def _concatenated(span: Span) -> list[PhaseWindow]:
    if len(span.trace_id) != 16:
        raise InvalidSpan("span has no valid trace id")
    due = STEPS.concatenated(span.trace_id)
    if due is None:
        return []
    start, end, ids, resource = due
    return [make_window(DECODE, start, end, ids, resource, NAME)]
