"""TLS and basic auth on the OTLP/gRPC receiver, from the same --otlp.web-config.file as OTLP/HTTP.

Real parts throughout: throwaway certificates from the openssl CLI (test_webconfig's helpers), the
real agent as a subprocess, the OTel SDK's gRPC span exporter, and grpcio channels for the refusals
whose status code matters.
"""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

from gpuphase.agent.spans.grpc_server import start_grpc_server
from gpuphase.agent.spans.receiver import SpanIntake
from gpuphase.exporters.webconfig import WebConfig, WebConfigError, grpc_server_credentials, load_web_config
from tests import spanfactory
from tests.agentproc import HOST, AgentProcess, poll
from tests.test_otlp_receiver import EXPORT, send_vllm_span_with_sdk
from tests.test_webconfig import fast_hash, make_ca, make_signed, write_config

USER, PASSWORD = "vllm", "span-s3cret"
SERVER_SAN = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("otlp-pki")
    make_ca(directory, "ca")
    make_signed(directory, "server", "ca", SERVER_SAN)
    make_signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return directory


def read(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def export_code(channel: grpc.Channel, authorization: str | None = None) -> grpc.StatusCode:
    """Status of one raw TraceService/Export call carrying a vLLM span."""
    body = spanfactory.request([spanfactory.vllm_span()]).SerializeToString()
    metadata = (("authorization", authorization),) if authorization else None
    try:
        channel.unary_unary(EXPORT)(body, metadata=metadata, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def tls_channel(pki: Path, port: int, client_cert: bool = False) -> grpc.Channel:
    key_pair = dict(private_key=read(pki, "client.key"), certificate_chain=read(pki, "client.crt")) if client_cert else {}
    return grpc.secure_channel(f"{HOST}:{port}", grpc.ssl_channel_credentials(read(pki, "ca.crt"), **key_pair))


# --- the real agent: TLS + basic auth on the gRPC receiver ------------------------------------------


@pytest.fixture(scope="module")
def agent(pki):
    web_config = write_config(pki, {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
        "basic_auth_users": {USER: fast_hash(PASSWORD)},
    }, "otlp-web.yml")
    with AgentProcess(["--backend", "sim", "--sim.gpus", "1", "--otlp.web-config.file", web_config]) as process:
        yield process


def test_sdk_exporter_with_tls_and_credentials_is_accepted(agent, pki):
    exporter = GrpcSpanExporter(endpoint=f"https://{agent.otlp_grpc_address}", timeout=10,
                                credentials=grpc.ssl_channel_credentials(read(pki, "ca.crt")),
                                headers={"authorization": basic(USER, PASSWORD)})
    send_vllm_span_with_sdk(exporter)
    poll(lambda: agent.scrape().value("gpu_spans_received_total", decoder="vllm") == 1, 30,
         message="the span counted as received")


def test_plaintext_to_the_tls_port_fails(agent):
    with grpc.insecure_channel(agent.otlp_grpc_address) as channel:
        assert export_code(channel, basic(USER, PASSWORD)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("authorization", [None, basic(USER, "wrong"), basic("nobody", PASSWORD), "Bearer x"])
def test_missing_or_wrong_credentials_are_unauthenticated_and_counted(agent, pki, authorization):
    before = agent.scrape().value("gpu_spans_rejected_total", reason="unauthorized") or 0
    with tls_channel(pki, agent.otlp_grpc_port) as channel:
        assert export_code(channel, authorization) == grpc.StatusCode.UNAUTHENTICATED
    assert agent.scrape().value("gpu_spans_rejected_total", reason="unauthorized") == before + 1


# --- in process: client certificates and the settings grpcio cannot honour ------------------------


class Receiver:
    """start_grpc_server with the credentials of a web config, on a free port."""

    def __init__(self, web: WebConfig):
        self.intake = SpanIntake(lambda windows: None)
        self.intake.start()
        self.server = start_grpc_server(self.intake, f"{HOST}:0", grpc_server_credentials(web))

    def close(self) -> None:
        self.server.stop()
        self.intake.stop()


@pytest.fixture
def mtls_receiver(pki):
    receiver = Receiver(load_web_config(write_config(pki, {"tls_server_config": {
        "cert_file": "server.crt", "key_file": "server.key",
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt"}}, "mtls.yml")))
    yield receiver
    receiver.close()


def test_required_client_certificate_is_enforced(mtls_receiver, pki):
    with tls_channel(pki, mtls_receiver.server.port, client_cert=True) as channel:
        assert export_code(channel) == grpc.StatusCode.OK
    with tls_channel(pki, mtls_receiver.server.port) as channel:
        assert export_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_optional_client_certificate_admits_clients_without_one(pki):
    receiver = Receiver(load_web_config(write_config(pki, {"tls_server_config": {
        "cert_file": "server.crt", "key_file": "server.key",
        "client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "ca.crt"}}, "optional.yml")))
    try:
        with tls_channel(pki, receiver.server.port) as channel:
            assert export_code(channel) == grpc.StatusCode.OK
    finally:
        receiver.close()


def test_no_tls_section_means_no_credentials(pki):
    assert grpc_server_credentials(WebConfig()) is None
    auth_only = load_web_config(write_config(pki, {"basic_auth_users": {USER: fast_hash(PASSWORD)}}, "auth.yml"))
    assert grpc_server_credentials(auth_only) is None


def test_tls13_only_is_refused_rather_than_weakened(pki):
    web = load_web_config(write_config(pki, {"tls_server_config": {
        "cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS13"}}, "tls13.yml"))
    with pytest.raises(WebConfigError, match="min_version TLS13"):
        grpc_server_credentials(web)


def test_agent_with_a_tls13_only_otlp_config_exits_with_the_reason(pki):
    web_config = write_config(pki, {"tls_server_config": {
        "cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS13"}}, "tls13-agent.yml")
    with AgentProcess(["--backend", "sim", "--otlp.web-config.file", web_config], wait_ready=False) as process:
        assert process.wait_exit(60) == 1
        assert "min_version TLS13" in process.stderr_text()
