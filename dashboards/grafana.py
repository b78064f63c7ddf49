"""A tiny Grafana dashboard builder: just the panel kinds gpuphase uses, laid out on the 24-column grid.

Why not grafanalib: it is one more dependency for a few dozen lines of JSON, and pinning its
schema version is harder than writing the JSON we need. Every panel reads Prometheus through the
`${datasource}` variable, so the same JSON imports into any Grafana without editing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
GRID_WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # tables and "now" stats; range otherwise
    # True where an empty result is normal on a healthy host (no XID yet, no MIG): an end-to-end
    # check that requires every query to return data skips these.
    sparse: bool = False


@dataclass(frozen=True)
class Threshold:
    """A step: at and above `value` the colour changes. The first step starts at -inf."""

    value: float
    color: str


@dataclass(frozen=True)
class Panel:
    kind: str  # timeseries | stat | table
    title: str
    queries: tuple[Query, ...]
    unit: str
    description: str = ""
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    thresholds: tuple[Threshold, ...] = ()
    stacked: bool = False
    base_color: str = "green"

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "unit": self.unit,
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": self.base_color, "value": None}]
                + [{"color": t.color, "value": t.value} for t in self.thresholds],
            },
        }
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        if self.kind == "timeseries":
            defaults["color"] = {"mode": "palette-classic"}
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 30 if self.stacked else 10,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if self.stacked else "none", "group": "A"},
                "thresholdsStyle": {"mode": "line" if self.thresholds else "off"},
            }
        else:
            defaults["color"] = {"mode": "thresholds"}
        return {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "targets": [_target(q, chr(ord("A") + i), self.kind) for i, q in enumerate(self.queries)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": _OPTIONS[self.kind],
            **({"transformations": _TABLE_TRANSFORMS} if self.kind == "table" else {}),
        }


def _target(query: Query, ref_id: str, kind: str) -> dict[str, Any]:
    instant = query.instant or kind == "table"
    target = {
        "refId": ref_id,
        "datasource": DATASOURCE,
        "expr": query.expr,
        "legendFormat": query.legend or "__auto",
        "instant": instant,
        "range": not instant,
    }
    if kind == "table":
        target["format"] = "table"
    return target


_OPTIONS: dict[str, dict[str, Any]] = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "stat": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "textMode": "auto",
        "orientation": "auto",
    },
    "table": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}},
}
# Tables show one row per series: drop the time and name columns Prometheus adds.
_TABLE_TRANSFORMS = [{"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True, "job": True}}}]


def timeseries(title: str, *queries: Query, unit: str, **options: Any) -> Panel:
    return Panel("timeseries", title, queries, unit, **options)


def stat(title: str, *queries: Query, unit: str, **options: Any) -> Panel:
    options.setdefault("width", 4)
    options.setdefault("height", 4)
    return Panel("stat", title, queries, unit, **options)


def table(title: str, *queries: Query, unit: str, **options: Any) -> Panel:
    options.setdefault("width", 24)
    return Panel("table", title, queries, unit, **options)


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def row(title: str, *panels: Panel) -> Row:
    return Row(title, panels)


# --- template variables ------------------------------------------------------------------------

def datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-select label variable whose "All" means the regex .* (so new hosts appear by themselves)."""
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 3, "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "regex": "",
    }


def textbox_variable(name: str, label: str, default: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "textbox", "query": default, "hide": 0,
            "current": {"selected": False, "text": default, "value": default},
            "options": [{"selected": True, "text": default, "value": default}]}


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    time_from: str = "now-6h"

    def panels(self) -> Iterable[Panel]:
        for r in self.rows:
            yield from r.panels

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["gpuphase", "gpu"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": "30s",
            "time": {"from": self.time_from, "to": "now"},
            "timezone": "browser",
            "annotations": {"list": []},
            "links": [{"title": "gpuphase dashboards", "type": "dashboards", "tags": ["gpuphase"],
                       "asDropdown": True, "includeVars": True, "keepTime": True}],
            "templating": {"list": [datasource_variable(), *self.variables]},
            "panels": _layout(self.rows),
        }


def _layout(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Place rows and their panels left to right, wrapping at 24 columns; ids in reading order."""
    out: list[dict[str, Any]] = []
    y = 0
    for r in rows:
        out.append({"id": len(out) + 1, "type": "row", "title": r.title, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}})
        y += 1
        x, line_height = 0, 0
        for panel in r.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            out.append(panel.to_json(len(out) + 1, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return out
