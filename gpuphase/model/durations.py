"""Durations as Prometheus writes them ("90s", "1m30s", "500ms", "6h"), and the agent's shortest ones.

One parser for the agent's settings and the alert rules' windows. A bare number is seconds
(YAML `interval: 1.5`); each part may have a fraction ("1.5s"), which Prometheus itself does not
accept, so alert windows additionally insist on whole seconds (see gpuphase.alerts.rules).
"""

from __future__ import annotations

import re
from typing import Any

# The shortest sampling period: NVML's GPM needs two samples at least 100 ms apart.
MIN_SAMPLE_INTERVAL = 0.1
# The shortest metrics push period: each push is a full render plus an RPC; faster is scraping.
MIN_PUSH_INTERVAL = 1.0

# Largest unit first, as Prometheus requires; each at most once.
_UNITS = (("y", 365 * 86400.0), ("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0),
          ("ms", 0.001))
_UNIT_SECONDS = dict(_UNITS)
_UNIT_ORDER = {unit: rank for rank, (unit, _) in enumerate(_UNITS)}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|[smhdwy])")
_BARE = re.compile(rf"\s*({_NUMBER})\s*")
_EXAMPLE = "a duration such as 1s, 500ms or 1m30s"


def parse_duration(value: Any) -> float:
    """Seconds from 1.5, '1.5', '500ms', '2s', '1m30s', '5m', '1h', '7d'."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_EXAMPLE}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return seconds
    text = str(value)
    bare = _BARE.fullmatch(text)
    if bare:
        return float(bare.group(1))
    seconds, position, previous = 0.0, 0, -1
    for match in _PART.finditer(text):
        rank = _UNIT_ORDER[match.group(2)]
        if match.start() != position or rank <= previous:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position, previous = match.end(), rank
    if position == 0 or text[position:].strip():
        raise ValueError(f"expected {_EXAMPLE}, got {value!r}")
    return seconds


def format_duration(seconds: int) -> str:
    """5400 -> '90m': the largest unit that divides exactly, as Prometheus accepts it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
