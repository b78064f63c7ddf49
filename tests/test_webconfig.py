"""Web config (exporter-toolkit format): validation errors, and TLS + basic auth against a real
TLS client, with a throwaway CA, server and client certificates made by the openssl CLI."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
from pathlib import Path

import bcrypt
import pytest
import yaml

from gpuphase.exporters import webconfig
from gpuphase.exporters.http import MetricsServer
from gpuphase.exporters.registry import StaticViewSource, build_registry
from gpuphase.exporters.webconfig import BasicAuth, WebConfig, WebConfigError, load_web_config
from tests.conftest import require_tool
from tests.views import rich_view

PASSWORD = "s3cret-scrape"


# --- certificates ---------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=directory)


def make_signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca signs server and client; rogue-ca signs a client certificate the server must refuse."""
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "rogue-ca")
    make_signed(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                           "extendedKeyUsage=serverAuth\n")
    make_signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_signed(directory, "rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return directory


def write_config(directory: Path, config: object, name: str = "web.yml") -> str:
    path = directory / name
    path.write_text(yaml.safe_dump(config) if not isinstance(config, str) else config)
    return str(path)


def fast_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


# --- a real TLS client ----------------------------------------------------------------------------


def client_context(pki: Path, cert: str | None = None, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    if max_version:
        context.maximum_version = max_version
    return context


def https_get(server: MetricsServer, context: ssl.SSLContext, path: str = "/metrics", auth: tuple | None = None):
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def serve(config: WebConfig) -> MetricsServer:
    return MetricsServer(build_registry(StaticViewSource(rich_view())), "127.0.0.1:0", web_config=config)


@pytest.fixture(scope="module")
def tls_auth_config(pki) -> WebConfig:
    return load_web_config(write_config(pki, {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
        "basic_auth_users": {"prometheus": fast_hash(PASSWORD)},
        "http_server_config": {"headers": {"Strict-Transport-Security": "max-age=31536000"}},
    }, "tls-auth.yml"))


def test_tls_with_the_right_password_serves_metrics(tls_auth_config, pki):
    with serve(tls_auth_config) as server:
        status, headers, body = https_get(server, client_context(pki), auth=("prometheus", PASSWORD))
    assert status == 200 and b"gpu_up{" in body
    assert headers["Strict-Transport-Security"] == "max-age=31536000"


@pytest.mark.parametrize("auth", [None, ("prometheus", "wrong"), ("nobody", PASSWORD), ("prometheus", "")])
def test_missing_or_wrong_credentials_get_401_with_a_basic_challenge(tls_auth_config, pki, auth):
    with serve(tls_auth_config) as server:
        status, headers, body = https_get(server, client_context(pki), auth=auth)
    assert status == 401 and headers["WWW-Authenticate"] == "Basic"
    assert b"gpu_" not in body


def test_every_path_is_behind_auth_like_exporter_toolkit(tls_auth_config, pki):
    with serve(tls_auth_config) as server:
        for path in ("/", "/-/healthy", "/-/ready", "/nope"):
            assert https_get(server, client_context(pki), path)[0] == 401, path
        assert https_get(server, client_context(pki), "/-/healthy", auth=("prometheus", PASSWORD))[0] == 200


def test_plain_http_to_the_tls_port_is_refused(tls_auth_config):
    with serve(tls_auth_config) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            status, body = response.status, response.read()
        finally:
            connection.close()
    assert status == 400 and b"HTTPS" in body and b"gpu_" not in body


def test_an_untrusted_server_certificate_fails_the_client_handshake(tls_auth_config, pki):
    stranger = ssl.create_default_context(cafile=str(pki / "rogue-ca.crt"))
    with serve(tls_auth_config) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(server, stranger)


@pytest.fixture(scope="module")
def mtls_config(pki) -> WebConfig:
    return load_web_config(write_config(pki, {
        "tls_server_config": {
            "cert_file": "server.crt", "key_file": "server.key",
            "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt",
        },
    }, "mtls.yml"))


def test_client_certificate_required_and_given(mtls_config, pki):
    with serve(mtls_config) as server:
        assert https_get(server, client_context(pki, cert="client"))[0] == 200


@pytest.mark.parametrize("cert", [None, "rogue-client"], ids=["missing", "from-another-ca"])
def test_client_certificate_required_but_missing_or_untrusted_fails(mtls_config, pki, cert):
    with serve(mtls_config) as server:
        # With TLS 1.3 the client learns of the rejection at its first read, so either step may raise.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(server, client_context(pki, cert=cert))
        assert https_get(server, client_context(pki, cert="client"))[0] == 200  # the server survived


def test_verify_client_cert_if_given_accepts_none_and_refuses_a_bad_one(pki):
    config = load_web_config(write_config(pki, {
        "tls_server_config": {
            "cert_file": "server.crt", "key_file": "server.key",
            "client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "ca.crt",
        },
    }, "optional.yml"))
    with serve(config) as server:
        assert https_get(server, client_context(pki))[0] == 200
        assert https_get(server, client_context(pki, cert="client"))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(server, client_context(pki, cert="rogue-client"))


def test_min_version_tls13_refuses_a_tls12_client(pki):
    config = load_web_config(write_config(pki, {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS13"},
    }, "tls13.yml"))
    with serve(config) as server:
        with pytest.raises(ssl.SSLError):
            https_get(server, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
        assert https_get(server, client_context(pki))[0] == 200


def test_a_silent_client_does_not_block_other_connections(tls_auth_config, pki):
    """The handshake runs in the connection's thread: a client that never speaks stalls only itself."""
    with serve(tls_auth_config) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10):
            assert https_get(server, client_context(pki), auth=("prometheus", PASSWORD))[0] == 200


# --- validation -------------------------------------------------------------------------------------


def test_no_file_or_an_empty_file_means_plain_http(tmp_path):
    assert load_web_config("") == WebConfig()
    assert load_web_config(write_config(tmp_path, "")) == WebConfig()
    assert load_web_config(write_config(tmp_path, {"tls_server_config": {}})).ssl_context is None


def test_basic_auth_without_tls(tmp_path):
    config = load_web_config(write_config(tmp_path, {"basic_auth_users": {"prometheus": fast_hash(PASSWORD)}}))
    assert config.ssl_context is None and config.auth.check("prometheus", PASSWORD)


@pytest.mark.parametrize("config, message", [
    ({"tls_config": {}}, "unknown key 'tls_config'"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "certfile": "x"}},
     "unknown key 'tls_server_config.certfile'"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "cipher_suites": ["x"]}},
     "cipher_suites is an exporter-toolkit setting gpuphase does not support"),
    ({"tls_server_config": {"cert_file": "server.crt"}}, "key_file is missing"),
    ({"tls_server_config": {"key_file": "server.key"}}, "cert_file is missing"),
    ({"tls_server_config": {"cert_file": "nope.crt", "key_file": "server.key"}}, "cannot load tls_server_config.cert_file 'nope.crt'"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "client.key"}}, "cannot load tls_server_config.cert_file"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS10"}},
     "unsupported TLS version 'TLS10'"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS13",
                            "max_version": "TLS12"}}, "max_version is lower than min_version"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "client_auth_type": "Maybe"}},
     "client_auth_type: invalid value 'Maybe'"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                            "client_auth_type": "RequireAnyClientCert", "client_ca_file": "ca.crt"}},
     "RequireAnyClientCert .* is not supported"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "client_ca_file": "ca.crt"}},
     "client_ca_file is set but client_auth_type is NoClientCert"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                            "client_auth_type": "RequireAndVerifyClientCert"}}, "needs client_ca_file"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                            "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "nope.crt"}},
     "cannot load tls_server_config.client_ca_file 'nope.crt'"),
    ({"tls_server_config": {"cert_file": 7, "key_file": "server.key"}}, "cert_file must be a string"),
    ({"basic_auth_users": {"prometheus": "plaintext"}}, "must be a bcrypt hash"),
    ({"basic_auth_users": {"a:b": "$2b$04$" + "a" * 53}}, "invalid user name 'a:b'"),
    ({"basic_auth_users": {"prometheus": "$2b$99$" + "a" * 53}}, "cost must be between 4 and 31"),
    ({"basic_auth_users": ["prometheus"]}, "basic_auth_users must be a mapping"),
    ({"http_server_config": {"headers": {"Server": "nginx"}}}, "header 'Server' cannot be configured"),
    ({"http_server_config": {"headers": {"X-Frame-Options": "DENY\r\nEvil: 1"}}}, "single-line string"),
    ({"http_server_config": {"gzip": True}}, "unknown key 'http_server_config.gzip'"),
    (["tls_server_config"], "the web config must be a mapping"),
])
def test_invalid_configs_name_the_file_and_the_reason(pki, config, message):
    path = write_config(pki, config, "invalid.yml")
    with pytest.raises(WebConfigError, match=f"^{path}: .*{message}"):
        load_web_config(path)


def test_unreadable_and_malformed_files(tmp_path):
    missing = str(tmp_path / "missing.yml")
    with pytest.raises(WebConfigError, match=f"^{missing}: cannot read web config file"):
        load_web_config(missing)
    with pytest.raises(WebConfigError, match="invalid YAML"):
        load_web_config(write_config(tmp_path, "tls_server_config: [unclosed"))


def test_relative_paths_are_relative_to_the_config_file(pki, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the config's directory
    config = load_web_config(write_config(pki, {"tls_server_config": {"cert_file": "server.crt",
                                                                      "key_file": "server.key"}}, "rel.yml"))
    assert config.ssl_context is not None


def test_http2_is_accepted_for_compatibility(tmp_path):
    assert load_web_config(write_config(tmp_path, {"http_server_config": {"http2": False}})) == WebConfig()


# --- the basic-auth checker ---------------------------------------------------------------------


@pytest.fixture
def counted_checkpw(monkeypatch) -> list:
    calls = []
    real = bcrypt.checkpw

    def spy(password, hashed):
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", spy)
    return calls


def test_successful_checks_are_cached_failures_are_not(counted_checkpw):
    auth = BasicAuth({"prometheus": fast_hash(PASSWORD).encode()})
    assert auth.check("prometheus", PASSWORD) and auth.check("prometheus", PASSWORD)
    assert len(counted_checkpw) == 1
    assert not auth.check("prometheus", "wrong") and not auth.check("prometheus", "wrong")
    assert len(counted_checkpw) == 3
    # A cached success for one password must not let another one through.
    assert not auth.check("prometheus", PASSWORD + "x")


def test_unknown_users_still_cost_a_bcrypt(counted_checkpw):
    auth = BasicAuth({"prometheus": fast_hash(PASSWORD).encode()})
    assert not auth.check("nobody", PASSWORD)
    assert not auth.check("nobody", PASSWORD)
    assert len(counted_checkpw) == 2


@pytest.mark.parametrize("header", [
    None, "", "Bearer abc", "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
    "Basic " + base64.b64encode(b"prometheus:" + b"x" * 100).decode(),  # bcrypt refuses > 72 bytes
])
def test_malformed_authorization_headers_are_rejected(header):
    auth = BasicAuth({"prometheus": fast_hash(PASSWORD).encode()})
    assert auth.check_header(header) is False


def test_a_well_formed_header_is_accepted():
    auth = BasicAuth({"prometheus": fast_hash(PASSWORD).encode()})
    assert auth.check_header("Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode())
