"""`gpuphase report` end to end: query the store, analyse, recommend, and say what is uncertain."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from gpuphase.report.analyse import Analysis
from gpuphase.report.api import PrometheusApi
from gpuphase.report.collect import collect, iso, selector_matchers
from gpuphase.report.prices import PriceBook
from gpuphase.report.recommend import HOURS_PER_MONTH, Recommender, Thresholds

SCHEMA_VERSION = 1
# Below a day of data a monthly figure is an extrapolation of whatever that day held.
SHORT_DATA_HOURS = 24.0


def build_report(api: PrometheusApi, *, selector: str, end: float, range_seconds: float, prices: PriceBook,
                 thresholds: Thresholds = Thresholds(),
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    matchers = selector_matchers(selector)
    data = collect(api, matchers, end, range_seconds, progress)
    analysis = Analysis(data, prices)
    recommendations = Recommender(range_seconds, data.step, matchers, prices, thresholds).recommend(
        analysis.gpus, analysis.services)
    fleet = analysis.fleet
    savings = [r["monthly_savings"] for r in recommendations if r["monthly_savings"] is not None]
    fleet["monthly_savings"] = round(sum(savings), 2) if savings else None
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"url": api.url, "selector": selector, "step_seconds": data.step, "queries": data.queries},
        "range": {"start": iso(data.end - range_seconds), "end": iso(data.end), "seconds": range_seconds},
        "currency": prices.currency,
        "warnings": data.warnings + _warnings(analysis, prices, range_seconds),
        "fleet": fleet,
        "gpus": analysis.gpus,
        "services": analysis.services,
        "recommendations": recommendations,
    }


def _warnings(analysis: Analysis, prices: PriceBook, range_seconds: float) -> list[str]:
    out = []
    gpus = analysis.gpus
    if not gpus:
        return ["no GPU was observed in the range: nothing to report"]
    longest = max(g["hours"] for g in gpus)
    if longest * 3600 < 0.9 * range_seconds:
        out.append(f"data covers at most {longest:.2f} h of the {range_seconds / 3600:.2f} h range "
                   "(agents or recording rules started later, or gaps): figures cover what was observed")
    if longest < SHORT_DATA_HOURS:
        out.append(f"only {longest:.2f} h of data: monthly figures extrapolate it to {HOURS_PER_MONTH:g} h "
                   "and are as typical as that time was")
    unpriced = sorted({g["model"] or "(unnamed)" for g in gpus if g["price_per_hour"] is None})
    if unpriced:
        out.append(f"no price for GPU model(s) {', '.join(unpriced)}: their costs and savings are null "
                   "(give --price.gpu-hour or --price.file)")
    without_phases = sum(1 for g in gpus if not g["services"])
    if without_phases:
        out.append(f"{without_phases} of {len(gpus)} GPUs had no phase accounting (no service mapped): their "
                   "time is 'unknown' and their idle time comes from activity alone")
    return out
