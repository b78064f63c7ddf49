"""OTLP metrics push: the endpoint rule, and what a real OTLP receiver on loopback gets.

The receivers are real: a grpcio server implementing the OTLP MetricsService, and an http.server
taking POST /v1/metrics, both recording the ExportMetricsServiceRequests the OTel SDK's exporters
send. What arrives is compared with /metrics of the same registry (in process) or agent (subprocess).
"""

from __future__ import annotations

import gzip
import http.server
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from gpuphase import __version__
from gpuphase.exporters.otlp_push import MetricsPush, otel_unit
from gpuphase.exporters.registry import StaticViewSource, build_registry, render
from gpuphase.model import metricdefs
from gpuphase.model.addresses import GRPC, HTTP, PushConfigError, PushTarget, push_target
from tests.agentproc import HOST, AgentProcess, Metrics, poll
from tests.views import rich_view

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


# --- what a receiver got, flattened ------------------------------------------------------------


@dataclass
class Pushed:
    """One metric of one export request."""

    name: str
    unit: str
    description: str
    kind: str  # "gauge" or "sum"
    monotonic: bool
    temporality: int
    points: list[tuple[dict[str, str], float]]

    def value(self, **labels: str) -> float:
        matches = [value for attrs, value in self.points if all(attrs.get(k) == v for k, v in labels.items())]
        assert len(matches) == 1, f"{self.name}{labels}: {len(matches)} points"
        return matches[0]


def flatten(request: metrics_service_pb2.ExportMetricsServiceRequest) -> dict[str, Pushed]:
    out: dict[str, Pushed] = {}
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                data = getattr(metric, kind)
                points = [({a.key: a.value.string_value for a in point.attributes},
                           float(getattr(point, point.WhichOneof("value")))) for point in data.data_points]
                out[metric.name] = Pushed(metric.name, metric.unit, metric.description, kind,
                                          getattr(data, "is_monotonic", False),
                                          getattr(data, "aggregation_temporality", 0), points)
    return out


def resource_attributes(request: metrics_service_pb2.ExportMetricsServiceRequest) -> dict[str, str]:
    (resource_metrics,) = request.resource_metrics
    return {a.key: a.value.string_value for a in resource_metrics.resource.attributes}


class Recorder:
    """Thread-safe list of the export requests a receiver got."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def add(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[metrics_service_pb2.ExportMetricsServiceRequest]:
        with self._lock:
            return list(self._requests)


class GrpcMetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """A real OTLP/gRPC MetricsService on a free loopback port."""

    def __init__(self):
        self.recorder = Recorder()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{HOST}:0")
        self._server.start()

    def Export(self, request, context):  # noqa: N802 - the generated servicer's method name
        self.recorder.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def stop(self) -> None:
        self._server.stop(0).wait()


class HttpMetricsReceiver:
    """A real OTLP/HTTP endpoint: POST /v1/metrics with a protobuf body (gzip or not)."""

    def __init__(self):
        self.recorder = recorder = Recorder()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/metrics" or self.headers["Content-Type"] != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                recorder.add(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                response = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                self.wfile.write(response)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def grpc_receiver():
    receiver = GrpcMetricsReceiver()
    yield receiver
    receiver.stop()


# --- the endpoint rule -------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, insecure, expected", [
    ("collector:4317", False, PushTarget(GRPC, "collector:4317", plaintext=False)),
    ("collector:4317", True, PushTarget(GRPC, "collector:4317", plaintext=True)),
    ("https://collector:4317", False, PushTarget(GRPC, "collector:4317", plaintext=False)),
    ("http://127.0.0.1:4317", False, PushTarget(GRPC, "127.0.0.1:4317", plaintext=True)),
    ("http://[::1]:4317/", False, PushTarget(GRPC, "[::1]:4317", plaintext=True)),
    ("http://collector:4317", True, PushTarget(GRPC, "collector:4317", plaintext=True)),
    ("https://otel.example.com/v1/metrics", False, PushTarget(HTTP, "https://otel.example.com/v1/metrics", False)),
    ("http://localhost:4318/v1/metrics", False, PushTarget(HTTP, "http://localhost:4318/v1/metrics", True)),
    ("http://gw:8080/otlp/v1/metrics", True, PushTarget(HTTP, "http://gw:8080/otlp/v1/metrics", True)),
])
def test_endpoint_rule(endpoint, insecure, expected):
    assert push_target(endpoint, insecure) == expected


@pytest.mark.parametrize("endpoint, reason", [
    ("http://collector:4317", "plaintext"),  # leaving the host unencrypted needs --otlp.metrics-insecure
    ("http://10.0.0.7:4318/v1/metrics", "plaintext"),
    ("collector", "expected host:port"),
    ("https://collector", "needs a port"),
    ("https://collector:4318/v1/traces", "must end in /v1/metrics"),
    ("grpc://collector:4317", "scheme must be http or https"),
    ("http://collector:99999", "invalid port"),
])
def test_unusable_endpoints_are_refused_with_the_reason(endpoint, reason):
    with pytest.raises(PushConfigError, match=reason):
        push_target(endpoint, allow_plaintext=False)


def test_every_declared_unit_has_an_otel_unit():
    units = {definition.name: otel_unit(definition) for definition in metricdefs.load().values()}
    assert units["gpu_memory_used_bytes"] == "By"
    assert units["gpu_energy_joules_total"] == "J"
    assert units["gpu_sm_active_ratio"] == "1"
    assert units["gpu_temperature_celsius"] == "Cel"


def test_an_interval_below_one_second_is_refused(grpc_receiver):
    exporter = GrpcMetricExporter(endpoint=f"{HOST}:{grpc_receiver.port}", insecure=True)
    with pytest.raises(PushConfigError, match="at least 1s"):
        MetricsPush(build_registry(StaticViewSource(rich_view())), exporter, interval=0.5)


# --- in process: one export of a known View ----------------------------------------------------


def test_one_export_carries_exactly_what_metrics_renders(grpc_receiver):
    """rich_view() exercises every declared metric; the push must carry each sample of /metrics
    with the same name, labels and value, collected once for all instruments."""
    zero_timer = lambda: 0.0  # noqa: E731 - collector durations render as 0 on both paths
    registry = build_registry(StaticViewSource(rich_view()), timer=zero_timer)
    exporter = GrpcMetricExporter(endpoint=f"{HOST}:{grpc_receiver.port}", insecure=True, timeout=10)
    push = MetricsPush(registry, exporter, interval=600)  # only the final export on shutdown runs
    push.shutdown()

    (request,) = grpc_receiver.recorder.requests
    pushed = flatten(request)
    scraped = Metrics(render(rich_view(), timer=zero_timer))
    assert set(pushed) == set(scraped)
    for name, samples in scraped.items():
        expected = sorted((tuple(sorted(s.labels.items())), s.value) for s in samples)
        got = sorted((tuple(sorted(attrs.items())), value) for attrs, value in pushed[name].points)
        assert got == expected, name
    assert push.cache.collections == 1
    definitions = metricdefs.load()
    for metric in pushed.values():
        definition = definitions[metric.name]
        assert (metric.unit, metric.description) == (otel_unit(definition), definition.help)
        assert metric.kind == ("sum" if definition.type == "counter" else "gauge"), metric.name
    attributes = resource_attributes(request)
    assert attributes["service.name"] == "gpuphase" and attributes["service.version"] == __version__
    assert attributes["host.name"]


def test_disabled_collectors_are_not_pushed(grpc_receiver):
    registry = build_registry(StaticViewSource(rich_view()), disabled=["gpm"])
    exporter = GrpcMetricExporter(endpoint=f"{HOST}:{grpc_receiver.port}", insecure=True, timeout=10)
    MetricsPush(registry, exporter, interval=600, disabled_collectors=["gpm"]).shutdown()
    (request,) = grpc_receiver.recorder.requests
    names = set(flatten(request))
    assert "gpu_memory_used_bytes" in names
    assert not names & {d.name for d in metricdefs.by_collector("gpm")}


# --- the real agent ----------------------------------------------------------------------------


def gpu_metric_names() -> set[str]:
    return {d.name for d in metricdefs.load().values() if d.labels[:2] == ("gpu", "uuid")}


def check_export(pushed: dict[str, Pushed], gpus: set[str]) -> None:
    memory = pushed["gpu_memory_used_bytes"]
    assert (memory.kind, memory.unit) == ("gauge", "By")
    energy = pushed["gpu_energy_joules_total"]
    assert (energy.kind, energy.unit, energy.monotonic, energy.temporality) == ("sum", "J", True, CUMULATIVE)
    for name in gpu_metric_names() & set(pushed):
        for attrs, _ in pushed[name].points:
            assert attrs["gpu"] in gpus and attrs["uuid"].startswith("GPU-"), (name, attrs)
    for name in (n for n in pushed if n.endswith("_ratio")):
        assert all(0.0 <= value <= 1.0 for _, value in pushed[name].points), name
    for gpu in gpus:
        used, free = pushed["gpu_memory_used_bytes"].value(gpu=gpu), pushed["gpu_memory_free_bytes"].value(gpu=gpu)
        assert used > 0 and used + free == pushed["gpu_memory_total_bytes"].value(gpu=gpu)
        assert 0 < pushed["gpu_power_watts"].value(gpu=gpu) <= pushed["gpu_power_limit_watts"].value(gpu=gpu)
        assert pushed["gpu_up"].value(gpu=gpu) == 1


def names_match_scrape(agent: AgentProcess, recorder: Recorder) -> bool:
    """The latest export's names equal /metrics' sample names (polled: a family may appear between
    a push and a scrape, e.g. the first span counters)."""
    requests = recorder.requests
    return bool(requests) and set(flatten(requests[-1])) == set(agent.scrape())


def test_agent_pushes_its_metrics_over_grpc(grpc_receiver):
    args = ["--backend", "sim", "--sim.gpus", "2", "--otlp.metrics-endpoint", f"http://{HOST}:{grpc_receiver.port}",
            "--otlp.metrics-insecure", "--otlp.metrics-interval", "1s"]
    recorder = grpc_receiver.recorder
    with AgentProcess(args) as agent:
        poll(lambda: len(recorder.requests) >= 2, 30, message="two OTLP exports")
        poll(lambda: names_match_scrape(agent, recorder), 30, message="pushed names == /metrics names")
        requests = recorder.requests
        for request in requests:
            check_export(flatten(request), gpus={"0", "1"})
        first, last = flatten(requests[0]), flatten(requests[-1])
        for gpu in ("0", "1"):
            assert last["gpu_energy_joules_total"].value(gpu=gpu) >= first["gpu_energy_joules_total"].value(gpu=gpu)
        assert resource_attributes(requests[-1])["service.name"] == "gpuphase"
        exports_before_stop = len(recorder.requests)
        assert agent.stop() == 0
    assert len(recorder.requests) > exports_before_stop  # stopping flushes one last export


def test_agent_pushes_over_http_to_a_loopback_url_without_the_insecure_flag():
    receiver = HttpMetricsReceiver()
    try:
        args = ["--backend", "sim", "--sim.gpus", "1", "--otlp.metrics-interval", "1s",
                "--otlp.metrics-endpoint", f"http://{HOST}:{receiver.port}/v1/metrics"]
        with AgentProcess(args) as agent:
            poll(lambda: receiver.recorder.requests, 30, message="an OTLP/HTTP export")
            poll(lambda: names_match_scrape(agent, receiver.recorder), 30, message="pushed names == /metrics names")
            check_export(flatten(receiver.recorder.requests[-1]), gpus={"0"})
    finally:
        receiver.stop()


def test_agent_refuses_to_push_plaintext_off_the_host():
    args = ["--backend", "sim", "--otlp.metrics-endpoint", "http://192.0.2.10:4317"]
    with AgentProcess(args, wait_ready=False) as agent:
        assert agent.wait_exit(60) == 2  # a configuration error, caught before anything starts
        assert "flag --otlp.metrics-endpoint" in agent.stderr_text()
        assert "--otlp.metrics-insecure" in agent.stderr_text()
