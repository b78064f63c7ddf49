"""The one HTTP/1.1 server under every listener of the agent (/metrics and OTLP/HTTP).

Why an event loop and not a thread per connection: a connection that is only waiting (keep-alive
between scrapes, or a sender trickling its headers a byte at a time) then costs a few KiB of
buffers instead of a thread, so neither a systemd TasksMax nor the memory limit can be reached by
opening connections. Work is done on a small fixed pool of threads; the loop thread only reads
and writes bytes, so a slow application call never stalls other connections.

Every request is bounded before the application sees it:
  - open connections are capped; at the cap the connection that has waited longest for a request
    head is closed first (it holds no admitted work), and only when every connection is busy is
    the new one refused;
  - the head must arrive whole within `request_timeout` of its first byte (a deadline for the
    request, not per read, so trickling cannot extend it) and fit in `max_header_bytes`;
  - the application's `admit` runs on the head alone (authentication, media type, length) before
    one byte of body is read; then the body must arrive within the same deadline, and bodies held
    at once (being received, or waiting for and in a worker) share `body_budget_bytes`;
  - TLS handshakes have their own timeout; plain HTTP sent to a TLS port is answered with a 400.
Refusals and evictions are counted per reason (ListenerStats) and logged at debug level: a
client hanging up early is routine and never prints a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Protocol

from gpuphase.model.addresses import split_address
from gpuphase.model.view import ListenerStats
from gpuphase.web.http1 import CONTINUE, BadRequest, RequestHead, Response, parse_head, response_head

log = logging.getLogger(__name__)

# Counted reasons (gpu_http_rejected_total{listener, reason}).
BAD_REQUEST = "bad_request"
HEADER_TOO_LARGE = "header_too_large"
REQUEST_TIMEOUT = "request_timeout"
EVICTED = "evicted"
TOO_MANY_CONNECTIONS = "too_many_connections"
TLS_HANDSHAKE = "tls_handshake"
TLS_ON_PLAIN_PORT = "tls_on_plain_port"
LENGTH_REQUIRED = "length_required"
TOO_LARGE = "too_large"
BUSY = "busy"
INTERNAL_ERROR = "internal_error"

_TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_HTTP_ON_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                      b"Client sent an HTTP request to an HTTPS server.\n")


@dataclass(frozen=True)
class Limits:
    """What one listener allows. The defaults hold far more than Prometheus (one connection per
    scrape target) or an OTLP exporter (one or two) ever open, and keep the worst case small:
    max_connections x 2 x max_header_bytes of head buffers (16 MiB) plus body_budget_bytes."""

    max_connections: int = 256
    workers: int = 4
    max_header_bytes: int = 32 * 1024
    request_timeout: float = 15.0  # first byte of a request to its last byte of body
    idle_timeout: float = 60.0  # keep-alive: waiting for the next request (longer than any scrape interval's gap)
    tls_handshake_timeout: float = 10.0
    write_timeout: float = 30.0
    backlog: int = 1024
    body_budget_bytes: int = 16 * 1024 * 1024  # bodies held at once; one larger body alone is let in


class Application(Protocol):
    """What a listener serves. Both methods run on the server's worker threads."""

    max_body_bytes: int

    def admit(self, head: RequestHead, client: str) -> Response | None:
        """Called on the head alone, before any body is read: a Response refuses the request
        (the connection is closed after it, since the body was left unread); None lets it in."""

    def respond(self, head: RequestHead, body: bytes, client: str) -> Response:
        """The answer to an admitted request."""


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    waiting_since: float  # loop time since which it has been waiting for a request head
    busy: bool = False  # an admitted request is being served: never evicted
    task: asyncio.Task | None = None


class HttpServer:
    """Binds in the constructor (so 'address in use' is a start-up error naming the listener),
    serves from start() on a thread of its own, stops with shutdown()."""

    def __init__(self, name: str, listen_address: str, app: Application, *,
                 ssl_context: ssl.SSLContext | None = None, limits: Limits = Limits(),
                 server_header: str = "gpuphase"):
        self.name = name
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        self._server_header = server_header
        self._sock = bind_listener(name, listen_address, limits.backlog)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix=f"{name}-worker")
        self._connections: set[_Connection] = set()
        self._budget = _BodyBudget(limits.body_budget_bytes)
        self._rejected: Counter = Counter()
        self._counts_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accept_task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "HttpServer":
        self._thread = threading.Thread(target=self._run_loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._accept_task = self._loop.create_task(self._accept_forever())
        self._loop.run_forever()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, end the loop thread and the workers."""
        if self._thread is not None:
            future = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - stopping must go on whatever a connection did
                log.debug("%s: closing connections failed", self.name, exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._thread = None
        self._sock.close()
        if not self._loop.is_running():
            self._loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _close_all(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        tasks = [conn.task for conn in self._connections if conn.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def stats(self) -> ListenerStats:
        with self._counts_lock:
            return ListenerStats(open_connections=len(self._connections), rejected=dict(self._rejected))

    def _count(self, reason: str) -> None:
        with self._counts_lock:
            self._rejected[reason] += 1

    # --- connections -------------------------------------------------------------------------

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        while True:
            try:
                sock, address = await loop.sock_accept(self._sock)
            except OSError as error:  # EMFILE and friends: wait a moment instead of spinning
                _throttled_warning(f"{self.name}: accept failed: {error.strerror or type(error).__name__}")
                await asyncio.sleep(0.1)
                continue
            if not self._make_room():
                self._count(TOO_MANY_CONNECTIONS)
                sock.close()
                continue
            conn = _Connection(sock=sock, waiting_since=loop.time())
            self._connections.add(conn)
            conn.task = loop.create_task(self._serve(conn, _client(address)))
            # sock_accept returns without yielding while the backlog holds connections: let the new
            # ones read their heads, or a burst of max_connections would age a scrape accepted
            # mid-burst into "longest waiting" before it had a chance to send a byte.
            await asyncio.sleep(0)

    def _make_room(self) -> bool:
        """At the cap, close the connection that has waited longest for a request head."""
        if len(self._connections) < self.limits.max_connections:
            return True
        waiting = [conn for conn in self._connections if not conn.busy and conn.task is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda conn: conn.waiting_since)
        self._count(EVICTED)
        self._connections.discard(oldest)
        oldest.task.cancel()
        return True

    async def _serve(self, conn: _Connection, client: str) -> None:
        transport = None
        try:
            streams = await self._open_streams(conn, client)
            if streams is None:
                return
            reader, writer = streams
            transport = writer.transport
            await self._serve_requests(conn, reader, writer, client)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as error:
            log.debug("%s: connection from %s ended: %s", self.name, client, error or type(error).__name__)
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the loop
            # The message is the throttle's key: no client address in it, or every new address
            # would be a new key (and a new entry kept for good).
            log.debug("%s: serving %s failed", self.name, client)
            _throttled_warning(f"{self.name}: serving a connection failed", exc_info=True)
        finally:
            self._connections.discard(conn)
            if transport is not None:
                transport.abort()
            conn.sock.close()

    async def _open_streams(self, conn: _Connection, client: str):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.max_header_bytes, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        if self.ssl_context is not None and not await self._tls_client_hello(conn, client):
            return None
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn.sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout if self.ssl_context else None)
        except (OSError, ssl.SSLError) as error:
            self._count(TLS_HANDSHAKE)
            log.debug("%s: TLS handshake with %s failed: %s", self.name, client, error)
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _tls_client_hello(self, conn: _Connection, client: str) -> bool:
        """Wait for the first byte; a plain HTTP request on a TLS port gets a clear 400."""
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = conn.sock.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await asyncio.wait_for(readable, self.limits.tls_handshake_timeout)
        except TimeoutError:
            self._count(TLS_HANDSHAKE)
            return False
        finally:
            loop.remove_reader(fd)
        first = conn.sock.recv(1, socket.MSG_PEEK)
        if first and first[0] != _TLS_HANDSHAKE_RECORD:
            self._count(TLS_HANDSHAKE)
            try:
                conn.sock.recv(self.limits.max_header_bytes)  # read, or closing would reset the answer
                conn.sock.send(_PLAIN_HTTP_ON_TLS)  # small enough for any socket buffer
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return False
        return bool(first)

    # --- requests ----------------------------------------------------------------------------

    async def _serve_requests(self, conn: _Connection, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter, client: str) -> None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        first_request = True
        while True:
            conn.busy, conn.waiting_since = False, loop.time()
            try:
                async with asyncio.timeout(limits.request_timeout if first_request else limits.idle_timeout):
                    first_byte = await reader.read(1)
            except TimeoutError:
                if first_request:
                    self._count(REQUEST_TIMEOUT)  # connected and said nothing
                return
            if not first_byte:
                return
            if first_byte[0] == _TLS_HANDSHAKE_RECORD and self.ssl_context is None:
                # An exporter configured for https:// (or gRPC's default TLS) sends to a plain port;
                # it would only ever see a dropped connection, so say what is wrong here.
                self._count(TLS_ON_PLAIN_PORT)
                _throttled_warning(f"{self.name}: a client sent a TLS handshake to this plain-HTTP port; set the "
                                   "sender's endpoint to http://, or serve TLS with a web config file")
                return
            deadline = loop.time() + limits.request_timeout
            try:
                head = await self._read_head(reader, first_byte, deadline)
            except BadRequest as refusal:
                self._count(refusal.reason)
                await self._send(writer, None, _plain(refusal.status, refusal.message), close=True)
                return
            if head is None:
                return
            conn.busy = True
            response, close = await self._answer(head, reader, writer, client, deadline)
            close = close or response.close or not head.keep_alive
            await self._send(writer, head, response, close)
            if close:
                return
            first_request = False

    async def _read_head(self, reader: asyncio.StreamReader, first_byte: bytes, deadline: float) -> RequestHead | None:
        try:
            async with asyncio.timeout_at(deadline):
                rest = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise BadRequest(HTTPStatus.REQUEST_TIMEOUT, REQUEST_TIMEOUT, "request head not received in time") from None
        except (asyncio.LimitOverrunError, ValueError):
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, HEADER_TOO_LARGE,
                             f"request head larger than {self.limits.max_header_bytes} bytes") from None
        except asyncio.IncompleteReadError:
            return None  # the client hung up mid-head
        return parse_head(first_byte + rest)

    async def _answer(self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      client: str, deadline: float) -> tuple[Response, bool]:
        """(response, close the connection after it?)."""
        expect = head.headers.get("expect")
        if expect is not None and not head.expects_continue:
            return _plain(HTTPStatus.EXPECTATION_FAILED, "unsupported Expect"), True
        if not head.length and not head.chunked:
            return await self._call(lambda: self.app.admit(head, client) or self.app.respond(head, b"", client)), False
        refusal = await self._call(self.app.admit, head, client)
        if refusal is None and head.length is None:
            self._count(LENGTH_REQUIRED)
            refusal = _plain(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if refusal is None and head.length > self.app.max_body_bytes:
            self._count(TOO_LARGE)
            refusal = _plain(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        if refusal is not None:
            return refusal, True  # the body is unread: the connection cannot carry another request
        # The body counts against the budget from before it is read until its answer is ready,
        # so bodies waiting for a worker are bounded too, not only those being received.
        try:
            async with asyncio.timeout_at(deadline):
                await self._budget.acquire(head.length)
        except TimeoutError:
            self._count(REQUEST_TIMEOUT)
            return _plain(HTTPStatus.REQUEST_TIMEOUT, "request body not received in time"), True
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    if head.expects_continue:
                        writer.write(CONTINUE)
                    body = await reader.readexactly(head.length)
            except TimeoutError:
                self._count(REQUEST_TIMEOUT)
                return _plain(HTTPStatus.REQUEST_TIMEOUT, "request body not received in time"), True
            return await self._call(self.app.respond, head, body, client), False
        finally:
            self._budget.release(head.length)

    async def _call(self, fn: Callable, *args) -> Response:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except Exception:  # noqa: BLE001 - an application bug is a 500, not a dead listener
            self._count(INTERNAL_ERROR)
            _throttled_warning(f"{self.name}: request handler failed", exc_info=True)
            return _plain(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error", close=True)

    async def _send(self, writer: asyncio.StreamWriter, head: RequestHead | None, response: Response,
                    close: bool) -> None:
        data = response_head(response, self._server_header, close)
        if head is None or head.method != "HEAD":
            data += response.body
        writer.write(data)
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()

    def _loop_exception(self, loop, context: dict) -> None:
        log.debug("%s: %s", self.name, context.get("message"), exc_info=context.get("exception"))


class _BodyBudget:
    """Bytes of request bodies held at once (being received, or waiting for and in a worker). A
    body larger than the whole budget is let in alone, so the largest allowed request is never
    refused for good. Used on the loop thread only; release() is synchronous so that a cancelled
    connection always gives its share back."""

    def __init__(self, limit: int):
        self._limit = limit
        self._used = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, n: int) -> None:
        while self._used and self._used + n > self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._used += n

    def release(self, n: int) -> None:
        self._used -= n
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _plain(status: HTTPStatus, message: str, close: bool = True) -> Response:
    return Response(status, (message + "\n").encode(), close=close)


def _client(address) -> str:
    return str(address[0]) if isinstance(address, tuple) else str(address)


_last_warning: dict[str, float] = {}
_WARNING_INTERVAL_SECONDS = 60.0


def _throttled_warning(message: str, exc_info: bool = False) -> None:
    """At most one warning per message a minute: a broken client repeating itself cannot fill the log."""
    now = time.monotonic()
    if now - _last_warning.get(message, -_WARNING_INTERVAL_SECONDS) >= _WARNING_INTERVAL_SECONDS:
        _last_warning[message] = now
        log.warning("%s (further ones in the next minute logged at debug level)", message, exc_info=exc_info)
    else:
        log.debug(message, exc_info=exc_info)


def bind_listener(name: str, listen_address: str, backlog: int) -> socket.socket:
    """A listening TCP socket for "host:port" (":port" = all interfaces, dual-stack where the host
    allows). Errors name the listener and the address: several listeners share one process."""
    host, port = split_address(listen_address)
    try:
        family, bind_host, dual_stack = _address_family(host, port)
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise OSError(f"cannot listen for {name} on {listen_address}: {error.strerror or error}") from None
    try:
        # SO_REUSEADDR lets a restarted agent bind while old connections sit in TIME_WAIT; it does
        # not let two live processes share the port (that would be SO_REUSEPORT, never set).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind_host, port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen for {name} on {listen_address}: {error.strerror or error}") from None
    return sock


def _address_family(host: str, port: int) -> tuple[socket.AddressFamily, str, bool]:
    """(family, host to bind, dual-stack?) for a host from split_address ('' = all interfaces)."""
    if host == "":
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, "::", True
        return socket.AF_INET, "0.0.0.0", False
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0], False
