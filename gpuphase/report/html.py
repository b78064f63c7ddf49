"""A `gpuphase report` dict as one self-contained HTML5 page: inline CSS, inline SVG drawn here.

The page opens offline and from a ticket attachment: no script, no font, no image, no stylesheet is
fetched from anywhere. It shows the sections of the text report (render.py builds the same blocks,
with the same formatting helpers), recommendations first, and three plots: phase share over time
per GPU (small multiples), idle cost by host, and energy per token by service.

Every string from the report is escaped with html.escape wherever it lands: element text, SVG
<text> and <title>, and attributes. Plots scale linearly with the report: at most MULTIPLES_CAP
small charts of at most MAX_BINS bars, at most BAR_CAP bars per bar chart.
"""

from __future__ import annotations

import heapq
import html
import math
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple

from gpuphase.report import render
from gpuphase.report.render import (CODE, NUM, REPORT_PHASES, Block, Bullets, Facts, Heading, Para, Table, clean,
                                    currency, flat, hours, joules, money, num, percent, truncate)

MULTIPLES_CAP = 64  # small multiples drawn at most: those with the most idle cost
MAX_BINS = 48  # bars per small multiple: a week at a 5-minute step is binned, not drawn 2016 times
BAR_CAP = 40  # bars groups (hosts, services) per bar chart
PHASE_COLOURS = {  # Okabe-Ito, readable by the colour-blind; the order of REPORT_PHASES
    "prefill": "#56b4e9", "decode": "#cc79a7", "mixed": "#e69f00", "idle": "#8c8c8c", "unknown": "#dcdcdc"}
COST_COLOUR = "#c4553a"

SMALL_W, SMALL_H = 300, 140  # one small multiple
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 38, 8, 22, 32
LABEL_W, PLOT_W, VALUE_W = 190, 380, 100  # a bar chart: labels, bars, the values after them
BAR_H, BAR_GAP, GROUP_GAP, AXIS_H = 14, 2, 10, 38

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:1.5rem;
color:#1b1f24;background:#fff;line-height:1.4}
h1{font-size:1.6rem;margin:0 0 .5rem}
h2{font-size:1.25rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin:2rem 0 .6rem}
h3{font-size:1.05rem;margin:1.4rem 0 .3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d0d7de;padding:.2rem .45rem;vertical-align:top;text-align:left}
thead th{background:#f3f5f7;position:sticky;top:0}
table.facts th{background:#f3f5f7;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.8rem;overflow-wrap:anywhere}
.saving{font-size:1.15rem;font-weight:600;color:#116329}
.note{color:#57606a;font-style:italic}
#warnings li{color:#9a6700}
#recommendations{background:#f6fbf7;border:1px solid #b7dfc2;border-radius:6px;padding:.1rem 1rem 1rem}
#recommendations h2{border:0}
figure{margin:1rem 0}
figcaption{font-weight:600;margin-bottom:.3rem}
.multiples{display:flex;flex-wrap:wrap;gap:.6rem}
.legend{list-style:none;padding:0;margin:.3rem 0;display:flex;flex-wrap:wrap;gap:1rem}
.sw{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:middle;border:1px solid #999}
svg text{font-size:10px;fill:#444}
svg text.head{font-size:11px;font-weight:600;fill:#1b1f24}
svg .axis{stroke:#888;fill:none}
svg .grid{stroke:#e3e6e9}
svg text.null{font-style:italic;fill:#888}
"""


def _e(value: Any) -> str:
    """Any report string as HTML text or attribute value: cleaned, then every markup character
    (quotes too, so one escape serves both) as an entity."""
    return html.escape(clean(value), quote=True)


def _css() -> str:
    """The stylesheet, phase colours included: one class per phase colours bars and legend alike."""
    colours = "".join(f".ph-{phase}{{fill:{colour};background-color:{colour}}}"
                      for phase, colour in PHASE_COLOURS.items())
    return CSS + colours + f".cost{{fill:{COST_COLOUR};background-color:{COST_COLOUR}}}\n"


# ---------------------------------------------------------------------------------------------
# Blocks as HTML (the blocks' strings are cleaned already; they are escaped here).


def _cell(text: str, kind: str) -> str:
    """A table or fact cell: numbers right-aligned, queries as code."""
    if kind == CODE:
        return f"<td><code>{_e(text)}</code></td>" if text else "<td></td>"
    return f'<td class="n">{_e(text)}</td>' if kind == NUM else f"<td>{_e(text)}</td>"


def _html_heading(block: Heading) -> str:
    """h1 to h3."""
    return f"<h{block.level}>{_e(block.text)}</h{block.level}>"


def _html_para(block: Para) -> str:
    """A paragraph, its tone as its class."""
    tone = f' class="{block.tone}"' if block.tone else ""
    return f"<p{tone}>{_e(block.text)}</p>"


def _html_bullets(block: Bullets) -> str:
    """A list."""
    return "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in block.items) + "</ul>"


def _html_facts(block: Facts) -> str:
    """Facts as a two-column table."""
    rows = "".join(f'<tr><th scope="row">{_e(name)}</th>{_cell(value, kind)}</tr>' for name, value, kind in block.rows)
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def _html_table(table: Table) -> str:
    """A table; a row's hover text (a GPU's UUID) as its title."""
    head = "".join(f'<th scope="col">{_e(flat(column.header))}</th>' for column in table.columns)
    titles = table.titles or ("",) * len(table.rows)
    body = "".join((f'<tr title="{_e(title)}">' if title else "<tr>")
                   + "".join(_cell(cell, column.kind) for cell, column in zip(row, table.columns)) + "</tr>"
                   for row, title in zip(table.rows, titles))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HTML = {Heading: _html_heading, Para: _html_para, Bullets: _html_bullets, Facts: _html_facts, Table: _html_table}


def _blocks(blocks: list[Block]) -> str:
    """Blocks one per line."""
    return render.render_blocks(blocks, _HTML, "\n")


def _section(ident: str, blocks: list[Block], figures: str = "") -> str:
    """A section: its heading, then its plots, then its tables (the plots summarise the tables)."""
    return f'<section id="{ident}">\n{_blocks(blocks[:1])}\n{figures}{_blocks(blocks[1:])}\n</section>'


def _note(text: str) -> str:
    """A sentence in place of a plot, or about what a plot leaves out."""
    return f'<p class="note">{_e(text)}</p>\n'


def _figure(caption: str, body: str) -> str:
    """A captioned plot."""
    return f"<figure><figcaption>{_e(caption)}</figcaption>\n{body}</figure>\n"


def _legend(phases: tuple[str, ...]) -> str:
    """The phase colours, named, as every plot uses them."""
    items = "".join(f'<li><span class="sw ph-{phase}"></span>{_e(phase)}</li>' for phase in phases)
    return f'<ul class="legend">{items}</ul>\n'


# ---------------------------------------------------------------------------------------------
# SVG pieces.


def _f(value: float) -> str:
    """A coordinate with one decimal: enough for a screen, a fraction of the bytes of repr."""
    return f"{value:.1f}"


def _svg_open(css: str, width: float, height: float, label: str) -> str:
    """An SVG root sized in pixels, labelled for screen readers and for hover."""
    return (f'<svg class="{css}" width="{_f(width)}" height="{_f(height)}" viewBox="0 0 {_f(width)} {_f(height)}" '
            f'role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>')


def _text(x: float, y: float, text: str, anchor: str = "start", css: str = "", tip: str = "") -> str:
    """An SVG text, escaped; `tip` (the untruncated label) shows on hover."""
    klass = f' class="{css}"' if css else ""
    title = f"<title>{_e(tip)}</title>" if tip else ""
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{klass}>{title}{_e(text)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, css: str) -> str:
    """An axis or grid line."""
    return f'<line class="{css}" x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}"/>'


def _rect(x: float, y: float, width: float, height: float, css: str, tip: str = "") -> str:
    """A bar or a bar's segment; with `tip`, its value on hover."""
    shape = f'<rect class="{css}" x="{_f(x)}" y="{_f(y)}" width="{_f(width)}" height="{_f(height)}"'
    return f"{shape}><title>{_e(tip)}</title></rect>" if tip else shape + "/>"


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Axis ticks from 0 past `top` at a 1, 2, 2.5 or 5 times a power of ten step: round numbers."""
    if not top > 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    return [n * step for n in range(math.ceil(top / step - 1e-9) + 1)]


def _tick_label(value: float) -> str:
    """A tick value: short, whole where it is whole."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"


def _utc(seconds: float, pattern: str) -> str:
    """A Unix time in UTC; one out of the calendar's range as '?' rather than an error."""
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime(pattern)
    except (OverflowError, OSError, ValueError):
        return "?"


# ---------------------------------------------------------------------------------------------
# (a) Phase share over time, one small chart per GPU.


class Binned(NamedTuple):
    """A phase series summed into equal bins of time, ready to draw as bars."""

    start: float  # Unix seconds where the first bin begins
    width: float  # seconds per bin
    bins: list[dict[str, float]]  # phase hours summed per bin


def _step(ends: list[float], fallback: float) -> float:
    """The series' bucket length: the shortest gap between bucket ends (gaps in the data are longer)."""
    gaps = [b - a for a, b in zip(ends, ends[1:]) if b > a]
    return min(gaps) if gaps else (fallback if fallback > 0 else 3600.0)


def _points(series: list[Any]) -> list[tuple[float, dict[str, Any]]]:
    """The series' well-formed points, in time order."""
    points = [(float(point[0]), point[1]) for point in series
              if isinstance(point, (list, tuple)) and len(point) == 2 and isinstance(point[1], dict)
              and num(point[0]) is not None]
    return sorted(points, key=lambda point: point[0])


def bin_series(series: list[Any], fallback_seconds: float, max_bins: int = MAX_BINS) -> Binned | None:
    """Bucket hours summed into at most `max_bins` equal bins of time (a bucket belongs to the bin
    its end falls in): a long range at a short step would otherwise draw thousands of bars."""
    points = _points(series)
    if not points:
        return None
    ends = [end for end, _ in points]
    step = _step(ends, fallback_seconds)
    start, span = ends[0] - step, ends[-1] - ends[0] + step
    count = max(1, min(max_bins, round(span / step)))
    width = span / count
    bins = [dict.fromkeys(REPORT_PHASES, 0.0) for _ in range(count)]
    for end, phases in points:
        index = min(count - 1, max(0, math.ceil((end - start) / width - 1e-9) - 1))
        for phase in REPORT_PHASES:
            bins[index][phase] += max(num(phases.get(phase)) or 0.0, 0.0)
    return Binned(start, width, bins)


def _bar_tip(end: float, phases: dict[str, float], total: float) -> str:
    """A bar's hover text: the bin's end and each phase's share and hours."""
    shares = ", ".join(f"{phase} {percent(value / total)} ({hours(value)} h)"
                       for phase, value in phases.items() if value > 0)
    return f"{_utc(end, '%Y-%m-%d %H:%M')} UTC: {shares}"


def _stacked_bar(x: float, width: float, top: float, bottom: float, end: float, phases: dict[str, float]) -> str:
    """One bin as a bar of its phase shares, prefill at the bottom, summing to 100%."""
    total = sum(phases.values())
    if total <= 0:
        return ""
    parts, y = [f"<g><title>{_e(_bar_tip(end, phases, total))}</title>"], bottom
    for phase in REPORT_PHASES:
        height = (bottom - top) * phases[phase] / total
        if height > 0:
            y -= height
            parts.append(_rect(x, y, width, height, f"ph-{phase}"))
    return "".join(parts) + "</g>"


def _share_axes(left: float, right: float, top: float, bottom: float, start: float, span: float) -> list[str]:
    """A small multiple's axes: 0/50/100% up the side, three times (UTC) along the bottom."""
    out = []
    for share in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * share
        out += [_line(left, y, right, y, "grid"), _text(left - 4, y + 3, f"{share * 100:.0f}%", "end")]
    pattern = "%H:%M" if span <= 2 * 86400 else "%m-%d"
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = left + (right - left) * fraction
        out += [_line(x, bottom, x, bottom + 3, "axis"),
                _text(x, bottom + 13, _utc(start + span * fraction, pattern), anchor)]
    out.append(f'<path class="axis" d="M{_f(left)} {_f(top)}V{_f(bottom)}H{_f(right)}"/>')
    out.append(_text((left + right) / 2, SMALL_H - 3, "time (UTC)", "middle"))
    out.append(f'<text transform="rotate(-90)" x="{_f(-(top + bottom) / 2)}" y="9" text-anchor="middle">share</text>')
    return out


def _gpu_name(gpu: dict[str, Any]) -> str:
    """A GPU as its small multiple names it."""
    return f"{clean(gpu.get('instance'))} gpu {clean(gpu.get('gpu'))}"


def phase_chart(gpu: dict[str, Any], fallback_seconds: float) -> str:
    """One GPU's phase share over time as stacked bars; '' when its series holds no point."""
    binned = bin_series(gpu.get("phase_share_series") or [], fallback_seconds)
    if binned is None:
        return ""
    left, right, top, bottom = PAD_LEFT, SMALL_W - PAD_RIGHT, PAD_TOP, SMALL_H - PAD_BOTTOM
    span = binned.width * len(binned.bins)
    scale = (right - left) / span
    name = _gpu_name(gpu)
    label = f"phase share over time: {name}, {clean(gpu.get('model'))}, {clean(gpu.get('uuid'))}"
    out = [_svg_open("phase-chart", SMALL_W, SMALL_H, label), _text(left, 13, truncate(name, 38), css="head")]
    out += _share_axes(left, right, top, bottom, binned.start, span)
    gap = 0.5 if binned.width * scale > 3 else 0.0
    for index, phases in enumerate(binned.bins):
        x = left + index * binned.width * scale
        end = binned.start + (index + 1) * binned.width
        out.append(_stacked_bar(x + gap / 2, binned.width * scale - gap, top, bottom, end, phases))
    return "".join(out) + "</svg>\n"


def _known_first(value: float | None) -> float:
    """A sort key, largest first: a value not known ranks below every known one (costs are >= 0)."""
    return -math.inf if value is None else value


def _idle_key(gpu: dict[str, Any]) -> tuple[float, float]:
    """How much a GPU's idle time cost (unknown cost below any known one), then its idle hours."""
    return (_known_first(num((gpu.get("idle_cost") or {}).get("total"))),
            _known_first(num((gpu.get("idle_gpu_hours") or {}).get("total"))))


def _multiples(report: dict[str, Any]) -> str:
    """(a) the small multiples, capped at MULTIPLES_CAP GPUs (the most idle cost) with a note."""
    gpus = [gpu for gpu in report["gpus"] if gpu.get("phase_share_series")]
    if not gpus:
        return _note("No GPU has a phase series in this report: no phase plot.")
    missing = len(report["gpus"]) - len(gpus)
    notes = _note(f"{missing} GPU(s) have no phase series and no plot.") if missing else ""
    if len(gpus) > MULTIPLES_CAP:
        notes += _note(f"Showing the {MULTIPLES_CAP} GPUs with the most idle cost, of the {len(gpus)} "
                       f"with a phase series; the table below lists every GPU.")
        gpus = heapq.nlargest(MULTIPLES_CAP, gpus, key=_idle_key)
    fallback = num(report["range"].get("seconds")) or 0.0
    charts = "".join(phase_chart(gpu, fallback) for gpu in gpus)
    body = _legend(REPORT_PHASES) + notes + f'<div class="multiples">\n{charts}</div>\n'
    return _figure("Phase share over time, per GPU", body)


# ---------------------------------------------------------------------------------------------
# (b) and (c): horizontal bar charts, one bar or a group of bars per label.


class Bar(NamedTuple):
    """One bar of a bar chart."""

    value: float | None  # None: drawn as `null_text`, not as a zero bar
    css: str
    series: str  # '' for a one-bar chart


def _bar_group(y: float, label: str, bars: list[Bar], scale: float, show: Callable[[float], str],
               null_text: str) -> list[str]:
    """One label's bars, each with its value after it (or `null_text` where it is not known)."""
    height = len(bars) * (BAR_H + BAR_GAP) - BAR_GAP
    out = [_text(LABEL_W - 6, y + height / 2 + 3.5, truncate(label, 30), "end", tip=label)]
    for n, bar in enumerate(bars):
        top = y + n * (BAR_H + BAR_GAP)
        named = f"{label} {bar.series}".strip()
        if bar.value is None:
            out.append(_text(LABEL_W + 4, top + BAR_H - 3, null_text, css="null", tip=f"{named}: {null_text}"))
            continue
        width = max(bar.value, 0.0) * scale
        out.append(_rect(LABEL_W, top, width, BAR_H, bar.css, f"{named}: {show(bar.value)}"))
        out.append(_text(LABEL_W + width + 4, top + BAR_H - 3, show(bar.value)))
    return out


def _value_axis(y: float, ticks: list[float], scale: float, top: float, axis_label: str) -> list[str]:
    """The value axis under the bars: grid lines, ticks and the axis label."""
    out = []
    for tick in ticks:
        x = LABEL_W + tick * scale
        out += [_line(x, top, x, y, "grid"), _line(x, y, x, y + 4, "axis"),
                _text(x, y + 15, _tick_label(tick), "middle")]
    out.append(_line(LABEL_W, y, LABEL_W + PLOT_W, y, "axis"))
    out.append(_text(LABEL_W + PLOT_W / 2, y + AXIS_H - 6, axis_label, "middle"))
    return out


def bar_chart(groups: list[tuple[str, list[Bar]]], axis_label: str, show: Callable[[float], str],
              null_text: str, label: str) -> str:
    """Horizontal bars on a linear axis from 0, one group per label; `show` formats a value."""
    top_value = max((bar.value for _, bars in groups for bar in bars if bar.value is not None), default=0.0)
    ticks = nice_ticks(top_value)
    scale = PLOT_W / ticks[-1]
    heights = [len(bars) * (BAR_H + BAR_GAP) - BAR_GAP + GROUP_GAP for _, bars in groups]
    axis_y = 8 + sum(heights)
    out = [_svg_open("bar-chart", LABEL_W + PLOT_W + VALUE_W, axis_y + AXIS_H, label)]
    out += _value_axis(axis_y, ticks, scale, 4, axis_label)
    y = 8.0
    for (name, bars), height in zip(groups, heights):
        out += _bar_group(y, name, bars, scale, show, null_text)
        y += height
    return "".join(out) + "</svg>\n"


def _capped(groups: list[tuple[str, list[Bar]]], what: str, order: str) -> tuple[list[tuple[str, list[Bar]]], str]:
    """At most BAR_CAP groups, and a note saying how many were left out."""
    if len(groups) <= BAR_CAP:
        return groups, ""
    return groups[:BAR_CAP], _note(f"Showing the {BAR_CAP} {what} {order}, of {len(groups)}.")


def _idle_by_host(report: dict[str, Any]) -> str:
    """(b) idle cost by host, most first; hosts without a price say so."""
    by_host = report["fleet"].get("idle_cost_by_host") or {}
    if not by_host:
        return _note("No idle cost by host in this report.")
    if all(num(value) is None for value in by_host.values()):
        return _note("No host has a price: idle cost by host is not known.")
    ordered = sorted(by_host.items(), key=lambda item: _known_first(num(item[1])), reverse=True)
    groups = [(clean(host), [Bar(num(value), "cost", "")]) for host, value in ordered]
    groups, note = _capped(groups, "hosts", "with the most idle cost")
    cur = currency(report)
    chart = bar_chart(groups, f"idle cost ({cur})", lambda value: money(value, cur), "no price", "idle cost by host")
    return _figure("Idle cost by host", note + chart)


def _energy_by_service(report: dict[str, Any]) -> str:
    """(c) energy per token by service, prefill and decode side by side; 'no tokens' where null."""
    services = report["services"]
    if not services:
        return _note("No services in this report: no energy per token plot.")
    groups = []
    for service in services:
        per_token = service.get("energy_per_token_joules") or {}
        groups.append((clean(service.get("service")),
                       [Bar(num(per_token.get(phase)), f"ph-{phase}", phase) for phase in ("prefill", "decode")]))
    if all(bar.value is None for _, bars in groups for bar in bars):
        return _note("No service counted tokens: energy per token is not known.")
    groups, note = _capped(groups, "services", "first in the report")
    chart = bar_chart(groups, "energy per token (J)", lambda value: f"{joules(value)} J", "no tokens",
                      "energy per token by service")
    return _figure("Energy per token by service", _legend(("prefill", "decode")) + note + chart)


# ---------------------------------------------------------------------------------------------


def render_html(report: dict) -> str:
    """The report as one HTML5 page that needs nothing but itself: recommendations first, then the
    fleet, GPUs and services, each with its plot above its table."""
    title = f"gpuphase report {render.range_label(report)}"
    sections = [
        _blocks(render.header_blocks(report)),
        _section("warnings", render.warning_blocks(report)),
        _section("recommendations", render.recommendation_blocks(report)),
        _section("fleet", render.fleet_blocks(report), _idle_by_host(report)),
        _section("gpus", render.gpu_blocks(report), _multiples(report)),
        _section("services", render.service_blocks(report), _energy_by_service(report)),
    ]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{_css()}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
            f"</body>\n</html>\n")

