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


@pytest.fixture(scope="module", autouse=True)
def generous_bcrypt_budget():
    """The process-wide budget of uncached bcrypt checks (a few a second) is for attackers, not
    for a test module that makes dozens of checkers in a second; tests of it pass their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(webconfig, "_SHARED_BUDGET", webconfig.BcryptBudget(rate=1e6, burst=10**6))
        yield


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


def test_every_path_but_the_probes_is_behind_auth(tls_auth_config, pki):
    """Like exporter-toolkit, except /-/healthy and /-/ready: a kubelet probe cannot send a
    Secret's credentials, and a probe's answer tells nothing but alive / ready."""
    with serve(tls_auth_config) as server:
        for path in ("/", "/metrics", "/nope", "/-/healthy/../metrics", "/-/healthyx"):
            assert https_get(server, client_context(pki), path)[0] == 401, path
        for path in ("/-/healthy", "/-/ready", "/-/ready?x=1"):
            assert https_get(server, client_context(pki), path)[0] == 200, path
        assert https_get(server, client_context(pki), "/metrics", auth=("prometheus", PASSWORD))[0] == 200


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
    ({"basic_auth_users": {"prometheus": "$2b$99$" + "a" * 53}}, "cost must be between 4 and 16"),
    ({"basic_auth_users": {"prometheus": "$2b$17$" + "a" * 53}}, "cost must be between 4 and 16"),
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


def test_results_are_cached_per_credential(counted_checkpw):
    auth = BasicAuth({"prometheus": fast_hash(PASSWORD).encode()})
    assert auth.check("prometheus", PASSWORD) and auth.check("prometheus", PASSWORD)
    assert len(counted_checkpw) == 1
    assert not auth.check("prometheus", "wrong") and not auth.check("prometheus", "wrong")
    assert len(counted_checkpw) == 2
    # A cached success for one password must not let another one through.
    assert not auth.check("prometheus", PASSWORD + "x")
    assert len(counted_checkpw) == 3


def test_unknown_users_cost_a_bcrypt_like_known_ones(counted_checkpw):
    auth = BasicAuth({"prometheus": fast_hash(PASSWORD).encode()})
    assert not auth.check("nobody", PASSWORD)
    assert not auth.check("nobody", PASSWORD)
    assert len(counted_checkpw) == 1  # then remembered, as a wrong password of a known user is


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


# --- the cache and the budget: a flood of wrong passwords cannot starve the scrapes -------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def checker(clock: FakeClock, rate: float = 4.0, burst: int = 8) -> BasicAuth:
    budget = webconfig.BcryptBudget(rate=rate, burst=burst, clock=clock)
    return BasicAuth({"prometheus": fast_hash(PASSWORD).encode()}, clock=clock, budget=budget)


def test_a_correct_credential_costs_one_bcrypt_per_ttl(counted_checkpw):
    clock = FakeClock()
    auth = checker(clock)
    for _ in range(50):
        assert auth.check_header(basic("prometheus", PASSWORD))
    assert len(counted_checkpw) == 1
    clock.now += auth.CACHE_TTL - 1
    assert auth.check_header(basic("prometheus", PASSWORD)) and len(counted_checkpw) == 1
    clock.now += 2  # expired: checked again, once
    assert auth.check_header(basic("prometheus", PASSWORD)) and auth.check_header(basic("prometheus", PASSWORD))
    assert len(counted_checkpw) == 2


def test_a_wrong_password_repeated_costs_one_bcrypt_per_ttl(counted_checkpw):
    clock = FakeClock()
    auth = checker(clock)
    for _ in range(100):
        assert not auth.check_header(basic("prometheus", "guess"))
    assert len(counted_checkpw) == 1
    clock.now += auth.CACHE_TTL + 1
    assert not auth.check_header(basic("prometheus", "guess"))
    assert len(counted_checkpw) == 2


def test_a_flood_of_new_credentials_is_refused_unhashed_beyond_the_budget(counted_checkpw):
    clock = FakeClock()
    auth = checker(clock, rate=4, burst=8)
    assert not any(auth.check_header(basic("prometheus", f"guess-{i}")) for i in range(1000))
    assert len(counted_checkpw) == 8  # the burst; the other 992 were answered without a bcrypt
    clock.now += 1.0
    assert not any(auth.check_header(basic("nobody", f"guess-{i}")) for i in range(1000))
    assert len(counted_checkpw) == 12  # 4 a second
    # Refused over budget is not remembered as wrong: the right password, new, gets in once
    # the budget refills.
    assert not auth.check_header(basic("prometheus", PASSWORD))
    clock.now += 0.25
    assert auth.check_header(basic("prometheus", PASSWORD))


def test_a_credential_verified_before_is_rechecked_despite_a_flood(counted_checkpw):
    clock = FakeClock()
    auth = checker(clock, rate=4, burst=8)
    assert auth.check_header(basic("prometheus", PASSWORD))
    clock.now += auth.CACHE_TTL + 1
    for i in range(100):  # the budget is spent on guesses
        auth.check_header(basic("prometheus", f"guess-{i}"))
    assert auth.check_header(basic("prometheus", PASSWORD))  # outside the budget
    assert len(counted_checkpw) == 1 + 8 + 1


def test_the_cache_is_bounded_and_holds_no_password(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(BasicAuth, "MAX_CACHED", 16)
    auth = checker(clock, rate=1e6, burst=10**6)
    for i in range(100):
        auth.check("prometheus", f"guess-{i}")
    assert auth.check("prometheus", PASSWORD)
    assert len(auth._wrong) <= 16 and len(auth._correct) == 1
    keys = list(auth._wrong) + list(auth._correct)
    assert all(len(key) == 32 and PASSWORD.encode() not in key and b"guess" not in key for key in keys)
    other = checker(clock)  # another key: the same credential does not give the same entry
    other.check("prometheus", PASSWORD)
    assert set(other._correct).isdisjoint(auth._correct)


def slow_checkpw(monkeypatch, seconds: float = 0.2) -> list:
    import time

    real, calls = bcrypt.checkpw, []

    def slow(password, hashed):
        calls.append(password)
        time.sleep(seconds)
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", slow)
    return calls


def at_once(count: int, function) -> list:
    import threading

    results: list = []
    threads = [threading.Thread(target=lambda: results.append(function())) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_a_new_credential_is_checked_once_and_nothing_waits_for_it(monkeypatch):
    calls = slow_checkpw(monkeypatch, 1.0)
    auth = checker(FakeClock())
    results = at_once(16, lambda: auth.check_header(basic("prometheus", PASSWORD)))
    # One request ran the bcrypt; the others, while it ran, were refused rather than hold their
    # threads (a request arriving after it would find the result).
    assert len(calls) == 1 and True in results and results.count(False) >= 1, results
    assert auth.check_header(basic("prometheus", PASSWORD)) and len(calls) == 1


def test_while_one_bcrypt_runs_other_new_credentials_are_refused_unhashed(counted_checkpw):
    clock = FakeClock()
    auth = checker(clock)
    assert auth.check_header(basic("prometheus", PASSWORD))
    auth._budget.slot.acquire()  # as if a bcrypt were running
    try:
        assert not auth.check_header(basic("prometheus", "guess"))
        assert auth.check_header(basic("prometheus", PASSWORD))  # cached: no slot needed
    finally:
        auth._budget.slot.release()
    assert len(counted_checkpw) == 1
    assert not auth.check_header(basic("prometheus", "guess")) and len(counted_checkpw) == 2  # tried again


def test_an_expired_credential_is_let_in_while_it_is_checked_again(monkeypatch):
    clock = FakeClock()
    auth = checker(clock, rate=0.001, burst=1)
    calls = slow_checkpw(monkeypatch)
    assert auth.check_header(basic("prometheus", PASSWORD)) and len(calls) == 1  # the only token
    clock.now += auth.CACHE_TTL + 1
    results = at_once(16, lambda: auth.check_header(basic("prometheus", PASSWORD)))
    assert results == [True] * 16 and len(calls) == 2


def test_an_expired_credential_waits_for_the_running_bcrypt(counted_checkpw):
    import threading

    clock = FakeClock()
    auth = checker(clock)
    assert auth.check_header(basic("prometheus", PASSWORD))
    clock.now += auth.CACHE_TTL + 1
    auth._budget.slot.acquire()
    threading.Timer(0.2, auth._budget.slot.release).start()
    assert auth.check_header(basic("prometheus", PASSWORD)) and len(counted_checkpw) == 2


def test_checks_from_many_threads_stay_within_the_budget(counted_checkpw):
    import threading

    clock = FakeClock()
    auth = checker(clock, rate=4, burst=8)
    assert auth.check_header(basic("prometheus", PASSWORD))
    errors: list[BaseException] = []
    scrapes: list[bool] = []

    def flood(worker: int) -> None:
        try:
            for i in range(200):
                assert not auth.check_header(basic("prometheus", f"guess-{worker}-{i}"))
                if i % 20 == 0:
                    scrapes.append(auth.check_header(basic("prometheus", PASSWORD)))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=flood, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert all(scrapes) and len(scrapes) == 80  # every scrape got in, from the cache
    assert len(counted_checkpw) == 1 + 7  # the correct one took a token of the burst


# --- hostile web config files: one line naming the file (and line), no hang, no traceback ------


def assert_refused(path, pattern: str) -> str:
    with pytest.raises(WebConfigError) as err:
        load_web_config(str(path))
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) <= 600, message
    import re

    assert re.search(pattern, message), message
    return message


def test_a_fifo_device_or_directory_is_refused_without_reading_it(tmp_path):
    import os

    fifo = tmp_path / "web.yml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    assert_refused(fifo, r": cannot read web config file: not a regular file \(a FIFO\)$")
    assert_refused("/dev/zero", r"not a regular file \(a character device\)")
    assert_refused(tmp_path, r"not a regular file \(a directory\)")


def test_a_file_over_the_size_cap_is_refused(tmp_path):
    from gpuphase.model.files import MAX_CONFIG_BYTES

    path = tmp_path / "big.yml"
    path.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert_refused(path, r"larger than 1 MiB")


@pytest.mark.parametrize("text, pattern", [
    ("basic_auth_users:\n  prometheus: \xff\n", r":2: .*not UTF-8"),
    ("basic_auth_users:\n  prometheus: a\x01b\n", r":2: invalid YAML: character 0x1 is not allowed"),
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", r":1: invalid YAML: nested too deeply"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: " + "1" * 100_000 + "\n", r":3: value longer than"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: " + ":".join(["1"] + ["0"] * 3000) + "\n",
     r":3: value longer than"),  # sexagesimal int: minutes of bignum work if constructed
    ("http_server_config:\n  headers:\n    X-Frame-Options: 2001-13-45\n", r":3: invalid value: month"),
    ("basic_auth_users: !!python/object/apply:os.system [id]\n", r":1: could not determine a constructor"),
    ("tls_server_config: {}\n---\nx: 1\n", r":2: invalid YAML: but found another document"),
])
def test_hostile_yaml_is_one_line_with_the_line(tmp_path, text, pattern):
    path = tmp_path / "web.yml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text else text.encode("latin-1"))
    assert_refused(path, pattern)


def test_an_alias_bomb_is_not_expanded(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "web.yml"
    path.write_text("\n".join(lines) + "\n")
    assert_refused(path, r"unknown key 'a0'")


def test_a_pem_file_that_is_a_fifo_is_refused_before_ssl_opens_it(pki, tmp_path):
    import os
    import shutil

    shutil.copy(pki / "server.key", tmp_path / "server.key")
    os.mkfifo(tmp_path / "server.crt")
    path = write_config(tmp_path, {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}})
    assert_refused(path, r"cannot load tls_server_config.cert_file 'server.crt': not a regular file \(a FIFO\)")

