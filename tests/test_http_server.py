"""The metrics HTTP server over real sockets on loopback (plain HTTP; TLS and auth: test_webconfig.py)."""

from __future__ import annotations

import gzip
import http.client
import socket

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from gpuphase import __version__
from gpuphase.exporters.collectors import COLLECTORS
from gpuphase.exporters.http import MetricsServer, accepts_gzip
from gpuphase.exporters.registry import StaticViewSource, build_registry
from tests.views import rich_view


def get(server: MetricsServer, path: str, method: str = "GET", host: str = "127.0.0.1", **headers: str):
    """(status, headers, body) of one request on a fresh connection."""
    connection = http.client.HTTPConnection(host, server.port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


@pytest.fixture
def ready_flag() -> list[bool]:
    return [False]


@pytest.fixture
def server(ready_flag):
    registry = build_registry(StaticViewSource(rich_view()))
    with MetricsServer(registry, "127.0.0.1:0", ready=lambda: ready_flag[0]) as running:
        yield running


def test_metrics_endpoint_serves_the_registry(server):
    status, headers, body = get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"gpu_up", "gpu_power_watts", "gpu_scrape_collector_success"} <= families


def test_openmetrics_when_asked_for(server):
    status, headers, body = get(server, "/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert "gpu_phase_seconds" in {f.name for f in parse_openmetrics(body.decode())}


def test_gzip_when_accepted(server):
    _, _, plain = get(server, "/metrics")
    status, headers, body = get(server, "/metrics", **{"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(body) < len(plain)
    assert b"gpu_up{" in gzip.decompress(body)


@pytest.mark.parametrize("header, expected", [
    ("gzip", True), ("deflate, GZIP;q=0.5", True), ("gzip;q=0", False), ("identity", False), ("", False),
])
def test_accepts_gzip(header, expected):
    assert accepts_gzip(header) is expected


def test_landing_page_links_metrics_and_health(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for link in ('href="/metrics"', 'href="/-/healthy"', 'href="/-/ready"'):
        assert link in page
    assert __version__ in page


def test_healthy(server):
    assert get(server, "/-/healthy")[::2] == (200, b"OK\n")


def test_ready_is_503_until_the_check_passes(server, ready_flag):
    status, _, body = get(server, "/-/ready")
    assert status == 503 and b"Not ready" in body
    ready_flag[0] = True
    assert get(server, "/-/ready")[0] == 200


def test_a_readiness_check_that_raises_means_not_ready():
    def broken() -> bool:
        raise RuntimeError("no snapshot")

    with MetricsServer(build_registry(StaticViewSource(rich_view())), "127.0.0.1:0", ready=broken) as server:
        assert get(server, "/-/ready")[0] == 503
        assert get(server, "/-/healthy")[0] == 200


def test_unknown_paths_are_404(server):
    assert get(server, "/metricsx")[0] == 404
    assert get(server, "/-/reload")[0] == 404


def test_head_returns_headers_without_body(server):
    status, headers, body = get(server, "/metrics", method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""


def test_custom_telemetry_path():
    registry = build_registry(StaticViewSource(rich_view()))
    with MetricsServer(registry, "127.0.0.1:0", telemetry_path="/gpu/metrics") as server:
        assert get(server, "/gpu/metrics")[0] == 200
        assert get(server, "/metrics")[0] == 404
        assert 'href="/gpu/metrics"' in get(server, "/")[2].decode()


def test_keep_alive_serves_several_scrapes_on_one_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200 and b"gpu_up" in response.read()
    finally:
        connection.close()


def test_a_failing_collector_never_becomes_a_500(monkeypatch):
    def broken(view):
        raise RuntimeError("boom")

    monkeypatch.setitem(COLLECTORS, "memory", broken)
    registry = build_registry(StaticViewSource(rich_view()))
    with MetricsServer(registry, "127.0.0.1:0") as failing:
        status, _, body = get(failing, "/metrics")
    assert status == 200
    assert b'gpu_scrape_collector_success{collector="memory"} 0.0' in body
    assert b"gpu_power_watts{" in body


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("this host has no IPv6 support")
    try:
        server = MetricsServer(build_registry(StaticViewSource(rich_view())), "[::1]:0")
    except OSError as err:
        pytest.skip(f"cannot bind ::1 here: {err}")
    with server:
        assert get(server, "/-/healthy", host="::1")[0] == 200


def test_shutdown_closes_the_port():
    server = MetricsServer(build_registry(StaticViewSource(rich_view())), "127.0.0.1:0").start()
    port = server.port
    assert port > 0 and get(server, "/-/healthy")[0] == 200
    server.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_telemetry_path_must_be_absolute():
    with pytest.raises(ValueError, match="must start with '/'"):
        MetricsServer(build_registry(StaticViewSource(rich_view())), "127.0.0.1:0", telemetry_path="metrics")
