"""Safe reading of OTLP attributes: untrusted AnyValues in, small checked Python values out.

Span attributes come from any process that can reach the receiver, so nothing here trusts them:
only the first MAX_ATTRIBUTES_INSPECTED attributes are looked at, only keys a decoder asked for
are kept and their values read only when it asks, strings longer than MAX_STRING_LENGTH and
nested values are replaced by INVALID (never stored), and the typed getters raise InvalidSpan
rather than guess (a "0.5" string where vLLM
sends a float is a broken or hostile sender, not a value to coerce).
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

MAX_ATTRIBUTES_INSPECTED = 128
MAX_STRING_LENGTH = 256
MAX_SERVICE_NAME_LENGTH = 128
MAX_ARRAY_ITEMS = 16
MAX_GPU_IDS = 16
MAX_PID = 2**22  # Linux pid_max ceiling (PID_MAX_LIMIT)
MAX_TOKENS = 10**9  # far beyond any context length; larger is a broken sender

UNKNOWN_SERVICE = "unknown_service"
GPU_IDS_ATTRIBUTE = "gpuphase.gpu.ids"

# GPU indices ("0") and UUIDs ("GPU-8f0e…", "MIG-…"); nothing that could smuggle label syntax.
_GPU_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,79}$")


class InvalidSpan(ValueError):
    """A span a decoder recognises whose values cannot make a sane window (counted invalid_window)."""


class UnmatchedSpan(Exception):
    """A span a decoder recognises but cannot place in a phase for a documented reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Invalid:
    """Marker for an attribute that was present but unusable (too long, nested, bytes)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()

Scalar = str | bool | int | float
Value = Scalar | tuple[Scalar, ...] | _Invalid


def _scalar(value: AnyValue, kind: str | None = None) -> Scalar | _Invalid:
    if kind is None:
        kind = value.WhichOneof("value")
    if kind == "string_value":
        text = value.string_value
        return text if len(text) <= MAX_STRING_LENGTH else INVALID
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    return INVALID  # bytes, kvlist, empty: nothing any decoder reads


def any_value(value: AnyValue) -> Value:
    """Convert one AnyValue; arrays of scalars become tuples, everything else unusable is INVALID."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        items = value.array_value.values
        if len(items) > MAX_ARRAY_ITEMS:
            return INVALID
        converted = tuple(_scalar(item) for item in items)
        return INVALID if any(item is INVALID for item in converted) else converted
    return _scalar(value, kind)


def read_attributes(attributes: Sequence[KeyValue], wanted: frozenset[str]) -> dict[str, KeyValue]:
    """The wanted keys among the first MAX_ATTRIBUTES_INSPECTED attributes (first occurrence wins).

    The KeyValues themselves, not their values: a value is converted only when a decoder asks for
    it with one of the getters below (vLLM spans carry latencies the decoder needs only as a
    fallback), and each getter converts straight to the type it checks for.
    """
    if len(attributes) > MAX_ATTRIBUTES_INSPECTED:
        attributes = attributes[:MAX_ATTRIBUTES_INSPECTED]
    found: dict[str, KeyValue] = {}
    for attribute in attributes:
        key = attribute.key  # a protobuf field read: once, not twice (this loop runs per attribute per span)
        if key in wanted and key not in found:
            found[key] = attribute
    return found


Found = Mapping[str, KeyValue]  # what read_attributes returns, what the getters read


def get_value(found: Found, key: str) -> Value | None:
    """The attribute as a checked Python value (see any_value); None when absent."""
    attribute = found.get(key)
    return None if attribute is None else any_value(attribute.value)


def get_float(found: Found, key: str) -> float | None:
    """A finite, non-negative number (seconds, mostly); None when absent."""
    attribute = found.get(key)
    if attribute is None:
        return None
    value = attribute.value
    kind = value.WhichOneof("value")
    if kind == "double_value":
        number = value.double_value
    elif kind == "int_value":
        number = float(value.int_value)
    else:  # strings, bools, arrays, bytes, maps, unset
        raise InvalidSpan(f"{key} is not a number")
    if not 0.0 <= number < math.inf:  # also false for NaN
        raise InvalidSpan(f"{key} is negative or not finite")
    return number


def get_count(found: Found, key: str) -> int | None:
    """A non-negative integer count (tokens, batch size); integral doubles are accepted."""
    attribute = found.get(key)
    if attribute is None:
        return None
    value = attribute.value
    kind = value.WhichOneof("value")
    if kind == "int_value":
        count = value.int_value
    elif kind == "double_value" and value.double_value.is_integer():  # False for inf and NaN
        count = int(value.double_value)
    else:
        raise InvalidSpan(f"{key} is not an integer")
    if not 0 <= count <= MAX_TOKENS:
        raise InvalidSpan(f"{key} is out of range")
    return count


def get_string(found: Found, key: str) -> str | None:
    """A string of at most MAX_STRING_LENGTH characters; None when absent or anything else."""
    value = get_value(found, key)
    return value if isinstance(value, str) else None


def first_count(found: Found, keys: tuple[str, ...]) -> int:
    """The first present count among keys (newest convention first); 0 when none is present."""
    for key in keys:
        if key in found:
            return get_count(found, key)
    return 0


def optional_pid(value: Value | None) -> int | None:
    """A pid hint: int or decimal string in 1..MAX_PID; anything else is ignored, not fatal.

    The pid only helps the mapper find the GPU; a window with a garbled pid is still a valid window
    that the mapper can place by service.
    """
    if isinstance(value, str) and value.isdecimal() and len(value) <= 8:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= MAX_PID else None


def service_name(found: Found) -> str:
    name = get_value(found, "service.name")
    if not isinstance(name, str) or not name.strip():
        return UNKNOWN_SERVICE
    return name.strip()[:MAX_SERVICE_NAME_LENGTH]


def gpu_ids(value: Value | None) -> tuple[str, ...]:
    """GPU ids from a string list or a comma-separated string; invalid ids raise InvalidSpan.

    A sender that names GPUs explicitly and gets them wrong must hear about it (counted), rather
    than have its time silently attributed somewhere else.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items: tuple[Scalar, ...] = tuple(part.strip() for part in value.split(",") if part.strip())
    elif isinstance(value, tuple):
        items = tuple(str(item) if isinstance(item, int) and not isinstance(item, bool) else item
                      for item in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = (str(value),)
    else:
        raise InvalidSpan(f"{GPU_IDS_ATTRIBUTE} is not a list of GPU ids")
    if len(items) > MAX_GPU_IDS:
        raise InvalidSpan(f"{GPU_IDS_ATTRIBUTE} names too many GPUs")
    for item in items:
        if not isinstance(item, str) or not _GPU_ID_PATTERN.match(item):
            raise InvalidSpan(f"{GPU_IDS_ATTRIBUTE} holds an invalid GPU id")
    return tuple(dict.fromkeys(items))  # de-duplicated, order kept
