"""gpuphase.web.server over real loopback sockets: framing, limits, deadlines and the connection cap.

A tiny Application stands in for /metrics and OTLP/HTTP (whose own routes are tested in
test_http_server.py and test_otlp_receiver.py); the limits are shrunk so each bound is reached in
well under a second. What an attacker would do is done with raw sockets, byte by byte.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from http import HTTPStatus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuphase.web.http1 import BadRequest, RequestHead, Response, parse_head
from gpuphase.web.server import HttpServer, Limits, bind_listener
from tests.agentproc import poll


class EchoApp:
    """Answers 200 with the body's length; refuses bodies of requests to /secret before reading them."""

    max_body_bytes = 1024

    def __init__(self):
        self.bodies_read = 0
        self.release = threading.Event()
        self.release.set()
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def admit(self, head: RequestHead, client: str) -> Response | None:
        if head.path == "/secret":
            return Response(HTTPStatus.UNAUTHORIZED, b"no\n", close=True)
        return None

    def respond(self, head: RequestHead, body: bytes, client: str) -> Response:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return self._respond(head, body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _respond(self, head: RequestHead, body: bytes) -> Response:
        if head.path == "/slow":
            self.release.wait(10)
        if head.path == "/boom":
            raise RuntimeError("a bug in the handler")
        self.bodies_read += bool(body)
        return Response(HTTPStatus.OK, f"{head.method} {head.path} {len(body)}\n".encode())


SMALL = Limits(max_connections=4, workers=2, max_header_bytes=1024, request_timeout=0.5, idle_timeout=1.0,
               tls_handshake_timeout=0.5, write_timeout=1.0, backlog=64, body_budget_bytes=4096)


@pytest.fixture
def app() -> EchoApp:
    return EchoApp()


@pytest.fixture
def server(app):
    running = HttpServer("test listener", "127.0.0.1:0", app, limits=SMALL).start()
    yield running
    running.shutdown()


def connect(server: HttpServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def exchange(server: HttpServer, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes or 5 s pass."""
    with connect(server) as sock:
        sock.sendall(raw)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def rejected(server: HttpServer, reason: str) -> int:
    return server.stats().rejected.get(reason, 0)


# --- framing ---------------------------------------------------------------------------------------

def test_a_plain_request_is_answered_with_its_length_and_keep_alive(server):
    with connect(server) as sock:
        for _ in range(3):  # three requests on one connection
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
            answer = sock.recv(65536)
            assert status_of(answer) == 200 and answer.endswith(b"POST /x 3\n")
            assert b"Connection: close" not in answer


def test_pipelined_requests_are_answered_in_order(server):
    with connect(server) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.index(b"GET /a 0") < answer.index(b"GET /b 0")


@pytest.mark.parametrize("head, status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # whitespace before the colon
    (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),  # obsolete line folding
    (b"GET / HTTP/1.1\r\nX-A: 1\nX-B: 2\r\n\r\n", 400),  # a bare LF
    (b"GET / HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"NOT A REQUEST\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
])
def test_ambiguous_or_malformed_heads_are_refused_and_the_connection_closed(server, app, head, status):
    assert status_of(exchange(server, head)) == status
    assert app.bodies_read == 0
    assert sum(server.stats().rejected.values()) == 1


def test_a_chunked_request_without_a_length_gets_411(server, app):
    answer = exchange(server, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert status_of(answer) == 411 and rejected(server, "length_required") == 1


def test_a_body_over_the_application_limit_is_refused_unread(server, app):
    answer = exchange(server, b"POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    assert status_of(answer) == 413 and app.bodies_read == 0


def test_admission_runs_on_the_head_before_the_body_is_sent(server, app):
    """An unauthenticated 4 MiB upload is refused after its head: the body is never waited for."""
    with connect(server) as sock:
        sock.sendall(b"POST /secret HTTP/1.1\r\nContent-Length: 4194304\r\n\r\n")
        answer = read_all(sock)
    assert status_of(answer) == 401 and b"Connection: close" in answer


def test_expect_100_continue_is_honoured_after_admission(server):
    with connect(server) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"ok")
        assert sock.recv(65536).endswith(b"POST /x 2\n")
    assert status_of(exchange(server, b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: magic\r\n\r\nok")) == 417


def test_head_requests_get_no_body(server):
    answer = exchange(server, b"HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 200 and answer.endswith(b"\r\n\r\n") and b"Content-Length: 10" in answer  # "HEAD /x 0\n"


def test_http_1_0_closes_after_the_answer(server):
    assert status_of(exchange(server, b"GET /x HTTP/1.0\r\n\r\n")) == 200  # exchange returns on close


def test_a_handler_bug_is_a_500_logged_once_without_killing_the_listener(server, caplog):
    with caplog.at_level(logging.DEBUG, logger="gpuphase.web.server"):
        for _ in range(3):
            assert status_of(exchange(server, b"GET /boom HTTP/1.1\r\n\r\n")) == 500
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 1  # rate-limited; the rest at debug level
    assert status_of(exchange(server, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200


# --- sizes and deadlines ----------------------------------------------------------------------------

def test_a_header_bomb_is_cut_off_at_the_header_limit(server, app):
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        try:
            for _ in range(100):  # 100 x 64 KiB, far past the 1 KiB limit
                sock.sendall(b"X-Bomb: " + b"a" * 65536 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed on us: what should happen
        answer = read_all(sock)
    assert answer == b"" or status_of(answer) == 431
    assert rejected(server, "header_too_large") == 1


def test_trickling_a_head_cannot_extend_the_request_deadline(server):
    """One byte every 0.1 s never lets a per-read timeout fire; the whole-request deadline (0.5 s) does:
    the 408 arrives while the 10 s trickle still has most of its bytes to send."""
    trickle = b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100
    sent = 0
    with connect(server) as sock:
        try:
            while sent < len(trickle) and not select.select([sock], [], [], 0.1)[0]:  # until the agent answers
                sock.sendall(trickle[sent:sent + 1])
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed right after its answer
        answer = read_all(sock)
    assert status_of(answer) == 408 and rejected(server, "request_timeout") == 1
    assert sent < len(trickle)  # cut off mid-trickle, not after it


def test_a_body_sent_too_slowly_is_cut_off(server, app):
    with connect(server) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\nab")
        answer = read_all(sock)
    assert status_of(answer) == 408 and app.bodies_read == 0


def test_a_silent_connection_is_closed_after_the_request_timeout(server):
    with connect(server) as sock:
        assert read_all(sock) == b""
    assert rejected(server, "request_timeout") == 1


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(server):
    with connect(server) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert status_of(sock.recv(65536)) == 200
        assert read_all(sock) == b""  # closed quietly, within the 1 s idle timeout
    assert rejected(server, "request_timeout") == 0


def test_bodies_held_at_once_share_the_budget_until_answered(app):
    """Budget 2,048 bytes, bodies of 1,000: two are read and handed to workers; the others wait
    unread (not merely unreceived) until an answer frees their share."""
    limits = Limits(max_connections=16, workers=4, request_timeout=5.0, body_budget_bytes=2048)
    app.release.clear()
    with HttpServer("budget test", "127.0.0.1:0", app, limits=limits) as running:
        clients = [connect(running) for _ in range(4)]
        for sock in clients:
            sock.sendall(b"POST /slow HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
        poll(lambda: app.in_flight == 2, 5)
        time.sleep(0.2)
        assert app.most_in_flight == 2
        app.release.set()
        for sock in clients:
            assert sock.recv(65536).endswith(b"POST /slow 1000\n")
            sock.close()
    assert app.most_in_flight == 2


# --- the connection cap -----------------------------------------------------------------------------

def test_at_the_cap_the_longest_waiting_connection_is_closed_first(server):
    idle = [connect(server) for _ in range(SMALL.max_connections)]
    poll(lambda: server.stats().open_connections == SMALL.max_connections, 5)
    newest = exchange(server, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(newest) == 200
    assert idle[0].recv(1) == b""  # the oldest was closed to make room
    assert rejected(server, "evicted") == 1
    for sock in idle:
        sock.close()


def test_when_every_connection_is_busy_a_new_one_is_refused(server, app):
    app.release.clear()
    busy = [connect(server) for _ in range(SMALL.max_connections)]
    for sock in busy:
        sock.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
    # every connection has its request admitted (busy), not merely open
    poll(lambda: len(server._connections) == SMALL.max_connections
         and all(conn.busy for conn in server._connections), 5)
    assert exchange(server, b"GET /x HTTP/1.1\r\n\r\n") == b""
    assert rejected(server, "too_many_connections") == 1
    app.release.set()
    for sock in busy:
        assert status_of(sock.recv(65536)) == 200
        sock.close()


def test_a_tls_client_on_the_plain_port_is_counted_and_told_once(server, caplog):
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with caplog.at_level(logging.WARNING, logger="gpuphase.web.server"):
        for _ in range(2):
            with pytest.raises((ssl.SSLError, OSError)):
                with context.wrap_socket(connect(server), server_hostname="localhost"):
                    pass
    assert rejected(server, "tls_on_plain_port") == 2
    assert [r.getMessage() for r in caplog.records].count(
        "test listener: a client sent a TLS handshake to this plain-HTTP port; set the sender's endpoint to "
        "http://, or serve TLS with a web config file (further ones in the next minute logged at debug level)") == 1


def test_a_client_hanging_up_early_prints_nothing(server, capfd):
    for raw in (b"GET / HT", b"POST /x HTTP/1.1\r\nContent-Length: 50\r\n\r\nabc", b""):
        with connect(server) as sock:
            sock.sendall(raw)
    sock = connect(server)
    sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    sock.close()
    assert status_of(exchange(server, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and err == ""


# --- binding ----------------------------------------------------------------------------------------

def test_address_in_use_names_the_listener_and_the_address(server):
    with pytest.raises(OSError) as raised:
        bind_listener("OTLP/HTTP receiver", f"127.0.0.1:{server.port}", 16)
    assert str(raised.value) == f"cannot listen for OTLP/HTTP receiver on 127.0.0.1:{server.port}: Address already in use"


def test_shutdown_closes_open_connections_and_the_port(app):
    running = HttpServer("test listener", "127.0.0.1:0", app, limits=SMALL).start()
    sock = connect(running)
    running.shutdown()
    assert read_all(sock) == b""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=1)


# --- the head parser alone ----------------------------------------------------------------------------

def test_parse_head_reads_method_target_headers_and_length():
    head = parse_head(b"POST /v1/traces?x=1 HTTP/1.1\r\nContent-Type: a/b\r\nContent-Length: 12\r\n\r\n")
    assert (head.method, head.path, head.version, head.length) == ("POST", "/v1/traces", (1, 1), 12)
    assert head.headers.get("CONTENT-TYPE") == "a/b" and head.keep_alive


def test_parse_head_without_the_blank_line_is_refused():
    with pytest.raises(BadRequest):
        parse_head(b"GET / HTTP/1.1\r\n")


# --- fuzzing the head parser --------------------------------------------------------------------------

_TOKEN_CHARS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                       max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_either_parse_or_are_a_bad_request(data):
    """Never another exception: the server answers BadRequest and nothing else reaches the loop."""
    for candidate in (data, data + b"\r\n\r\n", b"GET / HTTP/1.1\r\n" + data + b"\r\n\r\n"):
        try:
            head = parse_head(candidate)
        except BadRequest as refusal:
            assert 400 <= refusal.status < 600 and refusal.reason
        else:
            assert head.length is None or head.length >= 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["GET", "POST", "HEAD"]), st.lists(st.tuples(_TOKEN_CHARS.map(lambda s: "x-" + s),
                                                                     st.text(alphabet="abc 123=;,", max_size=20)),
                                                           max_size=20), st.integers(0, 10**12))
def test_well_formed_heads_parse_to_what_was_sent(method, fields, length):
    lines = [f"{method} /p?q=1 HTTP/1.1", f"Content-Length: {length}"] + [f"{k}: {v}" for k, v in fields]
    head = parse_head(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert (head.method, head.path, head.length) == (method, "/p", length)
    assert [item for item in head.headers.items if item[0] != "content-length"] == [
        (k.lower(), v.strip(" ")) for k, v in fields]
