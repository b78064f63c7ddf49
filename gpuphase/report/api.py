"""A client of the Prometheus HTTP API (/api/v1): Prometheus itself, Thanos, Mimir, VictoriaMetrics.

Only what the report needs: instant queries (POSTed, so long PromQL never hits a URL limit), the
series and label-values endpoints. Authentication and TLS as other Prometheus clients take them:
basic auth, a bearer token (or a file holding one), a CA bundle, a client certificate, and
skipping verification on request. Every failure is an ApiError with one line that says what to
fix: an unreachable API, a non-API answer (a login page, a Grafana URL), a refused query with
the server's own reason.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from gpuphase.model.httpclient import basic_authorization, tls_context

# An answer larger than this is not a report query's (those return one value per series).
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class ApiError(RuntimeError):
    """The API could not answer; str() is one line for the operator."""


@dataclass(frozen=True)
class ApiAuth:
    username: str = ""
    password: str = ""
    bearer_token: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False


class PrometheusApi:
    def __init__(self, url: str, auth: ApiAuth = ApiAuth(), timeout: float = 120.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ApiError(f"--prometheus.url {url!r}: expected http(s)://HOST[:PORT][/PATH]")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": "application/json", "User-Agent": "gpuphase-report"}
        if auth.username or auth.password:
            self._headers["Authorization"] = basic_authorization(auth.username, auth.password)
        elif auth.bearer_token:
            self._headers["Authorization"] = f"Bearer {auth.bearer_token}"
        self._context = _tls_context(auth) if parsed.scheme == "https" else None
        self._lock = threading.Lock()
        self.requests = 0

    # ---- endpoints ---------------------------------------------------------------------------
    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self._call("query", {"query": expr, "time": f"{at:.3f}"}, expr, post=True)
        if data.get("resultType") != "vector":
            raise ApiError(f"query returned a {data.get('resultType')}, not a vector: {_short(expr)}")
        return data.get("result") or []

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        return self._call("series", {"match[]": match, "start": f"{start:.3f}", "end": f"{end:.3f}"}, match)

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        return self._call(f"label/{urllib.parse.quote(label)}/values",
                          {"match[]": match, "start": f"{start:.3f}", "end": f"{end:.3f}"}, match)

    # ---- plumbing ----------------------------------------------------------------------------
    def _call(self, endpoint: str, params: dict[str, str], what: str, post: bool = False) -> Any:
        """GET, or POST for queries (whose PromQL may be long); the label endpoints take GET only."""
        with self._lock:
            self.requests += 1
        url = f"{self.url}/api/v1/{endpoint}"
        encoded = urllib.parse.urlencode(params)
        if post:
            request = urllib.request.Request(url, data=encoded.encode(), headers={
                **self._headers, "Content-Type": "application/x-www-form-urlencoded"})
        else:
            request = urllib.request.Request(f"{url}?{encoded}", headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(65536), err.code
            if status in (401, 403):
                raise ApiError(f"{self.url} refused the report's credentials (HTTP {status}): "
                               "check --prometheus.username/--prometheus.password or --prometheus.bearer-token") from None
        except urllib.error.URLError as err:
            raise ApiError(f"cannot reach the Prometheus API at {self.url}: {_reason(err.reason)}") from None
        except (socket.timeout, TimeoutError):
            raise ApiError(f"the Prometheus API at {self.url} did not answer within {self.timeout:g} s "
                           f"(raise --prometheus.timeout, or shorten --range): {_short(what)}") from None
        except (ConnectionError, OSError) as err:
            raise ApiError(f"cannot reach the Prometheus API at {self.url}: {_reason(err)}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ApiError(f"{url} answered more than {MAX_RESPONSE_BYTES >> 20} MiB: {_short(what)}")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise ApiError(f"{url} did not answer with Prometheus API JSON (HTTP {status}): is "
                           f"--prometheus.url the API's root (e.g. http://prometheus:9090)?") from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            error = answer.get("error", "no reason given") if isinstance(answer, dict) else "not an object"
            kind = answer.get("errorType", "error") if isinstance(answer, dict) else "error"
            raise ApiError(f"the Prometheus API refused a query ({kind}, HTTP {status}): "
                           f"{_one_line(str(error))} — query: {_short(what)}")
        return answer.get("data")


def _tls_context(auth: ApiAuth) -> ssl.SSLContext:
    try:
        return tls_context(auth.ca_file, auth.cert_file, auth.key_file, auth.insecure_skip_verify)
    except (OSError, ssl.SSLError) as err:
        raise ApiError(f"cannot load the API's TLS files: {_reason(err)}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return _one_line(str(reason))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _short(expr: str) -> str:
    text = _one_line(expr)
    return text if len(text) <= 160 else text[:157] + "..."
