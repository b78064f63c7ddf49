"""What gpuphase's HTTP clients (`gpuphase top` of an agent, `gpuphase report` of a Prometheus API)
share: the basic-auth header and the TLS context built from their flags. Callers turn the
OSError / ssl.SSLError of unreadable certificate files into their own one-line messages."""

from __future__ import annotations

import base64
import ssl


def basic_authorization(user: str, password: str) -> str:
    """The Authorization header's value for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def tls_context(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                insecure: bool = False) -> ssl.SSLContext:
    """A client context verifying with ca_file (else the system's CAs), presenting cert_file
    when given, or verifying nothing when insecure."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
