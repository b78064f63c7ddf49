"""One scrape: read the View once, run every enabled collector in isolation, report on each.

client_python has no per-collector error isolation, so AgentCollector adds node_exporter's:
each collector's output is materialised and checked inside a try/except, and the scrape
reports gpu_scrape_collector_success / gpu_scrape_collector_duration_seconds per collector.
A collector that raises (or yields something that could not be written out) contributes
nothing but success 0; the rest of the scrape renders, and the HTTP response is never a 500.

"Could be written out" is settled when a sample is added: Family.add converts every label value
to str and every value to float, inside the collector, so a family holds nothing the exposition
writer can fail on, and the check here is only that the collector yielded Families.

AgentRegistry writes /metrics with exporters.exposition (a text writer that reuses each series'
formatted labels from the previous scrape); it is still a prometheus_client CollectorRegistry, so
the OTLP push and the name escapings the writer does not do read it through prometheus_client.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder

from gpuphase.exporters import exposition
from gpuphase.exporters.collectors import COLLECTORS, CollectFn
from gpuphase.exporters.collectors.families import Family
from gpuphase.model.view import View, ViewSource

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

    `collectors` defaults to every collector of gpuphase/model/metrics.yaml; `disabled` names the ones
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

    def families(self) -> list[Family]:
        """One scrape's families: every enabled collector's, then success and duration per collector."""
        view = self._source.view()
        success = Family("gpu_scrape_collector_success")
        duration = Family("gpu_scrape_collector_duration_seconds")
        out: list[Family] = []
        for name, collect in self._collectors.items():
            started = self._timer()
            try:
                families = [_checked(family) for family in collect(view)]
                ok = True
            except Exception:  # noqa: BLE001 - isolation is the point: any bug stays in its collector
                families = []
                ok = False
                self._error_log.exception(name, f"collector {name!r} failed; its metrics are left out of this scrape")
            duration.add((name,), self._timer() - started)
            success.add((name,), 1 if ok else 0)
            out += families
        out += (success, duration)
        return out

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol: the same families as prometheus_client Metrics."""
        return (family.metric() for family in self.families())


def _checked(family: Family) -> Family:
    """Raise here, inside the collector's try, for anything the exposition writer would choke on."""
    if not isinstance(family, Family):
        raise TypeError(f"collector yielded {type(family).__name__}, not a Family")
    return family


class AgentRegistry(CollectorRegistry):
    """A private registry (no process/platform default collectors) holding one AgentCollector."""

    def __init__(self, collector: AgentCollector):
        super().__init__(auto_describe=False)
        self.register(collector)
        self._collector = collector
        self.writer = exposition.ExpositionWriter()

    def write(self, form: str = exposition.TEXT) -> bytes:
        """One scrape as exposition.TEXT (Prometheus text 0.0.4) or exposition.OPENMETRICS."""
        return self.writer.write(self._collector.families(), form)

    def exposition(self, accept_header: str) -> tuple[bytes, str]:
        """(body, content type) of one scrape in the format the scraper's Accept header asks for.

        The format and content type are the ones prometheus_client's choose_encoder picks; only
        name escapings that would rewrite plain names (dots, values) are left to its writer.
        """
        encoder, content_type = choose_encoder(accept_header)
        form = exposition.dialect(content_type)
        if form is None:
            return encoder(self), content_type
        return self.write(form), content_type


def build_registry(
    source: ViewSource, disabled: Iterable[str] = (), timer: Callable[[], float] = time.perf_counter
) -> AgentRegistry:
    return AgentRegistry(AgentCollector(source, disabled, timer=timer))


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
    form = exposition.OPENMETRICS if openmetrics else exposition.TEXT
    return build_registry(StaticViewSource(view), disabled, timer).write(form).decode("utf-8")
