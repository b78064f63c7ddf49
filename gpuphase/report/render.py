"""A `gpuphase report` dict (gpuphase/report/schema.json) as terminal text and as Markdown.

The report is cut once into a small document of blocks (headings, paragraphs, facts, tables) whose
cells are already formatted strings; each format only lays those blocks out. So text, Markdown and
the HTML page (html.py, which uses the same blocks and helpers) show the same figures formatted the
same way, and each formatting rule lives in one function here.

Every string in a report is untrusted (instance, service and model labels come from scraped
series): `clean` takes out line breaks and control characters for all formats (no terminal escape
sequences, no broken table rows), and each format then escapes what its own syntax needs.
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Any, Callable, Iterable, NamedTuple

from gpuphase.model.phase import PHASES

UNKNOWN = "unknown"  # time on a GPU no service is tied to: not idle
REPORT_PHASES = (*PHASES, UNKNOWN)
NULL = "—"  # not known (no price, no tokens, no data): never printed as 0
WIDTH = 120  # terminal columns the text report fits
GAP = 2  # spaces between text columns
ELLIPSIS = "…"

# Column kinds: how a cell is aligned and, in text, where it goes.
LABEL = "label"  # left-aligned, truncated in text at the column's cap
NUM = "num"  # right-aligned, never truncated
CODE = "code"  # a query: monospace; in text on its own line under the row
PROSE = "prose"  # a sentence: in text wrapped on its own line under the row
BELOW = (CODE, PROSE)

# Paragraph tones (HTML classes; Markdown shows SAVING in bold).
PLAIN = ""
SAVING = "saving"
NOTE = "note"

KIND_LABELS = {
    "reclaim_unused": "reclaim an unused GPU",
    "consolidate_idle": "consolidate an idle GPU",
    "bandwidth_bound_decode": "bandwidth-bound decode",
    "disaggregate_prefill_decode": "disaggregate prefill and decode",
}

# ---------------------------------------------------------------------------------------------
# Formatting: one small function per kind of figure, shared by every format.


def num(value: Any) -> float | None:
    """A finite number, or None: null, a string, a bool or NaN is 'not known', never shown as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _shown(value: Any, shape: Callable[[float], str]) -> str:
    """A figure through `shape`, or — when it is not known: the null rule in one place."""
    figure = num(value)
    return NULL if figure is None else shape(figure)


def _fixed(value: Any) -> str:
    """Two decimals with thousands separators: hours, money and kWh all read alike."""
    return _shown(value, lambda figure: f"{figure:,.2f}")


def _digits(figure: float) -> str:
    """About three significant digits, so a ratio of small numbers is neither 0.00 nor 13.0000."""
    size = abs(figure)
    if size < 1:
        return f"{figure:.3f}"
    if size < 10:
        return f"{figure:.2f}"
    if size < 100:
        return f"{figure:.1f}"
    return f"{figure:,.0f}"


def hours(value: Any) -> str:
    """GPU-hours with two decimals; the unit goes in the column header or after `with_unit`."""
    return _fixed(value)


def amount(value: Any) -> str:
    """Money with two decimals, without the currency (for table cells whose header names it)."""
    return _fixed(value)


def kwh(value: Any) -> str:
    """Energy in kWh with two decimals."""
    return _fixed(value)


def with_unit(text: str, unit: str) -> str:
    """A figure and its unit; a null stays a bare — (a unit after 'not known' reads as a value)."""
    return text if text == NULL or not unit else f"{text} {unit}"


def money(value: Any, currency: str) -> str:
    """Money with two decimals and the currency, for prose and facts."""
    return with_unit(amount(value), currency)


def percent(value: Any) -> str:
    """A ratio (0..1) as a percentage with one decimal."""
    return _shown(value, lambda figure: f"{figure * 100:.1f}%")


def count(value: Any) -> str:
    """A whole count (GPUs, hosts) with thousands separators."""
    return _shown(value, lambda figure: f"{figure:,.0f}")


def _scaled(figure: float) -> str:
    """A count with a k/M/B suffix."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(figure) >= scale:
            return _digits(figure / scale) + suffix
    return f"{figure:.0f}"


def tokens(value: Any) -> str:
    """A token count with a k/M/B suffix: millions of tokens are read by magnitude, not by digit."""
    return _shown(value, _scaled)


def joules(value: Any) -> str:
    """Joules per token: three significant digits (prefill's are a fraction of decode's)."""
    return _shown(value, _digits)


def number(value: Any) -> str:
    """Any other figure: whole numbers exactly, the rest to about three significant digits."""
    return _shown(value, lambda figure: f"{figure:,.0f}" if figure.is_integer() and abs(figure) < 1e15
                  else _digits(figure))


def evidence_value(value: Any, unit: str) -> str:
    """An evidence line's value in its unit: ratios as percentages, hours as hours, text as given."""
    if isinstance(value, str):
        return with_unit(clean(value), clean(unit))
    if unit == "ratio":
        return percent(value)
    if unit == "h":
        return with_unit(hours(value), "h")
    if unit in ("bytes", "B"):
        return with_unit(_shown(value, lambda figure: f"{figure / 1024**3:,.2f}"), "GiB")
    return with_unit(number(value), clean(unit))


_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]+")
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ufffe\uffff\ud800-\udfff]")


def clean(value: Any) -> str:
    """A report string safe to lay out: line breaks become spaces (a newline in a label must not
    break a table row), and control, bidi-override and lone-surrogate characters become U+FFFD
    (no terminal escape sequences; XML and UTF-8 accept what is left)."""
    text = _LINE_BREAKS.sub(" ", "" if value is None else str(value))
    return _CONTROLS.sub("\ufffd", text)


def truncate(text: str, width: int) -> str:
    """At most `width` characters, the last an ellipsis when something was cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def kind_label(kind: Any) -> str:
    """A recommendation kind in words; an unknown kind as it was sent."""
    return KIND_LABELS.get(kind, clean(kind)) if isinstance(kind, str) else clean(kind)


def target_label(target: dict[str, Any]) -> str:
    """What a recommendation is about: 'node-a:9400 gpu 3, service reserved', or the fleet."""
    where = [clean(target["instance"])] if target.get("instance") else []
    if target.get("gpu") not in (None, ""):
        where.append(f"gpu {clean(target['gpu'])}")
    if not where and target.get("uuid"):
        where.append(clean(target["uuid"]))
    parts = [" ".join(where)] if where else []
    if target.get("service"):
        parts.append(f"service {clean(target['service'])}")
    return ", ".join(parts) or "the fleet"


def currency(report: dict[str, Any]) -> str:
    """The report's currency code, cleaned (it is as untrusted as any label)."""
    return clean(report.get("currency", ""))


def header_currency(report: dict[str, Any]) -> str:
    """The currency as a column header shows it: short, so a long one cannot widen every table."""
    return truncate(currency(report), 8)


def range_label(report: dict[str, Any]) -> str:
    """The range as 'start – end (6.00 h)'."""
    span = report["range"]
    seconds = num(span.get("seconds"))
    length = with_unit(hours(None if seconds is None else seconds / 3600), "h")
    return f"{clean(span.get('start'))} – {clean(span.get('end'))} ({length})"


# ---------------------------------------------------------------------------------------------
# The document: blocks of formatted strings, the same for every format.


class Heading(NamedTuple):
    """A title: the report's, a section's or one recommendation's."""

    text: str
    level: int  # 1 the report, 2 a section, 3 one recommendation


class Para(NamedTuple):
    """A sentence or two; `tone` marks savings and notes."""

    text: str
    tone: str = PLAIN


class Bullets(NamedTuple):
    """A list of short items (warnings)."""

    items: tuple[str, ...]


class Facts(NamedTuple):
    """Named single figures, laid out as a name column and a value column."""

    rows: tuple[tuple[str, str, str], ...]  # (name, value, LABEL or CODE)


class Column(NamedTuple):
    """A table column: its header, how its cells align and where text puts them."""

    header: str  # "\n" where text may break it over two lines
    kind: str = NUM
    cap: int = 0  # text: the most characters a LABEL cell shows


class Table(NamedTuple):
    """Rows of formatted cells under columns."""

    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]
    keys: int = 0  # leading columns text repeats when it splits a wide table
    titles: tuple[str, ...] = ()  # per-row hover text (HTML)


Block = Heading | Para | Bullets | Facts | Table


def flat(header: str) -> str:
    """A two-line text header on one line, for formats that wrap by themselves."""
    return header.replace("\n", " ")


def header_blocks(report: dict[str, Any]) -> list[Block]:
    """Title and where the figures come from: range, Prometheus, selector, currency."""
    source = report["source"]
    made = (f"{clean(report.get('generated_at'))}; step {number(source.get('step_seconds'))} s; "
            f"{count(source.get('queries'))} queries")
    return [Heading("gpuphase report", 1), Facts((
        ("range", range_label(report), LABEL),
        ("source", clean(source.get("url")), CODE),
        ("selector", clean(source.get("selector")), CODE),
        ("currency", currency(report) or NULL, LABEL),
        ("generated", made, LABEL),
    ))]


def warning_blocks(report: dict[str, Any]) -> list[Block]:
    """The builder's caveats, before any figure they qualify."""
    warnings = tuple(clean(warning) for warning in report["warnings"])
    return [Heading("Warnings", 2), Bullets(warnings) if warnings else Para("No warnings.", NOTE)]


def _split(figures: dict[str, Any], show: Callable[[Any], str]) -> str:
    """An idle split as 'total (allocated a, unused u)'."""
    return f"{show(figures.get('total'))} (allocated {show(figures.get('allocated'))}, " \
           f"unused {show(figures.get('unused'))})"


def _phase_table(phase_hours: dict[str, Any], total: Any) -> Table:
    """Phase hours and their share of the GPU-hours (of the phase hours when GPU-hours is 0)."""
    whole = num(total) or sum(num(phase_hours.get(phase)) or 0.0 for phase in REPORT_PHASES)
    rows = tuple((phase, hours(phase_hours.get(phase)),
                  percent(None if not whole or num(phase_hours.get(phase)) is None
                          else num(phase_hours.get(phase)) / whole)) for phase in REPORT_PHASES)
    return Table((Column("phase", LABEL), Column("GPU-hours"), Column("share")), rows)


def fleet_blocks(report: dict[str, Any]) -> list[Block]:
    """The fleet in a dozen figures, then the phase split."""
    fleet, cur = report["fleet"], currency(report)
    tok = fleet.get("tokens") or {}
    facts = Facts((
        ("GPUs", count(fleet.get("gpus")), LABEL),
        ("hosts", count(fleet.get("hosts")), LABEL),
        ("GPU-hours", with_unit(hours(fleet.get("gpu_hours")), "h"), LABEL),
        ("idle GPU-hours", _split(fleet.get("idle_gpu_hours") or {}, lambda v: with_unit(hours(v), "h")), LABEL),
        ("idle cost", _split(fleet.get("idle_cost") or {}, lambda v: money(v, cur)), LABEL),
        ("cost", money(fleet.get("cost"), cur), LABEL),
        ("tokens", f"prefill {tokens(tok.get('prefill'))}, decode {tokens(tok.get('decode'))}", LABEL),
        ("energy", with_unit(kwh(fleet.get("energy_kwh")), "kWh"), LABEL),
        ("bandwidth-bound", with_unit(hours(fleet.get("bandwidth_bound_hours")), "h"), LABEL),
        ("monthly savings", money(fleet.get("monthly_savings"), cur), LABEL),
    ))
    return [Heading("Fleet summary", 2), facts, _phase_table(fleet.get("phase_hours") or {}, fleet.get("gpu_hours"))]


def _evidence_table(evidence: list[dict[str, Any]]) -> Table:
    """What a recommendation rests on, each figure with the PromQL that reproduces it."""
    rows = tuple((clean(item.get("name")), evidence_value(item.get("value"), item.get("unit", "")),
                  clean(item.get("promql"))) for item in evidence)
    return Table((Column("evidence", LABEL, 40), Column("value"), Column("PromQL", CODE)), rows)


def _options_table(options: list[dict[str, Any]], cur: str) -> Table:
    """The alternatives a recommendation offers, each with what it would save."""
    rows = tuple((clean(option.get("action")), money(option.get("monthly_savings"), cur),
                  with_unit(number(option.get("monthly_kwh_saved")), "kWh"), clean(option.get("detail")))
                 for option in options)
    return Table((Column("option", LABEL, 40), Column("monthly\nsaving"), Column("energy saved\nper month"),
                  Column("detail", PROSE)), rows)


def _recommendation(rank: int, rec: dict[str, Any], cur: str) -> list[Block]:
    """One recommendation: what and where, its saving, why (evidence), and its options."""
    blocks: list[Block] = [
        Heading(f"{rank}. {kind_label(rec.get('kind'))}: {target_label(rec.get('target') or {})}", 3),
        Para(f"Monthly saving: {money(rec.get('monthly_savings'), cur)}", SAVING),
        Para(clean(rec.get("summary"))),
        _evidence_table(rec.get("evidence") or []),
    ]
    if rec.get("options"):
        blocks.append(_options_table(rec["options"], cur))
    return blocks


def recommendation_blocks(report: dict[str, Any]) -> list[Block]:
    """The recommendations in the order the builder ranked them."""
    recs, cur = report["recommendations"], currency(report)
    blocks: list[Block] = [Heading("Recommendations", 2)]
    if not recs:
        return blocks + [Para("No recommendations: nothing in this range to act on.", NOTE)]
    blocks.append(Para(f"Total monthly savings: {money(report['fleet'].get('monthly_savings'), cur)}", SAVING))
    for rank, rec in enumerate(recs, 1):
        blocks += _recommendation(rank, rec, cur)
    return blocks


def _gpu_columns(cur: str) -> tuple[Column, ...]:
    """The per-GPU table's columns (money in the header's currency, to keep cells narrow)."""
    return (Column("instance", LABEL, 28), Column("gpu", LABEL, 10), Column("model", LABEL, 24),
            Column("hours"), *(Column(f"{phase}\nh") for phase in REPORT_PHASES),
            Column("idle\nalloc h"), Column("idle\nunused h"), Column(f"idle cost\n{cur}"),
            Column("bw-bound\nh"), Column("VRAM\nheadroom"), Column("energy\nkWh"),
            Column("J/token\nprefill"), Column("J/token\ndecode"))


def _gpu_row(gpu: dict[str, Any]) -> tuple[str, ...]:
    """One GPU's cells, in _gpu_columns' order."""
    phases, idle = gpu.get("phase_hours") or {}, gpu.get("idle_gpu_hours") or {}
    per_token = gpu.get("energy_per_token_joules") or {}
    return (clean(gpu.get("instance")), clean(gpu.get("gpu")), clean(gpu.get("model")), hours(gpu.get("hours")),
            *(hours(phases.get(phase)) for phase in REPORT_PHASES),
            hours(idle.get("allocated")), hours(idle.get("unused")),
            amount((gpu.get("idle_cost") or {}).get("total")), hours(gpu.get("bandwidth_bound_hours")),
            percent((gpu.get("vram") or {}).get("headroom_ratio")), kwh(gpu.get("energy_kwh")),
            joules(per_token.get("prefill")), joules(per_token.get("decode")))


def _listing(title: str, items: list[Any], nothing: str, table: Callable[[], Table]) -> list[Block]:
    """A section of one table, or of a sentence saying there is nothing (an empty table says less)."""
    return [Heading(title, 2), table() if items else Para(nothing, NOTE)]


def gpu_blocks(report: dict[str, Any]) -> list[Block]:
    """Every GPU, one row each, in the builder's order; its UUID as the row's hover text."""
    gpus = report["gpus"]
    return _listing("Per GPU", gpus, "No GPUs in this report.", lambda: Table(
        _gpu_columns(header_currency(report)), tuple(_gpu_row(gpu) for gpu in gpus), keys=2,
        titles=tuple(clean(gpu.get("uuid")) for gpu in gpus)))


def _service_columns(cur: str) -> tuple[Column, ...]:
    """The per-service table's columns."""
    return (Column("service", LABEL, 28), Column("GPUs"), Column("hosts"), Column("GPU-hours"),
            Column("tokens\nprefill"), Column("tokens\ndecode"), Column(f"cost\n{cur}"),
            Column(f"{cur}/1M tok\nprefill"), Column(f"{cur}/1M tok\ndecode"),
            Column("J/token\nprefill"), Column("J/token\ndecode"), Column("mixed\nshare"))


def _service_row(service: dict[str, Any]) -> tuple[str, ...]:
    """One service's cells, in _service_columns' order."""
    tok, per_million = service.get("tokens") or {}, service.get("cost_per_million_tokens") or {}
    per_token = service.get("energy_per_token_joules") or {}
    return (clean(service.get("service")), count(service.get("gpus")), count(service.get("hosts")),
            hours(service.get("gpu_hours")), tokens(tok.get("prefill")), tokens(tok.get("decode")),
            amount(service.get("cost")), amount(per_million.get("prefill")), amount(per_million.get("decode")),
            joules(per_token.get("prefill")), joules(per_token.get("decode")), percent(service.get("mixed_share")))


def service_blocks(report: dict[str, Any]) -> list[Block]:
    """Every service, one row each, in the builder's order."""
    services = report["services"]
    return _listing("Per service", services, "No services in this report.", lambda: Table(
        _service_columns(header_currency(report)), tuple(_service_row(service) for service in services), keys=1))


SECTIONS = (header_blocks, warning_blocks, fleet_blocks, recommendation_blocks, gpu_blocks, service_blocks)


def render_blocks(blocks: Iterable[Block], renderers: dict[type, Callable[[Any], str]], sep: str) -> str:
    """Each block by its format's renderer: the one loop every format shares."""
    return sep.join(renderers[type(block)](block) for block in blocks)


def _document(report: dict[str, Any]) -> list[Block]:
    """The whole report, section after section, in the order text and Markdown show it."""
    return [block for section in SECTIONS for block in section(report)]


# ---------------------------------------------------------------------------------------------
# Text: aligned columns within WIDTH, no colour.

_CODE_WORDS = re.compile(r"""(?:"(?:\\.|[^"\\])*"?|'(?:\\.|[^'\\])*'?|`[^`]*`?|\S)+""")


def _code_lines(code: str, width: int) -> list[str]:
    """A query over lines of at most `width`, broken only at white space outside quotes (PromQL reads
    the same across line breaks there, so the lines can be pasted back as they are)."""
    if len(code) <= width:
        return [code]
    lines: list[str] = []
    for word in _CODE_WORDS.findall(code):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _wrap(text: str, width: int, kind: str = LABEL) -> list[str]:
    """Text over lines of at most `width` (queries only at their safe points)."""
    if kind == CODE:
        return _code_lines(text, width)
    return textwrap.wrap(text, max(width, 8)) or [""]


def _text_heading(block: Heading) -> str:
    """A heading, underlined by level; long (it may name a target) ones cut at WIDTH."""
    text = truncate(block.text, WIDTH)
    rule = {1: "=", 2: "-"}.get(block.level)
    return f"{text}\n{rule * len(text)}" if rule else text


def _text_para(block: Para) -> str:
    """A paragraph wrapped at WIDTH."""
    return "\n".join(_wrap(block.text, WIDTH))


def _text_bullets(block: Bullets) -> str:
    """A dashed list, continuation lines under the text."""
    return "\n".join("\n".join(("- " if n == 0 else "  ") + line
                               for n, line in enumerate(_wrap(item, WIDTH - 2))) for item in block.items)


def _text_facts(block: Facts) -> str:
    """Name and value pairs with the values in one column."""
    indent = max(len(name) for name, _, _ in block.rows) + GAP
    lines = []
    for name, value, kind in block.rows:
        parts = _wrap(value, WIDTH - indent, kind)
        lines += [(name if n == 0 else "").ljust(indent) + part for n, part in enumerate(parts)]
    return "\n".join(line.rstrip() for line in lines)


def _chunks(widths: list[int], keys: int, width: int) -> list[list[int]]:
    """Column groups that each fit `width` with the key columns repeated in each: a table wider than
    the terminal is split like a wide data frame, never truncated in its figures."""
    base = sum(widths[:keys]) + GAP * keys
    chunks: list[list[int]] = [[]]
    used = base
    for index in range(keys, len(widths)):
        if chunks[-1] and used + widths[index] > width:
            chunks.append([])
            used = base
        chunks[-1].append(index)
        used += widths[index] + GAP
    return [list(range(keys)) + chunk for chunk in chunks]


def _grid(table: Table, cells: list[list[str]], widths: list[int], chunk: list[int],
          below: list[list[str]]) -> list[str]:
    """One column group of a table: bottom-aligned headers, a rule, then rows (and their lines below)."""
    columns = [c for c in table.columns if c.kind not in BELOW]
    heads = [columns[i].header.split("\n") for i in chunk]
    depth = max(len(head) for head in heads)
    heads = [[""] * (depth - len(head)) + head for head in heads]

    def line(texts: list[str]) -> str:
        """One row, each cell aligned by its column's kind."""
        return (" " * GAP).join(text.rjust(widths[i]) if columns[i].kind == NUM else text.ljust(widths[i])
                                for i, text in zip(chunk, texts)).rstrip()

    out = [line([head[level] for head in heads]) for level in range(depth)]
    out.append((" " * GAP).join("-" * widths[i] for i in chunk))
    for row, extra in zip(cells, below):
        out.append(line([row[i] for i in chunk]))
        out += extra
    return out


def _text_table(table: Table) -> str:
    """A table in aligned columns; CODE and PROSE cells on indented lines under their row."""
    grid = [i for i, column in enumerate(table.columns) if column.kind not in BELOW]
    under = [i for i, column in enumerate(table.columns) if column.kind in BELOW]
    cells = [[truncate(row[i], table.columns[i].cap) if table.columns[i].cap else row[i] for i in grid]
             for row in table.rows]
    widths = [max([len(part) for part in table.columns[i].header.split("\n")] + [len(row[n]) for row in cells])
              for n, i in enumerate(grid)]
    below = [[f"    {part}" for i in under if row[i] for part in _wrap(row[i], WIDTH - 4, table.columns[i].kind)]
             for row in table.rows]
    chunks = _chunks(widths, min(table.keys, len(grid)), WIDTH)
    blocks = [_grid(table, cells, widths, chunk, below if n == 0 else [[] for _ in cells])
              for n, chunk in enumerate(chunks)]
    return "\n\n".join("\n".join(block) for block in blocks)


_TEXT = {Heading: _text_heading, Para: _text_para, Bullets: _text_bullets, Facts: _text_facts, Table: _text_table}


def render_text(report: dict) -> str:
    """The report for a terminal: plain text within 120 columns (queries aside: they are broken
    only where PromQL allows), nulls as —."""
    return render_blocks(_document(report), _TEXT, "\n\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Markdown: GitHub-flavoured, for tickets.

_MD_PUNCTUATION = re.compile(r"([\\`*_\[\]|~])")
_MD_BLOCK_START = re.compile(r"^([#+=-])")
_MD_ORDERED = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")


def md_text(text: str) -> str:
    """Inline text that Markdown shows as written: HTML characters as entities (a label cannot open
    a tag), inline punctuation and `|` backslash-escaped (a label cannot end a table cell)."""
    text = clean(text).strip().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_PUNCTUATION.sub(r"\\\1", text)


def md_block(text: str) -> str:
    """Text at the start of a line (a paragraph, a list item), whose leading marker is escaped too:
    a summary cannot turn itself into a heading or a list."""
    text = md_text(text)
    return _MD_ORDERED.sub(r"\1\\\2", _MD_BLOCK_START.sub(r"\\\1", text))


def md_code(code: str, in_table: bool) -> str:
    """A code span that no backtick in the query can close early; in a table `|` is escaped too
    (GitHub splits cells before it reads code spans)."""
    code = clean(code)
    if in_table:
        code = code.replace("|", "\\|")
    if not code:
        return ""
    fence = "`" * (max((len(run) for run in re.findall("`+", code)), default=0) + 1)
    pad = " " if code.startswith("`") or code.endswith("`") else ""
    return f"{fence}{pad}{code}{pad}{fence}"


def _md_heading(block: Heading) -> str:
    """A heading at its level."""
    return f"{'#' * block.level} {md_text(block.text)}"


def _md_para(block: Para) -> str:
    """A paragraph; savings in bold."""
    text = md_block(block.text)
    return f"**{text}**" if block.tone == SAVING and text else text


def _md_bullets(block: Bullets) -> str:
    """A bulleted list."""
    return "\n".join(f"- {md_block(item)}" for item in block.items)


def _md_facts(block: Facts) -> str:
    """Facts as a list of bold names."""
    return "\n".join(f"- **{md_text(name)}**: {md_code(value, False) if kind == CODE else md_text(value)}"
                     for name, value, kind in block.rows)


def _md_row(cells: Iterable[str]) -> str:
    """One table line."""
    return "| " + " | ".join(cells) + " |"


def _md_table(table: Table) -> str:
    """A GitHub table: numbers right-aligned, queries as code."""
    lines = [_md_row(md_text(flat(column.header)) for column in table.columns),
             _md_row("---:" if column.kind == NUM else "---" for column in table.columns)]
    lines += [_md_row(md_code(cell, True) if column.kind == CODE else md_text(cell)
                      for cell, column in zip(row, table.columns)) for row in table.rows]
    return "\n".join(lines)


_MARKDOWN = {Heading: _md_heading, Para: _md_para, Bullets: _md_bullets, Facts: _md_facts, Table: _md_table}


def render_markdown(report: dict) -> str:
    """The report as GitHub Markdown, for pasting into a ticket."""
    return render_blocks(_document(report), _MARKDOWN, "\n\n") + "\n"
