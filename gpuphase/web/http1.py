"""HTTP/1.1 message framing, strict: the request head parsed, the response head written.

Strict where leniency lets one request be read two ways (request smuggling) or lets a sender
make the agent hold more than it should: a duplicate or comma-joined Content-Length, a
Content-Length next to a Transfer-Encoding, whitespace before a header's colon, obsolete line
folding, a bare LF and a second copy of a header that must appear once are all refused with 400
(RFC 9112 sections 2.2, 5.1, 6.1 and 6.3). Bodies are Content-Length framed only; a chunked
request is passed on with `length=None` so the application can answer 411, which every OTLP
exporter and Prometheus itself never trigger (they always send a length).
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field
from http import HTTPStatus

# Headers that carry one value: two copies of any of them make the request ambiguous.
SINGLETON_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "content-type", "content-encoding", "authorization", "host", "expect")
)
MAX_HEADER_COUNT = 100  # what the standard library's http.client allows too
_MAX_CONTENT_LENGTH_DIGITS = 18  # fits in an int64, as in Go's net/http
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/(\d)\.(\d)\Z")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class BadRequest(Exception):
    """A request the server answers itself and then closes: status, counted reason, message."""

    def __init__(self, status: HTTPStatus, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Headers:
    """Request headers in arrival order; names lowercased."""

    items: tuple[tuple[str, str], ...] = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.items:
            if key == name:
                return value
        return default

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    length: int | None  # the body's length; None when chunked or unstated
    chunked: bool = False

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        connection = (self.headers.get("connection") or "").lower()
        if self.version >= (1, 1):
            return "close" not in connection
        return "keep-alive" in connection

    @property
    def expects_continue(self) -> bool:
        return (self.headers.get("expect") or "").lower() == "100-continue"


@dataclass
class Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # close the connection after this answer (e.g. a request body left unread)


def parse_head(data: bytes) -> RequestHead:
    """Parse a request head (the bytes up to and including the blank line)."""
    if not data.endswith(b"\r\n\r\n"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "request head must end with CRLF CRLF")
    lines = data[:-4].split(b"\r\n")
    match = _REQUEST_LINE.match(lines[0])
    if match is None:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "malformed request line")
    method, target, major, minor = match.groups()
    version = (int(major), int(minor))
    if version not in ((1, 0), (1, 1)):
        raise BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "unsupported_version", "only HTTP/1.0 and 1.1")
    if _CONTROL.search(target):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "control character in the request target")
    headers = _parse_header_lines(lines[1:])
    length, chunked = _body_length(headers)
    return RequestHead(method.decode("ascii"), target.decode("latin-1"), version, headers, length, chunked)


def _parse_header_lines(lines: list[bytes]) -> Headers:
    if len(lines) > MAX_HEADER_COUNT:
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header_too_large",
                         f"more than {MAX_HEADER_COUNT} header fields")
    items = []
    seen = set()
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "obsolete header line folding")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "malformed header field")
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "control character in a header value")
        key = name.decode("ascii").lower()
        if key in SINGLETON_HEADERS:
            if key in seen:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", f"duplicate {key} header")
            seen.add(key)
        items.append((key, value.decode("latin-1")))
    return Headers(tuple(items))


def _body_length(headers: Headers) -> tuple[int | None, bool]:
    length_header = headers.get("content-length")
    chunked = "transfer-encoding" in headers
    if chunked and length_header is not None:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "both Content-Length and Transfer-Encoding")
    if chunked:
        return None, True
    if length_header is None:
        return None, False
    if not (length_header.isascii() and length_header.isdigit()) or len(length_header) > _MAX_CONTENT_LENGTH_DIGITS:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad_request", "invalid Content-Length")
    return int(length_header), False


def response_head(response: Response, server: str, close: bool) -> bytes:
    """Status line and headers of an answer; every answer states its length (keep-alive framing)."""
    status = response.status
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Server: {server}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    lines += [f"{name}: {value}" for name, value in response.headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
