"""One scrape: read the View once, run every enabled collector in isolation, report on each.

client_python has no per-collector error isolation, so AgentCollector adds node_exporter's:
each collector's output is materialised and checked inside a try/except, and the scrape
reports gpu_scrape_collector_success / gpu_scrape_collector_duration_seconds per collector.
A collector that raises (or yields something that could not be written out) contributes
nothing but success 0; the rest of the scrape renders, and the HTTP response is never a 500.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_latest_openmetrics

from agent.view import View, ViewSource
from exporters.collectors import COLLECTORS, CollectFn
from exporters.collectors._families import Family

log = logging.getLogger(__name__)

ERROR_LOG_INTERVAL_SECONDS = 60.0


class RateLimitedLog:
    """Logs a failing collector's traceback at most once per interval, counting what it held back.

    Prometheus scrapes every few seconds; a collector that keeps failing must not flood the log.
    """

    def __init__(self, interval: float = ERROR_LOG_INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def exception(self, key: str, message: str) -> None:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        note = f" ({suppressed} similar failures not logged)" if suppressed else ""
        log.exception("%s%s", message, note)


class AgentCollector:
    """The one custom collector on the exporter's private CollectorRegistry.

    `collectors` defaults to every collector of agent/metrics.yaml; `disabled` names the ones
    turned off (--no-collector.NAME / config.disabled_collectors), which are simply not run.
    """

    def __init__(
        self,
        source: ViewSource,
        disabled: Iterable[str] = (),
        collectors: Mapping[str, CollectFn] | None = None,
        error_log: RateLimitedLog | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ):
        self._source = source
        available = COLLECTORS if collectors is None else collectors
        off = set(disabled)
        self._collectors = {name: fn for name, fn in available.items() if name not in off}
        self._error_log = error_log or RateLimitedLog()
        self._timer = timer  # golden-file tests pass a constant one so durations are reproducible

    def collect(self) -> Iterator[Metric]:
        view = self._source.view()
        success = Family("gpu_scrape_collector_success")
        duration = Family("gpu_scrape_collector_duration_seconds")
        for name, collect in self._collectors.items():
            started = self._timer()
            try:
                metrics = [_checked(metric) for metric in collect(view)]
                ok = True
            except Exception:  # noqa: BLE001 - isolation is the point: any bug stays in its collector
                metrics = []
                ok = False
                self._error_log.exception(name, f"collector {name!r} failed; its metrics are left out of this scrape")
            duration.add((name,), self._timer() - started)
            success.add((name,), 1 if ok else 0)
            yield from metrics
        yield success.metric
        yield duration.metric


def _checked(metric: Metric) -> Metric:
    """Raise here, inside the collector's try, for anything the exposition writer would choke on."""
    if not isinstance(metric, Metric):
        raise TypeError(f"collector yielded {type(metric).__name__}, not a prometheus_client Metric")
    for sample in metric.samples:
        if not isinstance(sample.value, (int, float)) or isinstance(sample.value, bool):
            raise TypeError(f"{sample.name}: value {sample.value!r} is not a number")
        if not all(isinstance(v, str) for v in sample.labels.values()):
            raise TypeError(f"{sample.name}: label values {sample.labels!r} are not all strings")
    return metric


def build_registry(
    source: ViewSource, disabled: Iterable[str] = (), timer: Callable[[], float] = time.perf_counter
) -> CollectorRegistry:
    """A private registry (no process/platform default collectors) holding one AgentCollector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(source, disabled, timer=timer))
    return registry


class StaticViewSource:
    """A ViewSource that always returns the same View: for rendering fixtures and golden files."""

    def __init__(self, view: View):
        self._view = view

    def view(self) -> View:
        return self._view


def render(
    view: View,
    disabled: Iterable[str] = (),
    openmetrics: bool = False,
    timer: Callable[[], float] = time.perf_counter,
) -> str:
    """The exposition text one scrape of `view` produces (Prometheus text 0.0.4, or OpenMetrics).

    Golden-file tests pass `timer=lambda: 0.0` so every collector duration renders as 0.
    """
    registry = build_registry(StaticViewSource(view), disabled, timer)
    generate = generate_latest_openmetrics if openmetrics else generate_latest
    return generate(registry).decode("utf-8")
