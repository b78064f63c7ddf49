"""OTLP/JSON → ExportTraceServiceRequest, within a request budget (agent/spans/budget.py).

The steps, each bounded by the one before: a C-speed count of the JSON tokens in the body bounds
what json.loads may build; the decoded document is counted against the same span and item caps as
a protobuf request; only then does json_format.ParseDict build the message.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gpuphase.agent.spans.budget import (
    DEFAULT_BUDGET,
    MalformedRequest,
    OverBudget,
    RequestBudget,
    check_json_body,
    count_json_document,
)


# OTLP/JSON differs from the proto3 JSON mapping in one way that matters: trace and span ids are
# hex strings, not base64. Convert them before json_format sees them.
def _hex_ids_to_base64(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise MalformedRequest(f"{key} is not hex") from None


def _list(obj: Any, key: str) -> list:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, list) else []


def parse_otlp_json(body: bytes, budget: RequestBudget = DEFAULT_BUDGET) -> ExportTraceServiceRequest:
    """Raises OverBudget (413 / too_many_spans, too_many_items) or MalformedRequest (400)."""
    check_json_body(body, budget)  # before json.loads: it never builds an unbounded document
    try:
        document = json.loads(body)
        count_json_document(document, budget)
        for resource_spans in _list(document, "resourceSpans"):
            for scope_spans in _list(resource_spans, "scopeSpans"):
                for span in _list(scope_spans, "spans"):
                    if isinstance(span, dict):
                        _hex_ids_to_base64(span, ("traceId", "spanId", "parentSpanId"))
                        for link in _list(span, "links"):
                            if isinstance(link, dict):
                                _hex_ids_to_base64(link, ("traceId", "spanId"))
        return json_format.ParseDict(document, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (MalformedRequest, OverBudget):
        raise
    except (ValueError, TypeError, RecursionError, json_format.ParseError) as error:
        raise MalformedRequest(f"invalid OTLP/JSON: {type(error).__name__}") from None
