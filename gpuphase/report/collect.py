"""The report's queries: what each GPU did over the range, read from the recording rules of group
gpuphase.report (alerts/rules.py), split by time and by host so no query is large.

Each record holds what a GPU did in one rule step (5 minutes by default); sum_over_time over a
window gives the window's total in every Prometheus-compatible store alike. Two sets of windows:
the timeline (up to TIMELINE_BUCKETS, the phase hours the plots show, summed for the totals) and
the totals (everything else, in windows of at most TOTALS_WINDOW). Each query asks for many
records at once, tagged with a `gpuphase_kind` label and joined with `or`, so a 30-day report on
100 hosts is a few hundred small queries rather than thousands.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from gpuphase.alerts import rules
from gpuphase.model.durations import format_duration, parse_duration
from gpuphase.report.api import ApiError, PrometheusApi

TIMELINE_BUCKETS = 24
TOTALS_WINDOW = 7 * 86400.0
HOSTS_PER_QUERY = 100
# VictoriaMetrics refuses queries over 16 KiB by default (-search.maxQueryLen); stay well under.
MAX_QUERY_CHARS = 12 * 1024
CONCURRENT_QUERIES = 4
KIND = "gpuphase_kind"
GPU_KEY = ("instance", "gpu", "uuid")


class ReportDataError(RuntimeError):
    """The store holds nothing to report on (or not what the report needs); one line saying why."""


@dataclass(frozen=True)
class Window:
    end: float
    seconds: float


@dataclass(frozen=True)
class Gpu:
    instance: str
    gpu: str
    uuid: str
    model: str


@dataclass
class Collected:
    """Raw figures by GPU key (instance, gpu, uuid); seconds, joules, tokens, bytes, ratios."""
    step: float
    end: float
    gpus: list[Gpu]
    timeline: list[Window]
    # kind -> gpu key -> extra labels (phase, service) -> value; per timeline bucket for `buckets`.
    totals: dict[str, dict[tuple, dict[tuple, float]]] = field(default_factory=dict)
    buckets: dict[str, dict[tuple, list[dict[tuple, float]]]] = field(default_factory=dict)
    queries: int = 0
    warnings: list[str] = field(default_factory=list)


# kind: (record prefix, aggregation over time, how windows combine, extra labels kept)
_TIMELINE_KINDS = {
    "observed": (rules.REPORT_OBSERVED, "sum", ()),
    "phase_seconds": (rules.REPORT_PHASE_SECONDS, "sum", ("phase", "service")),
}
_TOTAL_KINDS = {
    "tokens": (rules.REPORT_PHASE_TOKENS, "sum", ("phase", "service")),
    "phase_energy": (rules.REPORT_PHASE_ENERGY, "sum", ("phase", "service")),
    "energy": (rules.REPORT_ENERGY, "sum", ()),
    "idle_allocated": (rules.REPORT_IDLE_ALLOCATED, "sum", ()),
    "unused": (rules.REPORT_UNUSED, "sum", ()),
    "bandwidth_bound": (rules.REPORT_BANDWIDTH_BOUND, "sum", ()),
    "memory_used": (rules.REPORT_MEMORY_USED, "max", ()),
    "memory_total": (rules.REPORT_MEMORY_TOTAL, "max", ()),
    # Averages: each window's, weighted by its length (kind + WEIGHT holds the weights), so the
    # series is scanned once rather than for a sum and a count.
    "dram": (rules.REPORT_DRAM, "avg", ()),
    "tensor": (rules.REPORT_TENSOR, "avg", ()),
}
WEIGHT = "_weight"
KINDS = {**_TIMELINE_KINDS, **_TOTAL_KINDS}


def selector_matchers(selector: str) -> str:
    """The matchers inside a `{...}` selector ('' for none), checked just enough to be spliced."""
    text = selector.strip()
    if not text:
        return ""
    if not (text.startswith("{") and text.endswith("}")):
        raise ReportDataError(f"--selector {selector!r}: expected label matchers in braces, e.g. "
                              '\'{job="gpuphase"}\'')
    return text[1:-1].strip().rstrip(",")


def windows(end: float, range_seconds: float, count: int, step: float) -> list[Window]:
    """`count` windows tiling (end - range, end], newest last, each a whole number of steps except
    the oldest, which takes what is left."""
    count = max(1, min(count, math.ceil(range_seconds / step)))
    size = math.ceil(range_seconds / count / step) * step
    out, covered = [], 0.0
    while covered < range_seconds - 1e-9:
        seconds = min(size, range_seconds - covered)
        out.append(Window(end - covered, seconds))
        covered += seconds
    return out[::-1]


def record_name(prefix: str, step: float) -> str:
    return f"{prefix}{format_duration(int(step))}"


def selector(matchers: str, *extra: str) -> str:
    return "{" + ", ".join(part for part in (matchers, *extra) if part) + "}"


_RE2_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}])")


def instance_matcher(instances: list[str]) -> str:
    """instance=~"a|b|c" matching exactly these (RE2 specials escaped, then the PromQL string)."""
    literal = "|".join(_RE2_SPECIAL.sub(r"\\\1", i) for i in instances)
    return 'instance=~"' + literal.replace("\\", "\\\\").replace('"', '\\"') + '"'


def host_batches(instances: list[str], longest: Callable[[str], str]) -> list[str]:
    """The host matchers to split queries by: none when one query can take every host; else as
    many hosts a query as fit HOSTS_PER_QUERY and MAX_QUERY_CHARS (`longest` builds the longest
    query for a matcher)."""
    if len(instances) <= HOSTS_PER_QUERY and len(longest("")) <= MAX_QUERY_CHARS:
        return [""]
    batches: list[str] = []
    batch: list[str] = []
    for instance in instances:
        trial = batch + [instance]
        if batch and (len(trial) > HOSTS_PER_QUERY or len(longest(instance_matcher(trial))) > MAX_QUERY_CHARS):
            batches.append(instance_matcher(batch))
            trial = [instance]
        batch = trial
    batches.append(instance_matcher(batch))
    return batches


def union_query(kinds: dict, step: float, matchers: str, seconds: float) -> str:
    """One query for several records over one window, each result tagged with its kind."""
    window = f"{int(round(seconds * 1000))}ms"
    parts = []
    for kind, (prefix, how, _) in kinds.items():
        inner = f"{how}_over_time({record_name(prefix, step)}{selector(matchers)}[{window}])"
        parts.append(f'label_replace({inner}, "{KIND}", "{kind}", "", "")')
    return "\nor\n".join(parts)


def discover_step(api: PrometheusApi, matchers: str, start: float, end: float) -> tuple[float, list[str]]:
    """The report group's step, from its records' names (…:sum5m -> 300 s)."""
    prefix = rules.REPORT_OBSERVED
    names = api.label_values("__name__", selector(matchers, f'__name__=~"{re.escape(prefix)}.+"'), start, end)
    steps = sorted({parse_duration(name[len(prefix):]) for name in names if _is_duration(name[len(prefix):])})
    if not steps:
        raise ReportDataError(
            f"no {prefix}<step> series between {iso(start)} and {iso(end)}: load the recording rules of "
            f"group {rules.REPORT_GROUP} (alerts/gpuphase-rules.yaml) into the Prometheus that scrapes the "
            "agents and wait one step (5 minutes by default)")
    warnings = []
    if len(steps) > 1:
        warnings.append(f"records for several report steps found ({', '.join(format_duration(int(s)) for s in steps)}):"
                        f" reading the {format_duration(int(steps[0]))} ones")
    return steps[0], warnings


def _is_duration(text: str) -> bool:
    try:
        return parse_duration(text) > 0
    except ValueError:
        return False


def align_end(api: PrometheusApi, matchers: str, end: float, step: float) -> float:
    """`end` moved to half a step after the last rule evaluation before it, so that every window
    boundary (end minus whole steps) falls between evaluations. Prometheus 2 ranges include a
    sample exactly at their start, Prometheus 3 and VictoriaMetrics do not; between evaluations
    no sample sits on a boundary and every store sums the same samples. The window still holds
    exactly the evaluations at or before `end`."""
    record = record_name(rules.REPORT_OBSERVED, step)
    result = api.query(f"max(timestamp({record}{selector(matchers)}))", end)
    if not result:
        return end
    last = float(result[0]["value"][1])
    return last + step / 2 if 0 <= end - last < step else end


def list_gpus(api: PrometheusApi, matchers: str, start: float, end: float) -> list[Gpu]:
    found = api.series(f"gpu_info{selector(matchers)}", start, end)
    gpus = {}
    for labels in found:
        key = tuple(labels.get(name, "") for name in GPU_KEY)
        gpus[key] = Gpu(*key, model=labels.get("name", ""))
    return [gpus[key] for key in sorted(gpus, key=_natural)]


def _natural(key: tuple) -> tuple:
    """node-10 after node-9, GPU 10 after GPU 9."""
    return tuple(tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", part)) for part in key)


def collect(api: PrometheusApi, matchers: str, end: float, range_seconds: float,
            progress: Callable[[int, int], None] | None = None) -> Collected:
    start = end - range_seconds
    gpus = list_gpus(api, matchers, start, end)
    if not gpus:
        raise ReportDataError(f"no GPUs (gpu_info{selector(matchers)}) between {iso(start)} and {iso(end)}: "
                              "check --range/--end and that --selector matches the agents' job")
    step, warnings = discover_step(api, matchers, start, end)
    end = align_end(api, matchers, end, step)
    timeline = windows(end, range_seconds, TIMELINE_BUCKETS, step)
    totals = windows(end, range_seconds, math.ceil(range_seconds / TOTALS_WINDOW), step)
    instances = sorted({g.instance for g in gpus}, key=lambda i: _natural((i,)))
    batches = host_batches(instances, lambda hosts: union_query(
        _TOTAL_KINDS, step, ", ".join(p for p in (matchers, hosts) if p), totals[0].seconds))
    jobs = [(kinds, index, window, batch) for kinds, spans in ((_TIMELINE_KINDS, timeline), (_TOTAL_KINDS, totals))
            for index, window in enumerate(spans) for batch in batches]
    out = Collected(step=step, end=end, gpus=gpus, timeline=timeline, warnings=warnings)
    done = 0

    def run(job):
        kinds, index, window, batch = job
        expr = union_query(kinds, step, ", ".join(p for p in (matchers, batch) if p), window.seconds)
        return job, api.query(expr, window.end)

    with ThreadPoolExecutor(CONCURRENT_QUERIES) as pool:
        for (kinds, index, window, _), result in pool.map(run, jobs):
            _file(out, kinds is _TIMELINE_KINDS, index, len(timeline), window.seconds, result)
            done += 1
            if progress:
                progress(done, len(jobs))
    out.queries = api.requests
    return out


def _file(out: Collected, timeline: bool, index: int, buckets: int, seconds: float, result: list[dict]) -> None:
    for item in result:
        labels = item.get("metric", {})
        kind = labels.get(KIND)
        if kind not in KINDS:
            continue
        try:
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise ApiError(f"the API answered a malformed sample for {kind}: {str(item)[:160]}") from None
        if not math.isfinite(value):
            continue
        key = (labels.get("instance", ""), labels.get("gpu", ""), labels.get("uuid", ""))
        extra = tuple(labels.get(name, "") for name in KINDS[kind][2])
        if timeline:
            by_gpu = out.buckets.setdefault(kind, {})
            per_bucket = by_gpu.get(key)
            if per_bucket is None:  # not setdefault: its default would be built for every sample
                per_bucket = by_gpu[key] = [defaultdict(float) for _ in range(buckets)]
            per_bucket[index][extra] += value
            continue
        how = KINDS[kind][1]
        cell = out.totals.setdefault(kind, {}).setdefault(key, {})
        if how == "max":
            cell[extra] = max(cell.get(extra, value), value)
        elif how == "avg":
            cell[extra] = cell.get(extra, 0.0) + value * seconds
            weights = out.totals.setdefault(kind + WEIGHT, {}).setdefault(key, {})
            weights[extra] = weights.get(extra, 0.0) + seconds
        else:
            cell[extra] = cell.get(extra, 0.0) + value


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminal_progress(done: int, total: int) -> None:
    """`queried 37/120` on stderr, rewritten in place; only where stderr is a terminal."""
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\rgpuphase report: queried {done}/{total}", end=end, file=sys.stderr, flush=True)
