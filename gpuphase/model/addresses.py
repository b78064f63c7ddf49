"""Addresses: where the agent listens, and where and how it pushes metrics.

Push endpoint rule (push_target):
  - http(s)://host[:port]/.../v1/metrics  -> OTLP/HTTP (protobuf), POSTed to exactly that URL
  - host:port or http(s)://host:port      -> OTLP/gRPC
  - https:// means TLS, http:// plaintext; a bare host:port is TLS unless --otlp.metrics-insecure.
  - Plaintext to a host that is not loopback needs --otlp.metrics-insecure: metrics name hosts,
    pods and processes, and must not cross a network unencrypted by accident.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

GRPC = "grpc"
HTTP = "http/protobuf"
HTTP_PATH = "/v1/metrics"


def parse_listen_address(value: Any) -> str:
    """host:port, :port (all interfaces), [v6]:port, or '' (disabled)."""
    text = ("" if value is None else str(value)).strip()
    if text == "":
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:4317 or :9842, got {text!r}")
    return text


def split_address(address: str) -> tuple[str, int]:
    """"host:port" -> (host, port) for socket binding; an empty host means all interfaces."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdecimal():
        raise ValueError(f"listen address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class PushConfigError(ValueError):
    """The push settings are unusable; the message says which and why (the agent exits with it)."""


@dataclass(frozen=True)
class PushTarget:
    protocol: str  # GRPC or HTTP
    endpoint: str  # GRPC: host:port; HTTP: the full URL
    plaintext: bool

    def describe(self) -> str:
        transport = "OTLP/gRPC" if self.protocol == GRPC else "OTLP/HTTP"
        return f"{transport} {'(plaintext) ' if self.plaintext else '(TLS) '}{self.endpoint}"


def push_target(endpoint: str, allow_plaintext: bool) -> PushTarget:
    """Where and how to push, from --otlp.metrics-endpoint and --otlp.metrics-insecure (rule above)."""
    text = endpoint.strip()
    if "://" in text:
        url = urlsplit(text)
        if url.scheme not in ("http", "https"):
            raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: the scheme must be http or https")
        host, port = _host_and_port(url, endpoint)
        plaintext = url.scheme == "http"
        if url.path.rstrip("/") == "":
            if port is None:
                raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: an OTLP/gRPC endpoint needs a port "
                                      "(the Collector's default is 4317)")
            target = PushTarget(GRPC, _join(host, port), plaintext)
        elif url.path.endswith(HTTP_PATH):
            target = PushTarget(HTTP, text, plaintext)
        else:
            raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: a URL with a path must end in {HTTP_PATH} "
                                  "(OTLP/HTTP); for OTLP/gRPC give host:port or a URL without a path")
    else:
        url = urlsplit("//" + text)
        host, port = _host_and_port(url, endpoint)
        if port is None:
            raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: expected host:port (OTLP/gRPC), "
                                  f"http(s)://host:port, or a URL ending in {HTTP_PATH} (OTLP/HTTP)")
        target = PushTarget(GRPC, _join(host, port), allow_plaintext)
    if target.plaintext and not allow_plaintext and not _is_loopback(host):
        raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: refusing to push metrics in plaintext to a "
                              "host that is not loopback; use https:// or set --otlp.metrics-insecure")
    return target


def _host_and_port(url, endpoint: str) -> tuple[str, int | None]:
    try:
        host, port = url.hostname, url.port
    except ValueError:
        raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: invalid port") from None
    if not host:
        raise PushConfigError(f"--otlp.metrics-endpoint {endpoint!r}: no host")
    return host, port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
