"""The Prometheus exporter-toolkit web config file: TLS, basic auth and response headers.

Same file format as node_exporter's --web.config.file, so an operator's existing file works:

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS13
    basic_auth_users:
      prometheus: $2b$12$...           # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':')
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000

Like exporter-toolkit, unknown keys are errors (a typo must not silently turn security off).
Two toolkit client_auth_type values cannot be honoured with Python's ssl module, which always
verifies a client certificate it asks for: RequestClientCert and RequireAnyClientCert are
refused with a message naming the verified equivalents. The results (an SSLContext and a
BasicAuth checker) are independent of any server so the OTLP HTTP receiver can reuse them; the
OTLP/gRPC receiver, which cannot use an SSLContext, gets its credentials from the same validated
settings through `grpc_server_credentials`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import bcrypt

from gpuphase.model.files import (
    ConfigFileError,
    check_regular_file,
    compose_yaml,
    construct_yaml,
    read_config_bytes,
    read_config_text,
)

if TYPE_CHECKING:
    import grpc


class WebConfigError(ValueError):
    """The web config file is unusable; the message names the file and the reason, on one line of
    bounded length (a value quoted in it may be anything the file held)."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        super().__init__(text if len(text) <= 600 else text[:596] + " ...")


_TOP_LEVEL_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# Valid for exporter-toolkit but not implemented here: say so instead of calling them unknown.
_TLS_KEYS_UNSUPPORTED = {
    "cert", "key", "client_ca", "cipher_suites", "curve_preferences",
    "prefer_server_cipher_suites", "client_allowed_sans",
}
_HTTP_KEYS = {"headers", "http2"}
# exporter-toolkit lets only these response headers be configured; the same rule here.
_ALLOWED_HEADERS = (
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
)
_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_CLIENT_AUTH_UNVERIFIED = ("RequestClientCert", "RequireAnyClientCert")
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
# Each step doubles a check's cost: 12 takes ~0.25 s, 16 ~4 s, 31 about a day (start-up computes
# one hash of the highest cost, for unknown users). Above 16 a check outlasts a scrape timeout.
_MAX_BCRYPT_COST = 16


@dataclass(frozen=True)
class TlsFiles:
    """The validated TLS settings behind `WebConfig.ssl_context`, with absolute PEM file paths,
    for servers that are not built on Python's ssl module (the OTLP/gRPC receiver)."""

    cert_file: str
    key_file: str
    client_ca_file: str  # "" when client certificates are not verified
    client_auth_type: str  # one of _CLIENT_AUTH
    min_version: str  # TLS12 or TLS13


@dataclass(frozen=True)
class WebConfig:
    """What a server applies: TLS (None = plain HTTP), basic auth (None = open), extra headers."""

    ssl_context: ssl.SSLContext | None = None
    auth: "BasicAuth | None" = None
    headers: tuple[tuple[str, str], ...] = ()
    tls_files: TlsFiles | None = None  # set exactly when ssl_context is


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web config file; '' means no file (plain HTTP, no auth)."""
    if not path:
        return WebConfig()
    try:  # a regular file of at most 1 MiB, like --config (gpuphase.model.files)
        text = read_config_text(path)
    except ConfigFileError as err:
        raise WebConfigError(f"{err.where(path)}: cannot read web config file: {err.reason}") from None
    try:
        loader, root = compose_yaml(text)
    except ConfigFileError as err:
        raise WebConfigError(f"{err.where(path)}: {err.reason}") from None
    try:
        raw = construct_yaml(loader, root) if root is not None else None
    except ConfigFileError as err:
        raise WebConfigError(f"{err.where(path)}: {err.reason}") from None
    finally:
        loader.dispose()
    return parse_web_config(raw, path)


def parse_web_config(raw: Any, path: str) -> WebConfig:
    """Validate an already-parsed web config; `path` is used for messages and relative file names."""
    if raw is None:
        return WebConfig()
    root = _mapping(raw, path, "the web config")
    _check_keys(root, _TOP_LEVEL_KEYS, set(), path, "")
    base_dir = os.path.dirname(os.path.abspath(path))
    tls = _mapping(root.get("tls_server_config"), path, "tls_server_config")
    users = _mapping(root.get("basic_auth_users"), path, "basic_auth_users")
    http = _mapping(root.get("http_server_config"), path, "http_server_config")
    ssl_context, tls_files = _tls(tls, base_dir, path)
    return WebConfig(
        ssl_context=ssl_context,
        auth=_basic_auth(users, path),
        headers=_headers(http, path),
        tls_files=tls_files,
    )


def _fail(path: str, reason: str) -> WebConfigError:
    return WebConfigError(f"{path}: {reason}")


def _mapping(value: Any, path: str, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(section: Mapping[str, Any], known: set[str], unsupported: set[str], path: str, where: str) -> None:
    for key in section:
        name = f"{where}{key}"
        if key in unsupported:
            raise _fail(path, f"{name} is an exporter-toolkit setting gpuphase does not support")
        if key not in known:
            raise _fail(path, f"unknown key {name!r} (known: {', '.join(sorted(known))})")


def _string(section: Mapping[str, Any], key: str, path: str, where: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(path, f"{where}{key} must be a string, got {type(value).__name__}")
    return value


# --- TLS ------------------------------------------------------------------------------------------


def _tls(tls: Mapping[str, Any], base_dir: str, path: str) -> tuple[ssl.SSLContext | None, TlsFiles | None]:
    where = "tls_server_config."
    _check_keys(tls, _TLS_KEYS, _TLS_KEYS_UNSUPPORTED, path, where)
    values = {key: _string(tls, key, path, where) for key in _TLS_KEYS}
    if not any(values.values()):
        return None, None  # an empty tls_server_config means plain HTTP, as in exporter-toolkit
    if not values["cert_file"]:
        raise _fail(path, f"{where}cert_file is missing")
    if not values["key_file"]:
        raise _fail(path, f"{where}key_file is missing")

    def resolve(key: str) -> str:
        """The path of the file named by `key`, relative to the config file; only a regular file:
        ssl would open a FIFO and wait for a writer, or read /dev/zero until memory runs out."""
        full = os.path.join(base_dir, values[key])
        try:
            check_regular_file(full)
        except ConfigFileError as err:
            raise _fail(path, f"cannot load {where}{key} {values[key]!r}: {err.reason}") from None
        return full

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _tls_version(values["min_version"] or "TLS12", path, where + "min_version")
    if values["max_version"]:
        context.maximum_version = _tls_version(values["max_version"], path, where + "max_version")
    if context.maximum_version != ssl.TLSVersion.MAXIMUM_SUPPORTED and context.maximum_version < context.minimum_version:
        raise _fail(path, f"{where}max_version is lower than min_version")
    cert_file, key_file = resolve("cert_file"), resolve("key_file")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as err:
        raise _fail(path, f"cannot load {where}cert_file {values['cert_file']!r} / key_file "
                          f"{values['key_file']!r}: {_describe(err)}") from None
    _client_auth(context, values["client_auth_type"], values["client_ca_file"], resolve, path, where)
    files = TlsFiles(
        cert_file=cert_file,
        key_file=key_file,
        client_ca_file=os.path.join(base_dir, values["client_ca_file"]) if values["client_ca_file"] else "",
        client_auth_type=values["client_auth_type"] or "NoClientCert",
        min_version=values["min_version"] or "TLS12",
    )
    return context, files


def _tls_version(value: str, path: str, key: str) -> ssl.TLSVersion:
    try:
        return _TLS_VERSIONS[value]
    except KeyError:
        raise _fail(path, f"{key}: unsupported TLS version {value!r} (use TLS12 or TLS13)") from None


def _client_auth(context: ssl.SSLContext, auth_type: str, ca_file: str, resolve, path: str, where: str) -> None:
    auth_type = auth_type or "NoClientCert"
    if auth_type in _CLIENT_AUTH_UNVERIFIED:
        raise _fail(path, f"{where}client_auth_type {auth_type} (accepting client certificates without "
                          "verifying them) is not supported; use VerifyClientCertIfGiven or "
                          "RequireAndVerifyClientCert with client_ca_file")
    if auth_type not in _CLIENT_AUTH:
        raise _fail(path, f"{where}client_auth_type: invalid value {auth_type!r} "
                          f"(one of {', '.join(list(_CLIENT_AUTH) + list(_CLIENT_AUTH_UNVERIFIED))})")
    verify_mode = _CLIENT_AUTH[auth_type]
    if ca_file and verify_mode == ssl.CERT_NONE:
        raise _fail(path, f"{where}client_ca_file is set but client_auth_type is {auth_type}; "
                          "set client_auth_type to verify client certificates")
    if verify_mode != ssl.CERT_NONE and not ca_file:
        raise _fail(path, f"{where}client_auth_type {auth_type} needs client_ca_file")
    if ca_file:
        try:
            context.load_verify_locations(cafile=resolve("client_ca_file"))
        except (OSError, ssl.SSLError) as err:
            raise _fail(path, f"cannot load {where}client_ca_file {ca_file!r}: {_describe(err)}") from None
    context.verify_mode = verify_mode


def grpc_server_credentials(web: WebConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for a gRPC server from the same web config; None means plaintext.

    grpcio has fewer knobs than Python's ssl module, so two settings map as follows:
    - client_auth_type VerifyClientCertIfGiven: grpcio either requires a verified client
      certificate or does not ask for one. It does not ask; that admits the same clients (anyone
      may connect without a certificate under VerifyClientCertIfGiven), it only skips checking
      certificates that nobody relies on.
    - min_version TLS13: grpcio cannot refuse TLS 1.2, so the setting is refused here rather than
      silently weakened. max_version is not enforced either; grpcio negotiates up to TLS 1.3.
    """
    files = web.tls_files
    if files is None:
        return None
    if files.min_version != "TLS12":
        raise WebConfigError(f"tls_server_config.min_version {files.min_version}: the OTLP/gRPC receiver cannot "
                             "enforce it (grpcio always accepts TLS 1.2); remove it, or turn the gRPC receiver off "
                             "with --otlp.grpc-listen-address=''")
    import grpc

    require_client_cert = files.client_auth_type == "RequireAndVerifyClientCert"
    try:
        key, chain = _read_bytes(files.key_file), _read_bytes(files.cert_file)
        client_ca = _read_bytes(files.client_ca_file) if require_client_cert else None
    except OSError as err:
        raise WebConfigError(f"cannot read {err.filename}: {err.strerror or err}") from None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=require_client_cert)


def _read_bytes(path: str) -> bytes:
    try:
        return read_config_bytes(path)
    except ConfigFileError as err:
        raise WebConfigError(f"cannot read {path}: {err.reason}") from None


def _describe(err: Exception) -> str:
    if isinstance(err, ssl.SSLError):
        return err.reason or str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


# --- basic auth ---------------------------------------------------------------------------------


def _basic_auth(users: Mapping[str, Any], path: str) -> "BasicAuth | None":
    if not users:
        return None
    hashes: dict[str, bytes] = {}
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise _fail(path, f"basic_auth_users: invalid user name {user!r} (non-empty, no ':')")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise _fail(path, f"basic_auth_users.{user}: the password must be a bcrypt hash ($2b$...), "
                              "e.g. from htpasswd -nBC 12")
        if not 4 <= int(hashed.split("$")[2]) <= _MAX_BCRYPT_COST:
            raise _fail(path, f"basic_auth_users.{user}: bcrypt cost must be between 4 and {_MAX_BCRYPT_COST} "
                              "(each step doubles the time of a check; 12 takes about 0.25 s)")
        hashes[user] = hashed.encode("ascii")
    return BasicAuth(hashes)


class BcryptBudget:
    """The bcrypt work credentials not verified before may cause: one check at a time, and at
    most `rate` a second (a token bucket holding `burst`). Beyond it a check is refused at once:
    nothing waits, so a flood holds at most one server thread, never the scrapes' threads. Shared
    by every BasicAuth of the process (the metrics port, the OTLP receivers): they share the CPU."""

    def __init__(self, rate: float = 2.0, burst: int = 4, clock: Callable[[], float] = time.monotonic,
                 wait: float = 10.0):
        self.rate, self.burst, self.wait = rate, burst, wait
        self._clock = clock
        self._tokens = float(burst)
        self._refilled = clock()
        self._lock = threading.Lock()
        self.slot = threading.Lock()  # held while one bcrypt runs

    def acquire(self, priority: bool = False) -> bool:
        """The slot for one bcrypt (release() after it). A priority check (a credential verified
        before) waits up to `wait` for the running one and takes no token; others never wait."""
        if priority:
            return self.slot.acquire(timeout=self.wait)
        if not self.slot.acquire(blocking=False):
            return False
        if self._take():
            return True
        self.slot.release()
        return False

    def release(self) -> None:
        self.slot.release()

    def _take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


_SHARED_BUDGET = BcryptBudget()


class BasicAuth:
    """Checks an HTTP Authorization header against bcrypt hashes, without letting a flood of wrong
    passwords starve the scrapes.

    A bcrypt check costs ~0.1-0.3 s of CPU by design. Every result is remembered for CACHE_TTL
    (at most MAX_CACHED of each, correct and wrong), keyed by an HMAC of user:password under a
    key drawn at start: the cache holds no password, nor anything to test guesses against.
    Prometheus sends the same credentials every scrape, so a correct one costs one bcrypt per TTL,
    and so does a wrong one repeated. A credential not seen before is checked only within the
    process-wide BcryptBudget, else refused unhashed (and not remembered: it may be tried again).
    A correct credential whose entry has expired is checked again outside the budget, and is let
    in by its other requests meanwhile, so guessing attackers cannot lock out a scraper verified
    before. Unknown users pay one bcrypt like known ones, so timing does not tell which exist.
    """

    MAX_CACHED = 1024
    CACHE_TTL = 60.0

    def __init__(self, hashes: Mapping[str, bytes], *, clock: Callable[[], float] = time.monotonic,
                 budget: BcryptBudget | None = None):
        self._hashes = dict(hashes)
        # Same cost as the most expensive configured hash, so unknown users take as long.
        cost = max(int(h.split(b"$")[2]) for h in self._hashes.values())
        self._dummy_hash = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=max(cost, 4)))
        self._key = os.urandom(32)
        self._clock = clock
        self._budget = budget or _SHARED_BUDGET
        # HMAC -> expiry, oldest first. Correct credentials stay after expiry (re-verified with
        # priority); only their owners can add them, so guesses never evict them.
        self._correct: OrderedDict[bytes, float] = OrderedDict()
        self._wrong: OrderedDict[bytes, float] = OrderedDict()
        self._running: set[bytes] = set()  # credentials being checked now
        self._lock = threading.Lock()

    def check_header(self, authorization: str | None) -> bool:
        """True if `authorization` is 'Basic base64(user:password)' for a configured user."""
        credentials = _parse_basic(authorization)
        return credentials is not None and self.check(*credentials)

    def check(self, user: str, password: str) -> bool:
        # A user name has no ':', so user:password names one pair (as in the header itself).
        key = hmac.new(self._key, f"{user}:{password}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        now = self._clock()
        with self._lock:
            if self._correct.get(key, -1.0) > now:
                return True
            if self._wrong.get(key, -1.0) > now:
                return False
            verified_before = key in self._correct
            if key in self._running:  # being checked by another request right now
                return verified_before
            self._running.add(key)
        try:
            if not self._budget.acquire(priority=verified_before):
                return False  # over budget: refused without hashing
            try:
                ok = self._bcrypt(user, password)
            finally:
                self._budget.release()
            self._remember(key, ok)
            return ok
        finally:
            with self._lock:
                self._running.discard(key)

    def _bcrypt(self, user: str, password: str) -> bool:
        hashed = self._hashes.get(user)
        try:
            ok = bcrypt.checkpw(password.encode("utf-8", "surrogatepass"), hashed or self._dummy_hash)
        except ValueError:  # e.g. a password with a NUL byte, or longer than 72 bytes
            ok = False
        return ok and hashed is not None

    def _remember(self, key: bytes, ok: bool) -> None:
        now = self._clock()
        with self._lock:
            entries = self._correct if ok else self._wrong
            entries.pop(key, None)
            if not ok:
                self._correct.pop(key, None)
            while entries and len(entries) >= self.MAX_CACHED:
                entries.popitem(last=False)  # the oldest (insertion order = expiry order)
            entries[key] = now + self.CACHE_TTL


def _parse_basic(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


# --- response headers ---------------------------------------------------------------------------


def _headers(http: Mapping[str, Any], path: str) -> tuple[tuple[str, str], ...]:
    _check_keys(http, _HTTP_KEYS, set(), path, "http_server_config.")
    http2 = http.get("http2")
    if http2 is not None and not isinstance(http2, bool):
        raise _fail(path, "http_server_config.http2 must be true or false")  # accepted; we serve HTTP/1.1
    headers = _mapping(http.get("headers"), path, "http_server_config.headers")
    allowed = {name.lower(): name for name in _ALLOWED_HEADERS}
    out = []
    for name, value in headers.items():
        canonical = allowed.get(str(name).lower())
        if canonical is None:
            raise _fail(path, f"http_server_config.headers: header {name!r} cannot be configured "
                              f"(allowed: {', '.join(_ALLOWED_HEADERS)})")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise _fail(path, f"http_server_config.headers.{name} must be a single-line string")
        out.append((canonical, value))
    return tuple(out)
