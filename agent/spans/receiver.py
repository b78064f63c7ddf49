"""SpanIntake: what both OTLP receivers hand their requests to, and the span counters.

Threading decision (documented in docs/spans.md): the network thread parses the protobuf *and*
decodes its spans to PhaseWindows; the bounded queue holds window batches; one worker thread
hands them to the sink (the mapper and the accountant, which take locks and may be slow).
 - Decoding is pure CPU on at most max_request_bytes, with no shared locks, so it is cheap and
   safe on the network thread, and it is the only way to answer with an exact
   partial_success.rejected_spans (OTLP wants it in the response, not later).
 - The queue is bounded twice: in requests (queue_size) and in windows (max_queued_windows).
   A vLLM span's two windows take about as much memory as its protobuf, so queue_size full
   requests could hold queue_size × max_request_bytes of windows; the window bound keeps that
   small. It also bounds what the garbage collector walks: every queued window is a tracked
   object, and a full collection over a deep queue holds the GIL long enough for the tick to
   feel it (docs/design-figures.md).
 - The sink is what can stall; keeping it off the network threads is what keeps answers fast.
Counters are committed only when a request is accepted: a refused request will be retried by
its sender and must not be counted twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gpuphase.agent.spans.decoders import decode_request
from gpuphase.model.phase import PhaseWindow
from gpuphase.model.view import SpanStats

log = logging.getLogger(__name__)

# Rejection reasons (gpu_spans_rejected_total{reason}); decoders add invalid_window, decoder_error.
MALFORMED = "malformed"
TOO_LARGE = "too_large"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
UNSUPPORTED_ENCODING = "unsupported_encoding"
QUEUE_FULL = "queue_full"
UNAUTHORIZED = "unauthorized"
SINK_ERROR = "sink_error"

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 256
# ~8 MiB of windows: 32 requests of 512 vLLM spans, a few seconds of the accountant's work.
DEFAULT_MAX_QUEUED_WINDOWS = 32_768
RETRY_AFTER_SECONDS = 1  # a full queue drains within seconds (DEFAULT_MAX_QUEUED_WINDOWS); retry soon

Sink = Callable[[list[PhaseWindow]], None]


class MalformedRequest(ValueError):
    """The payload is not an ExportTraceServiceRequest (counted as rejected{reason="malformed"})."""


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError) as error:
        raise MalformedRequest(f"invalid protobuf: {type(error).__name__}") from None
    return request


@dataclass(frozen=True)
class Submission:
    """The intake's answer to one request; queue_full means "tell the sender to retry"."""

    queue_full: bool = False
    rejected_spans: int = 0
    error_message: str = ""

    def response(self) -> ExportTraceServiceResponse:
        response = ExportTraceServiceResponse()
        if self.rejected_spans:
            response.partial_success.rejected_spans = self.rejected_spans
            response.partial_success.error_message = self.error_message
        return response


_STOP = object()


class SpanIntake:
    def __init__(self, sink: Sink, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, max_queued_windows: int = DEFAULT_MAX_QUEUED_WINDOWS):
        if max_request_bytes < 1 or queue_size < 1 or max_queued_windows < 1:
            raise ValueError("max_request_bytes, queue_size and max_queued_windows must be positive")
        self._sink = sink
        self.max_request_bytes = max_request_bytes
        self._max_queued_windows = max_queued_windows
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._counts_lock = threading.Lock()
        self._received: Counter = Counter()
        self._rejected: Counter = Counter()
        self._unmatched: Counter = Counter()
        self._pending = 0  # accepted batches not yet handed to the sink
        self._pending_windows = 0  # the windows in them (one batch may exceed the bound alone)
        self._idle = threading.Condition()
        self._worker: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("SpanIntake already started")
        self._worker = threading.Thread(target=self._deliver_forever, name="span-intake", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then end the worker (blocks while the queue is full)."""
        if self._worker is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("span intake queue did not drain within %.1fs; stopping anyway", timeout)
        self._worker.join(timeout)
        self._worker = None

    def wait_idle(self, timeout: float) -> bool:
        """True once every accepted window batch has been handed to the sink (tests, demo, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    # --- network side ------------------------------------------------------------------------

    def submit(self, request: ExportTraceServiceRequest) -> Submission:
        """Decode one parsed request and queue its windows; called on network threads."""
        if self._queue.full() or self._pending_windows >= self._max_queued_windows:
            # fast path: do not spend CPU on a request we will refuse
            self.count_rejected(QUEUE_FULL, _span_count(request))
            return Submission(queue_full=True)
        outcome = decode_request(request)
        if outcome.windows and not self._enqueue(outcome.windows):
            self.count_rejected(QUEUE_FULL, outcome.span_count)
            return Submission(queue_full=True)
        with self._counts_lock:
            self._received.update(outcome.received)
            self._rejected.update(outcome.rejected)
            self._unmatched.update(outcome.unmatched)
        return Submission(rejected_spans=outcome.rejected_spans, error_message=outcome.first_error)

    def _enqueue(self, windows: list[PhaseWindow]) -> bool:
        """Queue a batch unless the queue is full in requests or in windows. A batch always fits
        into an empty queue: one bigger than the window bound alone would never fit otherwise."""
        with self._idle:
            if self._pending_windows and self._pending_windows + len(windows) > self._max_queued_windows:
                return False
            self._pending += 1
            self._pending_windows += len(windows)
        try:
            self._queue.put_nowait(windows)
        except queue.Full:
            self._batch_done(len(windows))
            return False
        return True

    # --- counters ----------------------------------------------------------------------------

    def count_rejected(self, reason: str, n: int = 1) -> None:
        """Count a refusal; payloads whose spans cannot be counted (malformed, too large) count 1."""
        with self._counts_lock:
            self._rejected[reason] += max(n, 1)

    def count_unmatched(self, reason: str, n: int = 1) -> None:
        """For the mapper: decoded windows it could not tie to a GPU (no_mapping, unknown_gpu …)."""
        with self._counts_lock:
            self._unmatched[reason] += n

    def stats(self) -> SpanStats:
        with self._counts_lock:
            return SpanStats(received=dict(self._received), rejected=dict(self._rejected),
                             unmatched=dict(self._unmatched))

    # --- worker ------------------------------------------------------------------------------

    def _deliver_forever(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            try:
                self._sink(batch)
            except Exception:  # the sink's bug must not end span intake for good
                log.exception("span sink failed; %d windows dropped", len(batch))
                self.count_rejected(SINK_ERROR, len(batch))
            finally:
                self._batch_done(len(batch))

    def _batch_done(self, windows: int) -> None:
        with self._idle:
            self._pending -= 1
            self._pending_windows -= windows
            self._idle.notify_all()


def _span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
