"""Render the benchmark results as docs/performance.md (Markdown, one summary table plus a section each)."""

from __future__ import annotations

import math
from typing import Sequence

from benchmarks.results import Figure, Section, Table

HEADER = """# Performance

Measured by `{command}` (benchmarks/). Every figure comes with a baseline measured in the same run
on the same machine; the ratio is figure / baseline. Goals come from the project's "Reliability
and performance" issue. Nothing in the test suite asserts a duration: `tests/test_benchmarks_smoke.py`
only checks that the harness runs and produces well-formed results, and `tests/test_soak.py` (the
2-minute soak CI runs) that no span is lost and memory stays flat.

Regenerate: `python -m benchmarks` (about 40 minutes, 30 of them the soak under load; the memory
goal is read at 10), or `python -m benchmarks --quick` (about 3 minutes, shorter windows, noisier).
Soak alone: `python -m benchmarks.soak --duration 30m`. The figures behind design choices in the code
(thread hand-offs, ctypes hooks, window sizes) are in [design-figures.md](design-figures.md).
"""


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def verdict(figure: Figure) -> str:
    if figure.met is None:
        return ""
    return "met" if figure.met else "**missed**"


def summary_rows(sections: Sequence[Section]) -> list[str]:
    rows = ["| figure | value | baseline (same run) | ratio | goal | |", "|---|---|---|---|---|---|"]
    for section in sections:
        for f in section.figures:
            base = f"{f.baseline}: {number(f.baseline_value)}" if f.baseline else ""
            ratio = f"{f.ratio:.2f}×" if f.ratio is not None else ""
            rows.append(f"| {f.name} | {number(f.value)} {f.unit} | {base} | {ratio} | {f.goal} | {verdict(f)} |")
    return rows


def markdown_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in table.rows]


def render_report(machine: dict[str, str], sections: Sequence[Section], command: str) -> str:
    lines = [HEADER.format(command=command), "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += ["", "## Summary", "", *summary_rows(sections), ""]
    for section in sections:
        lines += [f"## {section.title}", "", section.method, ""]
        missed = [f for f in section.figures if f.met is False and f.note]
        if missed:
            lines += ["Missed goals, why, and what it would take:", ""]
            lines += [f"- **{f.name}**: {f.note}" for f in missed]
            lines.append("")
        lines += [f"- {note}" for note in section.notes]
        if section.notes:
            lines.append("")
        for table in section.tables:
            lines += [*markdown_table(table), ""]
    return "\n".join(lines).rstrip() + "\n"
