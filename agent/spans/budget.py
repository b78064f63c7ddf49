"""Per-request budgets: how many spans and other messages one OTLP request may make, checked
before anything is materialised.

The size limit counts bytes, not messages, and a message costs far more memory parsed than on the
wire: an empty Span is 2 bytes of protobuf (`12 00`) and ~177 bytes of upb message, so one 4 MiB
request of 2M empty spans took ~350 MiB to parse (the agent ships with a 384Mi memory limit).
OTLP/JSON is the same: 1.4M `{}` spans are 100 MiB of Python dicts before ParseDict doubles it.
So a request is counted first, cheaply, and refused (413 / RESOURCE_EXHAUSTED) over the caps:

 - protobuf: a walk over the wire format (varint tags, length-delimited fields skipped or entered)
   that builds nothing. It counts every message the parse would create: spans, and "items" — all
   the other messages: resource_spans, resources, scope_spans, scopes, attributes (a KeyValue and
   its AnyValue together count one item), events, links, statuses, entity refs, and every
   ArrayValue / KeyValueList and the values in them. Each costs ≤ 88 bytes parsed (a link; a
   KeyValue with its value 88, an AnyValue in an array 48, docs/spans.md "Limits"). The counted
   schema is read off the installed protobuf descriptors, so it cannot drift from what upb
   parses. A repeated singular message (two `status` fields) merges into one when parsed; the
   scan counts both, so it may overcount, never undercount. It stops at the first cap exceeded.
   Every counted message needs at least 2 bytes on the wire, so a body of at most 2 × cap bytes
   cannot exceed that cap: small bodies are not scanned at all, and bodies up to 2 × max_items
   are only walked down to the spans (one step per span). Only larger ones are walked in full
   (0.7-1 µs per attribute, about what decoding it costs).
 - OTLP/JSON: before json.loads, a C-speed bound on what it can build: commas + colons + `{` +
   `[` in the body bound the JSON values, members and containers (each ≤ ~82 bytes as Python
   objects, unique keys and 2-character strings being the worst); at most JSON_TOKENS_PER_ITEM ×
   max_items. Then the decoded document is counted against the same two caps as protobuf, with
   the same schema (json_format accepts both lowerCamelCase and the proto field names).

A request within the caps can still hold up to its byte size in strings (upb copies them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

# Rejection reasons (gpu_spans_rejected_total{reason}).
TOO_MANY_SPANS = "too_many_spans"
TOO_MANY_ITEMS = "too_many_items"

# Defaults, sized in docs/spans.md ("Limits and worst-case memory"): at the caps one request
# costs ≤ 16,384 × ~720 B (span parsed + its decoded windows) + 262,144 × ≤ 88 B (items) ≈ 33 MiB,
# plus its strings (≤ the request size). An OTel SDK batch is ≤ 512 spans (×20 attributes: 10k
# items); a 4 MiB request of ordinary spans holds 5-10k spans and ~100k items.
DEFAULT_MAX_SPANS = 16_384
DEFAULT_MAX_ITEMS = 262_144
# OTLP/JSON: an attribute `{"key":"k","value":{"intValue":1}}` is 7 tokens; a vLLM span with 20
# attributes ~155. Twice max_items lets a 4 MiB JSON request of ordinary spans through (4,300 vLLM
# spans: ~375k tokens; 2,500 with 20 attributes: ~400k) and bounds json.loads at ~524k × 82 B ≈ 41 MiB.
JSON_TOKENS_PER_ITEM = 2

SPANS_FLAG = "--otlp.max-spans-per-request"
ITEMS_FLAG = "--otlp.max-items-per-request"

# upb refuses a message (or group) nested deeper than this below the request (python/message.c:
# max depth 100); the scan does the same instead of recursing further.
MAX_DEPTH = 100


class MalformedRequest(ValueError):
    """The payload is not an ExportTraceServiceRequest (counted as rejected{reason="malformed"})."""


class OverBudget(MalformedRequest):
    """The request would make more spans or items than its budget allows (413 / RESOURCE_EXHAUSTED).

    A MalformedRequest so that a caller that knows only that class still refuses it (400) instead
    of failing; the receivers catch OverBudget first and answer 413 / RESOURCE_EXHAUSTED, counted
    under `reason`.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RequestBudget:
    max_spans: int = DEFAULT_MAX_SPANS
    max_items: int = DEFAULT_MAX_ITEMS

    def __post_init__(self) -> None:
        if self.max_spans < 1 or self.max_items < 1:
            raise ValueError("max_spans and max_items must be positive")

    @property
    def max_json_tokens(self) -> int:
        return JSON_TOKENS_PER_ITEM * self.max_items

    def too_many_spans(self, at_least: int) -> OverBudget:
        return OverBudget(TOO_MANY_SPANS, f"request has {'more than ' if at_least > self.max_spans else ''}"
                                          f"{at_least} spans, over the limit of {self.max_spans} "
                                          f"({SPANS_FLAG}); send smaller batches")

    def too_many_items(self, what: str) -> OverBudget:
        return OverBudget(TOO_MANY_ITEMS, f"request has {what}, over the limit of {self.max_items} attributes, "
                                          f"events, links and other items ({ITEMS_FLAG}); send smaller batches")


DEFAULT_BUDGET = RequestBudget()


@dataclass
class Counts:
    spans: int = 0
    items: int = 0


# --- the schema: which fields hold messages, and how each is counted -----------------------------

_SPAN, _ITEM, _PART = 0, 1, 2  # _PART: a KeyValue's value, counted with its KeyValue


def _build_schema(descriptor: Descriptor, memo: dict[str, dict]) -> dict:
    """{tag: (kind, child schema)} of a message type's message fields; tags with wire type 2."""
    schema: dict = {}
    memo[descriptor.full_name] = schema  # before the fields: AnyValue and ArrayValue refer to each other
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_GROUP:  # pragma: no cover - OTLP has none
            raise TypeError(f"{field.full_name}: groups are not scanned")
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        child = field.message_type
        kind = (_SPAN if child.full_name == Span.DESCRIPTOR.full_name else
                _PART if descriptor.full_name == KeyValue.DESCRIPTOR.full_name and field.name == "value" else _ITEM)
        schema[field.number << 3 | 2] = (kind, memo[child.full_name] if child.full_name in memo
                                         else _build_schema(child, memo))
    return schema


_MEMO: dict[str, dict] = {}
_ROOT = _build_schema(ExportTraceServiceRequest.DESCRIPTOR, _MEMO)


def _json_schema(descriptor: Descriptor, memo: dict[str, dict]) -> dict:
    """{key: (kind, repeated, child schema)}; both the JSON name and the proto name (ParseDict takes both)."""
    schema: dict = {}
    memo[descriptor.full_name] = schema
    for field in descriptor.fields:
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        kind, _ = _MEMO[descriptor.full_name][field.number << 3 | 2]
        name = field.message_type.full_name
        child = memo[name] if name in memo else _json_schema(field.message_type, memo)
        entry = (kind, field.is_repeated, child)
        schema[field.json_name] = schema[field.name] = entry
    return schema


_JSON_ROOT = _json_schema(ExportTraceServiceRequest.DESCRIPTOR, {})
_KEY_VALUE = _MEMO[KeyValue.DESCRIPTOR.full_name]


# --- protobuf -------------------------------------------------------------------------------------


def check_protobuf(body: bytes, budget: RequestBudget = DEFAULT_BUDGET) -> None:
    """Raise OverBudget if parsing body would exceed the budget, MalformedRequest if the scan finds
    it broken; return quietly otherwise (upb still validates everything the scan does not look at)."""
    most = len(body) // 2  # every counted message takes at least a tag byte and a length byte
    if most <= budget.max_spans and most <= budget.max_items:
        return
    if most <= budget.max_items:
        spans = _count_spans_only(body, budget.max_spans)
        if spans > budget.max_spans:
            raise budget.too_many_spans(spans)
        return
    scan_protobuf(body, budget)


def scan_protobuf(body: bytes, budget: RequestBudget | None = None) -> Counts:
    """Count the spans and items a parse of body would create, walking the whole wire format.
    With a budget, stop with OverBudget at the first cap exceeded."""
    counts = _Counter(budget)
    try:
        end = _scan(body, 0, len(body), _ROOT, 0, counts)
    except IndexError:  # a varint or field runs off the end of the buffer
        raise MalformedRequest("invalid protobuf: truncated field") from None
    if end != len(body):
        raise MalformedRequest("invalid protobuf: truncated field")
    return Counts(counts.spans, counts.items)


class _Counter:
    __slots__ = ("budget", "items", "max_items", "max_spans", "spans")

    def __init__(self, budget: RequestBudget | None):
        self.spans = self.items = 0
        self.budget = budget
        self.max_spans = budget.max_spans if budget else -1
        self.max_items = budget.max_items if budget else -1

    def over(self) -> OverBudget:
        assert self.budget is not None
        if self.max_spans >= 0 and self.spans > self.max_spans:
            return self.budget.too_many_spans(self.spans)
        return self.budget.too_many_items(f"more than {self.max_items} items")


def _malformed(what: str) -> MalformedRequest:
    return MalformedRequest(f"invalid protobuf: {what}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A varint starting at pos (the caller has seen its first byte is ≥ 0x80); (value, next pos)."""
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _malformed("varint longer than 10 bytes")


# _scan and _fields read tags and lengths inline (one-byte fast path, _varint for longer ones)
# rather than through a shared helper: this is the per-field loop of every large request, and a
# call per tag and per length took a loop over 1M empty fields from 0.21 s to 0.43-0.53 s (CPython 3.11).
def _scan(buf: bytes, pos: int, end: int, schema: dict, depth: int, counts: _Counter) -> int:
    """Walk the fields of one message in buf[pos:end]; returns the position after the last one.
    Enters the fields schema names (counting them), skips the rest."""
    if depth > MAX_DEPTH:
        raise _malformed("nested too deeply")
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _varint(buf, pos - 1)
            if tag > 0xFFFFFFFF:
                raise _malformed("tag out of range")
        if tag < 8:
            raise _malformed("field number 0")
        wire = tag & 7
        if wire == 2:
            length = buf[pos]
            pos += 1
            if length >= 0x80:
                length, pos = _varint(buf, pos - 1)
            stop = pos + length
            if stop > end:
                raise _malformed("length-delimited field runs past its message")
            entry = schema.get(tag)
            if entry is not None:
                kind, child = entry
                if kind == _ITEM:
                    counts.items += 1
                    if counts.items == counts.max_items + 1:
                        raise counts.over()
                elif kind == _SPAN:
                    counts.spans += 1
                    if counts.spans == counts.max_spans + 1:
                        raise counts.over()
                if length and not (child is _KEY_VALUE and _plain_key_value(buf, pos, stop)) \
                        and _scan(buf, pos, stop, child, depth + 1, counts) != stop:
                    raise _malformed("truncated field")
            pos = stop
        elif wire == 0:
            start = pos
            while buf[pos] >= 0x80:
                pos += 1
            pos += 1
            if pos - start > 10:
                raise _malformed("varint longer than 10 bytes")
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 3:
            pos = _skip_group(buf, pos, end, tag >> 3, depth + 1)
        else:  # 4: an end-group with no group open; 6, 7: no such wire type
            raise _malformed(f"wire type {wire}")
    return pos


def _plain_key_value(buf: bytes, pos: int, end: int) -> bool:
    """True for the usual attribute: a key shorter than 128 bytes, then a value of one short
    string, a bool, a double or a one-byte int, exactly filling buf[pos:end] (so nothing in it is
    a message). Saves two calls and three field steps per attribute; anything else (a length of
    two bytes or more included: its first byte alone would point elsewhere) is walked field by field."""
    key_length = buf[pos + 1] if buf[pos] == 0x0A else 0x80  # key: tag 1, length-delimited
    if key_length >= 0x80:
        return False
    value = pos + 2 + key_length
    if value + 3 > end or buf[value] != 0x12:  # value: tag 2, length-delimited
        return False
    value_length = buf[value + 1]
    if value_length >= 0x80 or value + 2 + value_length != end:  # the value ends the KeyValue
        return False
    tag, size = buf[value + 2], value_length - 1  # the AnyValue's one field, and its size after the tag
    if tag == 0x21:  # double_value (fixed64)
        return size == 8
    if tag == 0x0A:  # string_value
        return size >= 1 and buf[value + 3] == size - 1  # size - 1 < 127: a one-byte length
    if tag == 0x10 or tag == 0x18:  # bool_value, int_value as a one-byte varint
        return size == 1 and buf[value + 3] < 0x80
    return False


def _skip_group(buf: bytes, pos: int, end: int, number: int, depth: int) -> int:
    """Skip a group up to its end-group tag. upb keeps a group as unknown bytes, even one under a
    message field's number (OTLP has no group fields): nothing in it is a message."""
    if depth > MAX_DEPTH:
        raise _malformed("nested too deeply")
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _varint(buf, pos - 1)
        wire = tag & 7  # (upb takes field number 0 inside a group)
        if wire == 4:
            if tag >> 3 != number:
                raise _malformed("mismatched end-group")
            return pos
        if wire == 2:
            length = buf[pos]
            pos += 1
            if length >= 0x80:
                length, pos = _varint(buf, pos - 1)
            pos += length
        elif wire == 0:
            while buf[pos] >= 0x80:
                pos += 1
            pos += 1
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 3:
            pos = _skip_group(buf, pos, end, tag >> 3, depth + 1)
        else:
            raise _malformed(f"wire type {wire}")
    raise _malformed("unterminated group")


_RESOURCE_SPANS_TAG = 1 << 3 | 2  # ExportTraceServiceRequest.resource_spans
_SCOPE_SPANS_TAG = 2 << 3 | 2  # ResourceSpans.scope_spans
_SPANS_TAG = 2 << 3 | 2  # ScopeSpans.spans


def _count_spans_only(buf: bytes, cap: int) -> int:
    """Spans in the request, stopping past cap; entered only down to ScopeSpans. Not a validation:
    what it does not enter is left to upb, and where it finds the framing broken it says so."""
    spans = 0
    try:
        for rs_start, rs_end in _fields(buf, 0, len(buf), _RESOURCE_SPANS_TAG):
            for ss_start, ss_end in _fields(buf, rs_start, rs_end, _SCOPE_SPANS_TAG):
                for _ in _fields(buf, ss_start, ss_end, _SPANS_TAG):
                    spans += 1
                    if spans > cap:
                        return spans
    except IndexError:
        raise _malformed("truncated field") from None
    return spans


def _fields(buf: bytes, pos: int, end: int, wanted: int):
    """(start, end) of every length-delimited field with tag `wanted` in buf[pos:end]; others skipped."""
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _varint(buf, pos - 1)
        wire = tag & 7
        if wire == 2:
            length = buf[pos]
            pos += 1
            if length >= 0x80:
                length, pos = _varint(buf, pos - 1)
            stop = pos + length
            if stop > end:
                raise _malformed("length-delimited field runs past its message")
            if tag == wanted:
                yield pos, stop
            pos = stop
        elif wire == 0:
            while buf[pos] >= 0x80:
                pos += 1
            pos += 1
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 3:
            pos = _skip_group(buf, pos, end, tag >> 3, 1)
        else:
            raise _malformed(f"wire type {wire}")


# --- OTLP/JSON ------------------------------------------------------------------------------------


def check_json_body(body: bytes, budget: RequestBudget = DEFAULT_BUDGET) -> None:
    """Before json.loads: an upper bound on the values, members and containers it would build
    (string contents are counted too, so it can only overcount)."""
    tokens = body.count(b",") + body.count(b":") + body.count(b"{") + body.count(b"[")
    if tokens > budget.max_json_tokens:
        raise budget.too_many_items(f"{tokens} JSON values, members and containers (more than "
                                    f"{JSON_TOKENS_PER_ITEM} per item allowed)")


def count_json_document(document: Any, budget: RequestBudget | None = None) -> Counts:
    """Count the spans and items ParseDict would create from a decoded OTLP/JSON document (what
    the protobuf scan counts for the same request), stopping at the first cap exceeded."""
    counts = _Counter(budget)
    if isinstance(document, dict):
        _count_json(document, _JSON_ROOT, 0, counts)
    return Counts(counts.spans, counts.items)


def _count_json(obj: dict, schema: dict, depth: int, counts: _Counter) -> None:
    if depth > MAX_DEPTH:  # ParseDict refuses deeper nesting too (max_recursion_depth)
        raise MalformedRequest("invalid OTLP/JSON: nested too deeply")
    for key, value in obj.items():
        entry = schema.get(key)
        if entry is None:
            continue
        kind, repeated, child = entry
        values = value if repeated and isinstance(value, list) else (value,)
        for element in values:
            if not isinstance(element, dict):
                continue  # ParseDict refuses it (or, for null, sets nothing)
            if kind == _ITEM:
                counts.items += 1
                if counts.items == counts.max_items + 1:
                    raise counts.over()
            elif kind == _SPAN:
                counts.spans += 1
                if counts.spans == counts.max_spans + 1:
                    raise counts.over()
            if element:
                _count_json(element, child, depth + 1, counts)
