"""SGLang request traces (`--enable-trace`) → phase windows, joined to the thread span's pid.

What SGLang sends (sgl-project/sglang, python/sglang/srt/observability/trace.py and
req_time_stats.py in 0.5.2x; python/sglang/srt/tracing/trace.py before; docs/spans.md):

* a root span `"{role} Req {rid[:8]}"` per request (role "" when not disaggregated, so the name
  starts with a space), scope `sglang server`, attributes `rid`, `module`; from 0.5.9 it ends
  with `gen_ai.usage.prompt_tokens` / `completion_tokens` / `cached_tokens` and `gen_ai.latency.*`
  (which is why the vLLM decoder must leave it alone: vllm.py asks `is_root_span`);
* one *thread span* per request and traced thread, child of the root:
  `"Scheduler [TP r] [PP p] (host:xxxxxxxx | pid:N)"` with attributes `pid` (the thread's native
  id: the scheduler process's main thread, so the pid of the process that holds TP rank r's GPU),
  `tp_rank`, `pp_rank`, `dp_rank`, `host_id`, `thread_label`; the API server's own thread span has
  no `tp_rank`. Thread spans end when the request ends, after their slices;
* *slice* spans, children of the thread span or of the enclosing slice, with **no pid**:
  `prefill_forward` (level 1; from forward entry to prefill finished) with `chunked_prefill`
  children (level 3) tiling it, `decode_forward` (level 1; first decode step scheduled to
  completion) with one `decode_loop` child per decode step (level 3) tiling it, and waiting /
  dispatch slices that are not GPU work (left unclaimed: unknown_span). 0.5.3–0.5.4 named the
  slices `prefill` and `decode loop` (accepted under the `sglang server` scope only).

So the pid is on another span than the windows, and that span arrives last. The join
(`SglangJoiner`, one per process, thread-safe) keeps per trace the thread spans seen and the
windows waiting for theirs, all bounded (docs/spans.md, "SGLang"):

* a slice whose ancestor thread span is known is emitted at once with the thread's pid; else it is
  held. Consecutive steps of one parent (decode_loop after decode_loop) are merged into one held
  window while they abut, so a request holds a few windows, not one per token;
* a thread span releases every held window of its trace below it, with its pid;
* a coarse slice (`prefill_forward`, `decode_forward`) that has fine children (`chunked_prefill`,
  `decode_loop`, SGLANG_TRACE_LEVEL >= 3) is dropped: the children cover the same time exactly and
  leave out what is not work (a retracted request's wait inside decode_forward). Without children
  (levels 1-2) the coarse slice is the window. Phase time is a union either way;
* the root span's token counts become two zero-length windows at its end (prompt tokens prefill,
  completion tokens decode) with the pid of the API server's thread span: the process whose
  children hold the TP group, so each GPU of the group counts the request's tokens once, as for a
  vLLM TP group. Slices carry no tokens;
* bounds: at most MAX_TRACES traces remembered (least recently touched first out) and
  MAX_HELD_WINDOWS windows held; a trace untouched for TRACE_TTL_SECONDS is forgotten. A held
  window forced out by a bound is emitted without the thread's pid (the resource's, if any): placed
  by `--phase.map` only, never lost.

A slice that carries its own `pid` attribute (not SGLang's shape today, but cheap to honour) is
emitted at once with it, as is one without a parent span.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from typing import Callable

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gpuphase.agent.spans import attributes as attrs
from gpuphase.agent.spans.decoders.common import ResourceInfo, make_window, span_ids, span_seconds
from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow

NAME = "sglang"
SCOPE = "sglang server"  # trace.get_tracer("sglang server") in every version's trace.py

# slice name -> (phase, coarse: a window only if it has no fine children)
SLICES = {
    "prefill_forward": (PREFILL, True),
    "chunked_prefill": (PREFILL, False),
    "decode_forward": (DECODE, True),
    "decode_loop": (DECODE, False),
}
OLD_SLICES = {"prefill": (PREFILL, False), "decode loop": (DECODE, False)}  # 0.5.3-0.5.4, scope-gated
FINE = frozenset({"chunked_prefill", "decode_loop"})
PHASE_BY_SLICE = {name: phase for name, (phase, _) in {**SLICES, **OLD_SLICES}.items()}  # docs, tests

PROMPT_TOKENS = ("gen_ai.usage.prompt_tokens", "gen_ai.usage.input_tokens")
COMPLETION_TOKENS = ("gen_ai.usage.completion_tokens", "gen_ai.usage.output_tokens")
CACHED_TOKENS = "gen_ai.usage.cached_tokens"  # part of the prompt served from the radix cache: not subtracted

KEYS = frozenset({"pid", "tp_rank", "thread_label", "rid", *PROMPT_TOKENS, *COMPLETION_TOKENS})

# " Req 1a2b3c4d", "prefill Req 1a2b3c4d", "Req 1a2b3c4d" (before roles): trace_req_start's name.
_ROOT_NAME = re.compile(r"^ ?(?:[a-z]+ )?Req \S{1,64}$")

MAX_TRACES = 8_192
MAX_HELD_WINDOWS = 16_384
TRACE_TTL_SECONDS = 600.0  # longer than any request is held: its windows would be too late anyway
MERGE_GAP_SECONDS = 1e-6  # decode_loop n+1 starts where n ended (the same timestamp, in ns)


def is_root_span(scope: InstrumentationScope, name: str, found: attrs.Found) -> bool:
    """SGLang's per-request root span (which carries vLLM-like gen_ai.latency.* from 0.5.9)."""
    return "rid" in found and (scope.name == SCOPE or _ROOT_NAME.match(name) is not None)


class _Trace:
    __slots__ = ("threads", "api_pid", "parents", "covered", "emitted", "held", "tokens", "touched")

    def __init__(self, now: float) -> None:
        self.threads: dict[bytes, int | None] = {}  # scheduler thread span id -> pid
        self.api_pid: int | None = None  # the API server's thread span (no tp_rank)
        self.parents: dict[bytes, bytes] = {}  # coarse slice id -> its parent span id
        self.covered: set[bytes] = set()  # coarse slices with fine children
        self.emitted: set[bytes] = set()  # coarse slices already emitted
        self.held: list[list] = []  # [window, parent id, own id, fine]
        self.tokens: list[PhaseWindow] | None = None  # root token windows waiting for api_pid
        self.touched = now


class SglangJoiner:
    """The bounded state joining slices to their thread span's pid (see the module docstring)."""

    def __init__(self, max_traces: int = MAX_TRACES, max_held: int = MAX_HELD_WINDOWS,
                 ttl: float = TRACE_TTL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_traces, self.max_held, self.ttl, self._clock = max_traces, max_held, ttl, clock
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.forced = 0  # windows emitted without the thread's pid because of a bound (for tests)

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()
            self._held = 0
            self.forced = 0

    def held(self) -> int:
        return self._held

    def traces(self) -> int:
        return len(self._traces)

    # --- the three kinds of span ---------------------------------------------------------------

    def slice(self, trace_id: bytes, span_id: bytes, parent: bytes, window: PhaseWindow,
              coarse: bool, fine: bool) -> list[PhaseWindow]:
        out: list[PhaseWindow] = []
        with self._lock:
            trace = self._trace(trace_id, out)
            if coarse:
                trace.parents[span_id] = parent
            elif fine:
                if parent in trace.emitted:
                    return out  # its coarse parent went out already and covers it
                trace.covered.add(parent)
            found, pid = self._resolve(trace, parent)
            if found:
                if not (coarse and span_id in trace.covered):
                    if coarse:
                        trace.emitted.add(span_id)
                    out.append(window if pid is None else window._replace(pid=pid))
                if coarse and trace.held:  # fine children held before their parent arrived
                    self._release(trace, out)
                return out
            held = trace.held
            if fine:  # merge with the held run of the same parent when they abut (TP ranks interleave)
                for last in reversed(held[-8:]):
                    if last[1] == parent and last[3]:
                        run = last[0]
                        if run.start - MERGE_GAP_SECONDS <= window.start <= run.end + MERGE_GAP_SECONDS:
                            if window.end > run.end:
                                last[0] = run._replace(end=window.end)
                            return out
                        break
            held.append([window, parent, span_id, fine])
            self._held += 1
            if self._held > self.max_held:
                self._force_oldest(out)
        return out

    def thread(self, trace_id: bytes, span_id: bytes, pid: int | None, scheduler: bool) -> list[PhaseWindow]:
        out: list[PhaseWindow] = []
        with self._lock:
            trace = self._trace(trace_id, out)
            if not scheduler:
                trace.api_pid = pid if pid is not None else trace.api_pid
                if trace.tokens is not None:
                    out += self._with_pid(trace.tokens, trace.api_pid)
                    trace.tokens = None
                return out
            trace.threads[span_id] = pid
            self._release(trace, out)
        return out

    def _release(self, trace: _Trace, out: list[PhaseWindow]) -> None:
        """Emit the held windows of the trace whose thread span is now known."""
        keep = []
        for entry in trace.held:
            found, thread_pid = self._resolve(trace, entry[1])
            if not found:
                keep.append(entry)
                continue
            self._held -= 1
            window, own = entry[0], entry[2]
            if not entry[3]:  # coarse: only if no fine child came
                if own in trace.covered:
                    continue
                trace.emitted.add(own)
            out.append(window if thread_pid is None else window._replace(pid=thread_pid))
        trace.held = keep

    def root(self, trace_id: bytes, windows: list[PhaseWindow]) -> list[PhaseWindow]:
        out: list[PhaseWindow] = []
        with self._lock:
            trace = self._trace(trace_id, out)
            if trace.api_pid is not None:
                out += self._with_pid(windows, trace.api_pid)
            else:
                trace.tokens = windows  # released by the API thread span, or without a pid by a bound
        return out

    # --- state ---------------------------------------------------------------------------------

    def _trace(self, trace_id: bytes, out: list[PhaseWindow]) -> _Trace:
        now = self._clock()
        traces = self._traces
        trace = traces.get(trace_id)
        if trace is None:
            trace = traces[trace_id] = _Trace(now)
            if len(traces) > self.max_traces:
                self._forget(traces.popitem(last=False)[1], out)
        else:
            trace.touched = now
            traces.move_to_end(trace_id)
        oldest = next(iter(traces.values()))
        while oldest is not trace and now - oldest.touched > self.ttl:
            self._forget(traces.popitem(last=False)[1], out)
            oldest = next(iter(traces.values()))
        return trace

    def _forget(self, trace: _Trace, out: list[PhaseWindow]) -> None:
        """A trace leaves the state: what it still holds goes out without the thread's pid."""
        for window, _, own, fine in trace.held:
            if fine or own not in trace.covered:
                out.append(window)
                self.forced += 1
        self._held -= len(trace.held)
        if trace.tokens:
            out += trace.tokens
            self.forced += len(trace.tokens)

    def _force_oldest(self, out: list[PhaseWindow]) -> None:
        for trace in self._traces.values():
            if trace.held:
                window, _, own, fine = trace.held.pop(0)
                self._held -= 1
                if fine or own not in trace.covered:
                    out.append(window)
                    self.forced += 1
                return

    @staticmethod
    def _resolve(trace: _Trace, parent: bytes) -> tuple[bool, int | None]:
        """(whether the thread span above `parent` is known, its pid)."""
        for _ in range(16):  # slices nest a few levels at most (a retracted request: 3)
            if parent in trace.threads:
                return True, trace.threads[parent]
            parent = trace.parents.get(parent)
            if parent is None:
                return False, None
        return False, None

    @staticmethod
    def _with_pid(windows: list[PhaseWindow], pid: int | None) -> list[PhaseWindow]:
        return windows if pid is None else [w._replace(pid=pid) for w in windows]


JOINER = SglangJoiner()


def decode(resource: ResourceInfo, scope: InstrumentationScope, span: Span, name: str,
           found: attrs.Found) -> list[PhaseWindow] | None:
    shape = SLICES.get(name)
    if shape is None:
        if "thread_label" in found and "pid" in found:
            return _thread(span, found)
        if "rid" in found and is_root_span(scope, name, found):
            return _root(resource, span, found)
        if scope.name != SCOPE:
            return None
        shape = OLD_SLICES.get(name)
        if shape is None:
            return None
    phase, coarse = shape
    start, end = span_seconds(span)
    ids = span_ids(span)
    if "pid" in found:  # a slice that names its own process
        pid = attrs.optional_pid(attrs.get_value(found, "pid"))
        return [make_window(phase, start, end, ids, resource, NAME, 0, pid)]
    window = make_window(phase, start, end, ids, resource, NAME, 0)
    parent = span.parent_span_id
    if len(parent) != 8:
        return [window]  # nothing to join to
    return JOINER.slice(span.trace_id, span.span_id, parent, window, coarse, name in FINE)


def _thread(span: Span, found: attrs.Found) -> list[PhaseWindow]:
    span_ids(span)  # a thread span without ids could never be joined: invalid like any other
    pid = attrs.optional_pid(attrs.get_value(found, "pid"))
    return JOINER.thread(span.trace_id, span.span_id, pid, "tp_rank" in found)


def _root(resource: ResourceInfo, span: Span, found: attrs.Found) -> list[PhaseWindow]:
    _, end = span_seconds(span)
    ids = span_ids(span)
    prompt = attrs.first_count(found, PROMPT_TOKENS)
    completion = attrs.first_count(found, COMPLETION_TOKENS)
    windows = []
    if prompt:
        windows.append(make_window(PREFILL, end, end, ids, resource, NAME, prompt))
    if completion:
        windows.append(make_window(DECODE, end, end, ids, resource, NAME, completion))
    if not windows:
        return []
    return JOINER.root(span.trace_id, windows)
