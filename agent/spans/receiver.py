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
 - What one request may cost is bounded before it is parsed (budget.py: spans and items per
   request), what all requests in flight together cost by the parse slots (at most
   parse_slots requests are parsed and decoded at once; the others wait parse_wait seconds,
   then get the retry-later answer), and the CPU a flood may take by the span rate (a token
   bucket of max_spans_per_second, shared by both receivers). docs/spans.md "Limits and
   worst-case memory" has the figures.
Counters are committed only when a request is accepted: a refused request will be retried by
its sender and must not be counted twice.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gpuphase.agent.spans.budget import (  # the receivers import these from here, with the reasons below
    DEFAULT_BUDGET,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_SPANS,
    TOO_MANY_ITEMS,  # noqa: F401
    TOO_MANY_SPANS,  # noqa: F401
    MalformedRequest,
    OverBudget,  # noqa: F401
    RequestBudget,
    check_protobuf,
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
RATE_LIMITED = "rate_limited"
BUSY = "busy"  # every parse slot stayed taken for parse_wait seconds

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 256
# ~8 MiB of windows: 32 requests of 512 vLLM spans, a few seconds of the accountant's work.
DEFAULT_MAX_QUEUED_WINDOWS = 32_768
RETRY_AFTER_SECONDS = 1  # a full queue drains within seconds (DEFAULT_MAX_QUEUED_WINDOWS); retry soon
# Far above what the agent decodes (~40k vLLM spans/s on one thread, ~18k/s through a receiver,
# docs/performance.md), so legit traffic never meets it; it caps floods of cheap spans (one no
# decoder claims costs 3-5 µs: 100k/s is then already a third to half of a core, all of it under
# the GIL the sampler needs). Bucket: one second of the rate, so bursts of a few requests pass.
DEFAULT_MAX_SPANS_PER_SECOND = 100_000
# Requests parsed and decoded at once. The GIL runs one at a time anyway; two keep one request's
# slow parse from holding up the others, and bound what is in flight to 2 × one request's worst case.
DEFAULT_PARSE_SLOTS = 2
# How long a request waits for a parse slot before the retry-later answer: a request at the caps
# takes ~0.5 s to scan, parse and decode, so a waiter gets a slot unless the agent is saturated.
DEFAULT_PARSE_WAIT_SECONDS = 1.0
QUEUE_FULL_MESSAGE = "span intake queue is full, retry later"
# After a request at least this large, freed memory goes back to the OS (glibc's malloc_trim):
# each receiver thread that parsed a large request otherwise keeps that request's peak in its own
# malloc arena, so the peak grew with the threads that ever parsed, not with the parse slots (16
# worst-case requests at once: ~150 MiB without, ~90 MiB with). A trim takes 3-25 ms.
TRIM_AFTER_BYTES = 1024 * 1024

Sink = Callable[[list[PhaseWindow]], None]


def parse_protobuf(body: bytes, budget: RequestBudget = DEFAULT_BUDGET) -> ExportTraceServiceRequest:
    """Raises OverBudget (too many spans or items: counted under its .reason, answered 413 /
    RESOURCE_EXHAUSTED) before anything is built, or MalformedRequest."""
    check_protobuf(body, budget)
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError) as error:
        raise MalformedRequest(f"invalid protobuf: {type(error).__name__}") from None
    return request


@dataclass(frozen=True)
class Submission:
    """The intake's answer to one request; queue_full means "tell the sender to retry" (the queue
    is full, the span rate is reached or no parse slot came free: `message` says which)."""

    queue_full: bool = False
    rejected_spans: int = 0
    error_message: str = ""
    message: str = QUEUE_FULL_MESSAGE  # for the retry-later answer

    def response(self) -> ExportTraceServiceResponse:
        response = ExportTraceServiceResponse()
        if self.rejected_spans:
            response.partial_success.rejected_spans = self.rejected_spans
            response.partial_success.error_message = self.error_message
        return response


_STOP = object()


class _SpanRate:
    """Token bucket of spans: `rate` per second, holding at most one second's worth. A request
    is let in when the bucket holds its spans, or is full (so one larger than a second's worth
    still gets in, leaving the bucket in debt)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, spans: int) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < min(spans, self.rate):
                return False
            self._tokens -= spans
            return True

    def give_back(self, spans: int) -> None:
        with self._lock:
            self._tokens = min(float(self.rate), self._tokens + spans)


class SpanIntake:
    def __init__(self, sink: Sink, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, max_queued_windows: int = DEFAULT_MAX_QUEUED_WINDOWS, *,
                 max_spans_per_request: int = DEFAULT_MAX_SPANS, max_items_per_request: int = DEFAULT_MAX_ITEMS,
                 max_spans_per_second: int = DEFAULT_MAX_SPANS_PER_SECOND, parse_slots: int = DEFAULT_PARSE_SLOTS,
                 parse_wait: float = DEFAULT_PARSE_WAIT_SECONDS):
        """max_spans_per_second 0: no rate limit."""
        if max_request_bytes < 1 or queue_size < 1 or max_queued_windows < 1 or parse_slots < 1:
            raise ValueError("max_request_bytes, queue_size, max_queued_windows and parse_slots must be positive")
        if max_spans_per_second < 0 or parse_wait < 0:
            raise ValueError("max_spans_per_second and parse_wait cannot be negative")
        self._sink = sink
        self.max_request_bytes = max_request_bytes
        self.budget = RequestBudget(max_spans_per_request, max_items_per_request)
        self.parse_slots = parse_slots
        self._slots = threading.BoundedSemaphore(parse_slots)
        self._parse_wait = parse_wait
        self._rate = _SpanRate(max_spans_per_second) if max_spans_per_second else None
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

    def handle(self, body: bytes, parse: Callable[[bytes, RequestBudget], ExportTraceServiceRequest]) -> Submission:
        """Parse (with this intake's budget) and submit one request body within a parse slot; the
        receivers' one call. Raises what parse raises: OverBudget (count it under .reason, answer
        413 / RESOURCE_EXHAUSTED), MalformedRequest. No slot within parse_wait: a retry-later
        Submission, counted as busy."""
        try:
            with self.parse_slot() as slot:
                if not slot:
                    return Submission(queue_full=True, message=f"all {self.parse_slots} parse slots are busy "
                                                               "(--otlp.max-concurrent-parses), retry later")
                return self.submit(parse(body, self.budget))
        finally:
            if len(body) >= TRIM_AFTER_BYTES and _malloc_trim is not None:
                _malloc_trim(0)

    @contextmanager
    def parse_slot(self) -> Iterator[bool]:
        """One of the parse_slots for a parse and decode; False (counted as busy) when none came free
        within parse_wait seconds. For a receiver that cannot use handle()."""
        if not self._slots.acquire(timeout=self._parse_wait):
            self.count_rejected(BUSY)
            yield False
            return
        try:
            yield True
        finally:
            self._slots.release()

    def submit(self, request: ExportTraceServiceRequest) -> Submission:
        """Decode one parsed request and queue its windows; called on network threads."""
        if self._queue.full() or self._pending_windows >= self._max_queued_windows:
            # fast path: do not spend CPU on a request we will refuse
            self.count_rejected(QUEUE_FULL, _span_count(request))
            return Submission(queue_full=True)
        spans = _span_count(request) if self._rate is not None else 0
        if spans and not self._rate.take(spans):
            self.count_rejected(RATE_LIMITED, spans)
            return Submission(queue_full=True, message=f"span rate limit of {self._rate.rate} spans/s "
                                                       "(--otlp.max-spans-per-second) reached, retry later")
        outcome = decode_request(request)
        if outcome.windows and not self._enqueue(outcome.windows):
            if spans:
                self._rate.give_back(spans)
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


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library, or none that ctypes can load)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def _span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
