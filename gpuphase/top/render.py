"""Drawing a Summary: a pure function from (summary, options) to a rich renderable, and that as text.

Nothing here reads a clock, a socket or the terminal, so a frame can be tested from hand-written
exposition text. `plain=True` draws with ASCII only (no colour, `#` bars), for pipes and logs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gpuphase.model.phase import DECODE, IDLE, MIXED, PHASES, PREFILL
from gpuphase.top.view import DOWN, NOT_YET, SORT_ORDER, SORTS, UNKNOWN, Summary

PHASE_STYLE = {PREFILL: "bold cyan", DECODE: "bold magenta", MIXED: "bold yellow", IDLE: "grey62",
               UNKNOWN: "dim", NOT_YET: "dim", DOWN: "bold white on red"}
PHASE_LETTER = {PREFILL: "P", DECODE: "D", MIXED: "M", IDLE: "I"}
BAR_CELLS = 10  # the phase bar
ACTIVITY_CELLS = 6  # SM, tensor, DRAM
GIB = 1024.0 ** 3


@dataclass(frozen=True)
class Options:
    url: str
    sort: str = "gpu"
    plain: bool = False
    error: str | None = None  # why the newest scrape failed (the frame then shows the last good one)
    stale_for: float | None = None  # seconds since the reading shown, when the newest scrape failed
    max_processes: int = 10
    keys: bool = True  # show the keyboard help line
    width: int = 160  # columns to fit: narrower drops the name and temperature, then the bars


NO_NAME_BELOW = 150  # columns
NO_BARS_BELOW = 122


ABSENT = "—"  # no series: absent, not zero


def _cells(cells: list, plain: bool) -> list:
    """A row's cells with ABSENT as '-' in plain (ASCII) frames."""
    return [("-" if plain else cell) if isinstance(cell, str) and cell == ABSENT else cell for cell in cells]


def _bar(ratio: float | None, plain: bool, style: str = "green", cells: int = ACTIVITY_CELLS) -> Text:
    if ratio is None:
        return Text(ABSENT if not plain else "-", style="dim")
    ratio = min(max(ratio, 0.0), 1.0)
    if not cells:
        return Text(f"{ratio * 100:3.0f}%", style=None if plain else style)
    full = int(ratio * cells + 0.5)  # half up
    text = Text()
    text.append(("#" if plain else "█") * full, style=None if plain else style)
    text.append(("." if plain else "░") * (cells - full), style=None if plain else "grey35")
    text.append(f"{ratio * 100:4.0f}%")
    return text


def _phase_cell(shares: dict[str, float] | None, plain: bool, bar: bool = True) -> Text:
    """A bar split by phase (letters in plain mode) and each phase's percentage."""
    if shares is None:
        return Text("n/a", style="dim")
    text = Text()
    cells = {phase: int(shares[phase] * BAR_CELLS + 0.5) for phase in PHASES}
    overflow = sum(cells.values()) - BAR_CELLS  # rounding: the largest takes up the difference
    if overflow:
        cells[max(PHASES, key=lambda phase: cells[phase])] -= overflow
    for phase in PHASES if bar else ():
        if plain:
            text.append(PHASE_LETTER[phase].lower() * cells[phase])
        else:
            text.append("█" * cells[phase], style=PHASE_STYLE[phase].replace("bold ", ""))
    # the percentages of the phases that took any time: "D40 M60"
    if bar:
        text.append(" ")
    text.append(" ".join(f"{PHASE_LETTER[phase]}{round(shares[phase] * 100)}" for phase in PHASES
                         if round(shares[phase] * 100) > 0))
    return text


def _state_cell(state: str, plain: bool) -> Text:
    return Text(state, style=None if plain else PHASE_STYLE.get(state, ""))


def _number(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return ABSENT
    if abs(value) >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}g}{unit}"


def _memory(used: float | None, total: float | None) -> str:
    if used is None:
        return ABSENT
    if total is None:
        return f"{used / GIB:.1f}G"
    return f"{used / GIB:.1f}/{total / GIB:.0f}G"


def _power(power: float | None, limit: float | None) -> str:
    if power is None:
        return ABSENT
    return f"{power:.0f}/{limit:.0f}W" if limit is not None else f"{power:.0f}W"


def _short_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100 80GB HBM3'."""
    return name.removeprefix("NVIDIA ").strip() or "?"


def _table(title: str, plain: bool) -> Table:
    return Table(title=title, title_justify="left", box=box.ASCII if plain else box.SIMPLE_HEAD,
                 show_edge=plain, pad_edge=plain, expand=False, title_style=None if plain else "bold",
                 header_style=None if plain else "bold")


def _window_label(window: float) -> str:
    if window <= 0:
        return "no window yet"
    return f"last {window:.0f}s" if window < 59.5 else "last 1m"


def _gpu_table(summary: Summary, options: Options) -> Table:
    plain = options.plain
    wide = options.width >= NO_NAME_BELOW
    bars = options.width >= NO_BARS_BELOW
    cells = ACTIVITY_CELLS if bars else 0
    table = _table(f"GPUs (sorted by {options.sort}; phases: {_window_label(summary.window)})", plain)
    for header, justify in (("GPU", "right"), ("name", "left"), ("state", "left"),
                            ("phases P/D/M/I %", "left"), ("SM", "left"), ("tensor", "left"), ("DRAM", "left"),
                            ("VRAM", "right"), ("power", "right"), ("temp", "right"), ("tok/s", "right"),
                            ("J/tok", "right")):
        if header in ("name", "temp") and not wide:
            continue
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis",  # type: ignore[arg-type]
                         max_width=14 if header == "name" else None, min_width=7 if header == "state" else None)
    no_gpm = False
    for row in sorted(summary.gpus, key=SORTS[options.sort]):
        gpu = row.gpu
        if gpu.sm is None and gpu.utilization is not None:
            sm = _bar(gpu.utilization, plain, style="blue", cells=cells)
            sm.append(" util")
            no_gpm = True
        else:
            sm = _bar(gpu.sm, plain, cells=cells)
        temperature = f"{gpu.temperature:.0f}C" if gpu.temperature is not None else ABSENT
        cells_of_row = [str(gpu.index), _short_name(gpu.name), _state_cell(row.state, plain),
                        _phase_cell(row.shares, plain, bars), sm, _bar(gpu.tensor, plain, cells=cells),
                        _bar(gpu.dram, plain, cells=cells), _memory(gpu.memory_used, gpu.memory_total),
                        _power(gpu.power, gpu.power_limit), temperature, _number(row.tokens_per_second),
                        _number(row.energy_per_token)]
        if not wide:
            del cells_of_row[9], cells_of_row[1]
        table.add_row(*_cells(cells_of_row, plain))
    if no_gpm:
        table.caption = "util = NVML utilization.gpu: this GPU has no GPM, so no SM, tensor or DRAM activity"
        table.caption_justify = "left"
    return table


def _service_table(summary: Summary, options: Options) -> Table:
    plain = options.plain
    table = _table(f"services (phases: {_window_label(summary.window)})", plain)
    for header, justify in (("service", "left"), ("GPUs", "left"), ("phases P/D/M/I %", "left"),
                            ("tok/s", "right"), ("J/tok", "right")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in summary.services:
        table.add_row(*_cells([row.service, ",".join(map(str, row.gpus)),
                               _phase_cell(row.shares, plain, options.width >= NO_BARS_BELOW),
                               _number(row.tokens_per_second), _number(row.energy_per_token)], plain))
    return table


def _process_table(summary: Summary, options: Options) -> Table:
    table = _table(f"processes (top {options.max_processes} by GPU memory)", options.plain)
    for header, justify in (("GPU", "right"), ("PID", "right"), ("name", "left"), ("pod", "left"),
                            ("container", "left"), ("VRAM", "right")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for process in summary.processes[:options.max_processes]:
        pod = f"{process.namespace}/{process.pod}" if process.namespace and process.pod else process.pod
        table.add_row(*_cells([str(process.gpu), process.pid, process.name or "?", pod or ABSENT,
                               process.container or ABSENT, f"{process.memory / GIB:.1f}G"], options.plain))
    return table


def render(summary: Summary | None, options: Options) -> RenderableType:
    """One frame: header, GPUs, services, processes, the keys. A None summary (nothing read yet)
    draws only the header and the error."""
    plain = options.plain
    parts: list[RenderableType] = []
    header = Text()
    header.append("gpuphase top", style=None if plain else "bold")
    header.append(f"  {options.url}")
    if summary is not None:
        header.append(f"  {len(summary.gpus)} GPU{'s' if len(summary.gpus) != 1 else ''}")
    parts.append(header)
    if options.error:
        message = Text(options.error, style=None if plain else "bold red")
        if summary is not None and options.stale_for is not None:
            message.append(f" (showing the reading of {options.stale_for:.0f}s ago)")
        parts.append(message)
    if summary is not None:
        if summary.gpus:
            parts.append(_gpu_table(summary, options))
        else:
            parts.append(Text("the agent exports no GPUs (is its device collector off?)"))
        if summary.services:
            parts.append(_service_table(summary, options))
        if summary.processes:
            parts.append(_process_table(summary, options))
    if options.keys:
        parts.append(Text(f"q quit   s sort ({' > '.join(SORT_ORDER)})", style=None if plain else "dim"))
    return Group(*parts)


def to_text(renderable: RenderableType, width: int = 160) -> str:
    """The renderable as plain text (no escape codes) at `width` columns."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, no_color=True,
                      legacy_windows=False, emoji=False, highlight=False)
    console.print(renderable)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def frame_text(summary: Summary | None, options: Options) -> str:
    """A frame as plain text at options.width columns."""
    return to_text(render(summary, options), options.width)
