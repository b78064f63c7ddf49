"""Scraping an agent's /metrics as Prometheus would: HTTP or HTTPS, optional basic auth.

Credentials come from `--user` and `--password-file` (a password on the command line would show
in `ps`) or from the URL (`https://user:pass@host:9842/metrics`); the URL shown on screen never
carries them. `--ca-file` trusts the CA of an agent whose `--web.config.file` serves TLS with a
private certificate; `--insecure` skips verification (hostname included).
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from gpuphase.model.httpclient import basic_authorization, tls_context

DEFAULT_URL = "http://127.0.0.1:9842/metrics"
ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"  # the 0.0.4 text format the parser reads
MAX_PAGE = 64 * 1024 * 1024


class ScrapeError(Exception):
    """The agent could not be scraped; the message says why, in words for the screen."""


@dataclass(frozen=True)
class Target:
    url: str  # without credentials
    authorization: str | None = None
    context: ssl.SSLContext | None = None
    timeout: float = 5.0

    @property
    def shown(self) -> str:
        return self.url


def make_target(url: str, *, user: str | None = None, password_file: str | None = None,
                ca_file: str | None = None, insecure: bool = False, timeout: float = 5.0) -> Target:
    """A Target from the command line's values; ValueError names what is wrong."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--url: expected an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"--url: no host in {url!r}")
    url_user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    url_password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))
    if password_file is not None and user is None and url_user is None:
        raise ValueError("--password-file needs --user (or a user in the URL)")
    password = url_password
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as file:
                password = file.read().rstrip("\r\n")
        except OSError as err:
            raise ValueError(f"--password-file: {err.strerror or err}: {password_file}") from None
    name = user if user is not None else url_user
    authorization = None
    if name is not None:
        authorization = basic_authorization(name, password or "")
    context = None
    if parts.scheme == "https":
        try:
            context = tls_context(ca_file, insecure=insecure)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"--ca-file: {err}: {ca_file}") from None
    elif ca_file or insecure:
        raise ValueError("--ca-file and --insecure are for https:// URLs")
    return Target(clean, authorization, context, timeout)


def scrape(target: Target) -> str:
    """The /metrics page; ScrapeError with a reason a person can act on."""
    request = urllib.request.Request(target.url, headers={"Accept": ACCEPT, "User-Agent": "gpuphase-top"})
    if target.authorization:
        request.add_header("Authorization", target.authorization)
    try:
        with urllib.request.urlopen(request, timeout=target.timeout, context=target.context) as response:
            body = response.read(MAX_PAGE + 1)
    except urllib.error.HTTPError as err:
        hint = ""
        if err.code == 401:
            hint = ": give --user and --password-file (or user:password@ in the URL)" if not target.authorization \
                else ": the user or password is wrong"
        raise ScrapeError(f"{target.url} answered {err.code} {err.reason}{hint}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ScrapeError(f"{target.url}: TLS certificate not trusted ({reason.verify_message}): "
                              "give --ca-file, or --insecure") from None
        if isinstance(reason, ssl.SSLError):
            raise ScrapeError(f"{target.url}: TLS handshake failed ({reason.reason or reason}); does the agent "
                              "serve https (tls_server_config in its --web.config.file)?") from None
        text = getattr(reason, "strerror", None) or str(reason)
        raise ScrapeError(f"cannot reach the agent at {target.url}: {text}") from None
    except (TimeoutError, OSError) as err:
        text = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ScrapeError(f"cannot reach the agent at {target.url}: {text}") from None
    except Exception as err:  # http.client.RemoteDisconnected, BadStatusLine (e.g. http:// to a TLS port)
        raise ScrapeError(f"{target.url}: not an HTTP answer ({type(err).__name__}); an https:// agent?") from None
    if len(body) > MAX_PAGE:
        raise ScrapeError(f"{target.url}: page larger than {MAX_PAGE >> 20} MiB")
    return body.decode("utf-8", errors="replace")
