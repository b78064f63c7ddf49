"""Connection-level attacks on the real agent (a subprocess), the way one on the node would make them.

Each test holds hundreds of hostile connections open on /metrics and on the OTLP/HTTP receiver
while scraping as Prometheus would, and asserts what an operator cares about: the agent lives,
every scrape is answered, its thread count does not grow with the connections (systemd's
TasksMax=128), its peak resident memory (the kernel's VmHWM) stays under the 384Mi the DaemonSet
ships, and the refusals are counted. How much memory each attack costs against idle is measured in
benchmarks/attacks.py, not asserted here.
"""

from __future__ import annotations

import socket
import time

import pytest

from benchmarks.attacks import connections, send_quietly, vm_kib
from gpuphase.web.server import Limits
from tests.agentproc import AgentProcess, poll

SHIPPED_MEMORY_LIMIT = 384 * 1024 * 1024  # packaging/kubernetes/base/daemonset.yaml
HEADER_LIMIT = Limits().max_header_bytes


def peak_rss(agent: AgentProcess) -> int:
    return vm_kib(agent.pid, "VmHWM") * 1024


def rejected(agent: AgentProcess, listener: str, reason: str) -> float:
    return agent.scrape().value("gpu_http_rejected_total", listener=listener, reason=reason) or 0


@pytest.fixture
def agent():
    with AgentProcess(["--backend", "sim", "--sim.gpus", "2"]) as running:
        yield running


def test_header_bombs_are_cut_off_and_scrapes_keep_being_answered(agent):
    """100 connections per listener that each send just under the header limit and stall, plus 100
    that go past it: the first kind is held at most 32 KiB each, the second closed at once."""
    threads_before = agent.process().num_threads()
    sockets = []
    for port in (agent.metrics_port, agent.otlp_http_port):
        held = connections(port, 100)
        for sock in held:
            send_quietly(sock, b"GET /metrics HTTP/1.1\r\n" + b"X-Bomb: " + b"a" * (HEADER_LIMIT - 200) + b"\r\n")
        over = connections(port, 100)
        for sock in over:
            for _ in range(4):
                send_quietly(sock, b"X-Bomb: " + b"a" * 16384 + b"\r\n")
        sockets += held + over
    for _ in range(5):
        assert agent.scrape().value("gpu_up", gpu="0") == 1
    assert agent.process().num_threads() <= threads_before + 2
    poll(lambda: rejected(agent, "web", "header_too_large") >= 100, 30, message="web header refusals counted")
    poll(lambda: rejected(agent, "otlp_http", "header_too_large") >= 100, 30, message="OTLP refusals counted")
    assert peak_rss(agent) < SHIPPED_MEMORY_LIMIT
    for sock in sockets:
        sock.close()
    assert agent.returncode is None


def test_slowloris_on_both_listeners_cannot_hold_connections_or_threads(agent):
    """300 connections per listener trickling a byte every 0.3 s, reopened whenever the agent closes
    them, for ~4 s: the cap evicts the longest-waiting (the request deadline that ends a trickle
    which outlives the cap is tested in test_web_server.py, with limits shrunk to fit a test)."""
    threads_before = agent.process().num_threads()
    ports = (agent.metrics_port, agent.otlp_http_port)
    trickling = {port: connections(port, 300) for port in ports}
    for _ in range(12):  # ~4 s of trickling, a byte per connection per round
        for port, sockets in trickling.items():
            for i, sock in enumerate(sockets):
                if not send_quietly(sock, b"G"):
                    sock.close()
                    sockets[i] = connections(port, 1)[0]
        assert agent.scrape().value("gpu_up", gpu="1") == 1
        assert agent.process().num_threads() <= threads_before + 2
        time.sleep(0.3)
    metrics = agent.scrape()
    for listener in ("web", "otlp_http"):
        assert (metrics.value("gpu_http_open_connections", listener=listener) or 0) <= 256
        assert (metrics.value("gpu_http_rejected_total", listener=listener, reason="evicted") or 0) >= 44
    assert peak_rss(agent) < SHIPPED_MEMORY_LIMIT
    for sockets in trickling.values():
        for sock in sockets:
            sock.close()
    poll(lambda: (agent.scrape().value("gpu_http_open_connections", listener="otlp_http") or 0) == 0, 30,
         message="the closed connections gone from the agent too")
    assert agent.returncode is None


def test_an_unauthenticated_upload_is_refused_before_its_body(tmp_path):
    """With basic auth on OTLP/HTTP, a 4 MiB upload with a wrong password is answered 401 from its
    head alone: the agent never waits for (or buffers) the body."""
    import bcrypt
    import yaml

    config = tmp_path / "otlp-web.yml"
    config.write_text(yaml.safe_dump({"basic_auth_users": {
        "sender": bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)).decode()}}))
    with AgentProcess(["--backend", "sim", "--sim.gpus", "1", "--otlp.web-config.file", str(config)]) as agent:
        with socket.create_connection(("127.0.0.1", agent.otlp_http_port), timeout=10) as sock:
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
                         b"Authorization: Basic c2VuZGVyOndyb25n\r\nContent-Length: 4194304\r\n\r\n")
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert agent.scrape().value("gpu_spans_rejected_total", reason="unauthorized") == 1
