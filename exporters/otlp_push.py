"""Push the /metrics families to an OpenTelemetry Collector over OTLP, for teams that do not scrape.

What is pushed is rendered from the same CollectorRegistry that serves /metrics, so there is one
code path for what gpuphase exports: one observable instrument per family of gpuphase/model/metrics.yaml,
named exactly as in Prometheus (counters keep `_total`, units stay in the name) because users'
queries and alerts must not depend on the transport. OTel's naming convention would strip both;
a Collector's Prometheus exporter would then add them back, and other backends would see names
that match nothing in our docs. The OTel `unit` is set from metrics.yaml (UCUM: By, s, W, ...).

Counters become cumulative monotonic Sums (unless the standard
OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE asks for delta), gauges become Gauges; label sets
become data point attributes unchanged. NVML is never called here: the callbacks read the
registry, which renders the sampler's latest snapshot, once per export cycle (`RegistryCache`), so
all values of one export come from the same collection (used + free = total holds within it).

Endpoint rule (gpuphase.model.addresses.push_target):
  - http(s)://host[:port]/.../v1/metrics  -> OTLP/HTTP (protobuf), POSTed to exactly that URL
  - host:port or http(s)://host:port      -> OTLP/gRPC
  - https:// means TLS, http:// plaintext; a bare host:port is TLS unless --otlp.metrics-insecure.
  - Plaintext to a host that is not loopback needs --otlp.metrics-insecure: metrics name hosts,
    pods and processes, and must not cross a network unencrypted by accident.
CA, client certificate and headers come from the standard OTEL_EXPORTER_OTLP_METRICS_* variables,
which the OTel exporters read themselves.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from gpuphase import __version__
from gpuphase.exporters.registry import RateLimitedLog
from gpuphase.model import metricdefs
from gpuphase.model.addresses import HTTP, PushConfigError, PushTarget, push_target
from gpuphase.model.durations import MIN_PUSH_INTERVAL
from gpuphase.model.metricdefs import MetricDef

log = logging.getLogger(__name__)

# Stopping must stay prompt (systemd's stop timeout, the kubelet's grace period) even when the
# Collector is unreachable: the final export gets this long, then the agent goes on stopping.
SHUTDOWN_TIMEOUT_MILLIS = 5_000
METER_NAME = "gpuphase"

# metrics.yaml's unit words -> UCUM, as OTLP wants them. An unknown word is an error at start-up,
# so a new unit in metrics.yaml cannot be pushed with a wrong or missing unit.
OTEL_UNITS = {
    "": "",
    "bytes": "By",
    "seconds": "s",
    "watts": "W",
    "joules": "J",
    "hertz": "Hz",
    "celsius": "Cel",
    "ratio": "1",
}


def otel_unit(definition: MetricDef) -> str:
    try:
        return OTEL_UNITS[definition.unit]
    except KeyError:
        raise ValueError(f"{definition.name}: metrics.yaml unit {definition.unit!r} has no OTel (UCUM) unit; "
                         "add it to exporters.otlp_push.OTEL_UNITS") from None


class RegistryCache:
    """One collection of the registry, shared by every instrument callback of an export cycle.

    The SDK calls each instrument's callback in turn; collecting the registry in each would render
    everything ~50 times per push and mix values from different samples. The first callback of a
    cycle refreshes (the cache is older than `max_age`, half the push interval); the others reuse.
    """

    def __init__(self, registry: CollectorRegistry, max_age: float, clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()  # the periodic thread and a shutdown's final collect may overlap
        self._taken_at: float | None = None
        self._samples: dict[str, list[Observation]] = {}
        self._error_log = RateLimitedLog()
        self.collections = 0  # how many times the registry was collected (tests check sharing)

    def observations(self, sample_name: str) -> list[Observation]:
        with self._lock:
            now = self._clock()
            if self._taken_at is None or now - self._taken_at >= self._max_age:
                self._samples = self._collect()
                self._taken_at = now
            return self._samples.get(sample_name, [])

    def _collect(self) -> dict[str, list[Observation]]:
        self.collections += 1
        out: dict[str, list[Observation]] = {}
        try:
            for family in self._registry.collect():
                for sample in family.samples:
                    out.setdefault(sample.name, []).append(Observation(sample.value, dict(sample.labels)))
        except Exception:  # noqa: BLE001 - a failed render skips one push; the agent and /metrics go on
            self._error_log.exception("otlp-push", "rendering metrics for the OTLP push failed; skipping this push")
            return {}
        return out


class MetricsPush:
    """A MeterProvider with one observable instrument per declared metric and a periodic OTLP reader.

    `shutdown()` exports one last time (bounded by SHUTDOWN_TIMEOUT_MILLIS) and stops the thread.
    """

    def __init__(self, registry: CollectorRegistry, exporter: MetricExporter, interval: float,
                 disabled_collectors: Iterable[str] = (), resource: Resource | None = None):
        check_interval(interval)
        self.cache = RegistryCache(registry, max_age=interval / 2)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
        self._provider = MeterProvider(metric_readers=[reader], resource=resource or agent_resource())
        meter = self._provider.get_meter(METER_NAME, __version__)
        off = set(disabled_collectors)
        for definition in metricdefs.load().values():
            if definition.collector not in off:
                _create_instrument(meter, definition, self.cache)

    def shutdown(self) -> None:
        self._provider.shutdown(timeout_millis=SHUTDOWN_TIMEOUT_MILLIS)


def check_interval(interval: float) -> None:
    if interval < MIN_PUSH_INTERVAL:
        raise PushConfigError(f"--otlp.metrics-interval must be at least {MIN_PUSH_INTERVAL:g}s, got {interval:g}s")


def _create_instrument(meter, definition: MetricDef, cache: RegistryCache) -> None:
    def observe(options: CallbackOptions) -> list[Observation]:
        return cache.observations(definition.name)

    create = meter.create_observable_counter if definition.type == "counter" else meter.create_observable_gauge
    create(definition.name, callbacks=[observe], unit=otel_unit(definition), description=definition.help)


def agent_resource() -> Resource:
    """service.name, service.version and host.name; OTEL_RESOURCE_ATTRIBUTES adds to them (e.g. a
    DaemonSet's k8s.node.name), the attributes set here win."""
    return Resource.create({
        "service.name": "gpuphase",
        "service.version": __version__,
        "host.name": socket.gethostname(),
    })


def create_exporter(target: PushTarget) -> MetricExporter:
    if target.protocol == HTTP:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        return HttpExporter(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    return GrpcExporter(endpoint=target.endpoint, insecure=target.plaintext)


def start_metrics_push(registry: CollectorRegistry, endpoint: str, interval: float, allow_plaintext: bool,
                       disabled_collectors: Iterable[str] = ()) -> MetricsPush:
    """Push `registry`'s metrics to `endpoint` every `interval` seconds. Raises PushConfigError."""
    target = push_target(endpoint, allow_plaintext)
    check_interval(interval)  # before the exporter opens a channel
    push = MetricsPush(registry, create_exporter(target), interval, disabled_collectors)
    log.info("pushing metrics over %s every %gs", target.describe(), interval)
    return push
