"""What a benchmark returns: figures with their same-run baseline, goal and verdict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """One measured number. `ratio` is value / baseline_value (both measured in the same run)."""

    name: str
    value: float
    unit: str
    baseline: str = ""  # what the baseline is, in words
    baseline_value: float | None = None
    goal: str = ""  # e.g. "≥ 20000 spans/s"; empty when the figure is informative only
    met: bool | None = None  # None: no goal
    note: str = ""  # for a missed goal: why, and what it would take

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0) or not math.isfinite(self.baseline_value):
            return None
        return self.value / self.baseline_value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Table:
    """A time series or breakdown printed under its section (the soak's samples, for instance)."""

    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    key: str
    title: str
    method: str  # how it was measured, in a sentence or two
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Section":
        """A section from an earlier run's JSON (`python -m benchmarks --reuse`)."""
        figures = [Figure(**{k: v for k, v in f.items() if k != "ratio"}) for f in data["figures"]]
        return cls(data["key"], data["title"], data["method"], figures, list(data["notes"]),
                   [Table(**t) for t in data["tables"]])

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "title": self.title, "method": self.method,
            "figures": [f.to_dict() for f in self.figures], "notes": list(self.notes),
            "tables": [asdict(t) for t in self.tables],
        }

