"""systemd's sd_notify protocol in pure Python: tell the service manager we are ready, alive, stopping.

Under `Type=notify` systemd passes the path of a datagram socket in NOTIFY_SOCKET and waits for
"READY=1" before it considers the unit started (so `systemctl start` returns once the first
complete sample is exported, not when the process merely exists). With `WatchdogSec=` it also
expects "WATCHDOG=1" more often than WATCHDOG_USEC and restarts the service otherwise.

Why not a library: the protocol is one `sendto` on an AF_UNIX datagram socket; the python
bindings of libsystemd need headers and a compiler, and the PyPI `sdnotify` package does not
handle abstract socket addresses. Everything is a no-op outside systemd (NOTIFY_SOCKET unset),
so the daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


def _socket_address(raw: str) -> str | bytes | None:
    """NOTIFY_SOCKET -> an address for sendto, or None when it is not one we can use.

    '/run/systemd/notify' is a filesystem socket; '@name' is an abstract one (Linux), whose
    address is the name with a leading NUL byte instead of the '@'. systemd >= 253 may also pass
    'vsock:CID:PORT' for virtual machines, which an agent on a GPU host never sees; it is ignored.
    """
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one state string ('READY=1', 'STATUS=...', newline-separated for several).

    Returns True when the message was delivered, False when there is no service manager to tell
    (NOTIFY_SOCKET unset) or delivery failed. A failure is logged, never raised: the daemon must
    not die because its supervisor's socket misbehaved (systemd then reports the start timeout).
    """
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying systemd", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("could not notify systemd at %r (%s): %s", raw, state.split("\n", 1)[0], err)
        return False
    return True


def ready(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """The service is up (first complete sample exported); optional human-readable status."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""), environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun; systemd shows 'deactivating' instead of assuming a crash."""
    return notify("STOPPING=1", environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """Free-form one-line status shown by `systemctl status`."""
    return notify("STATUS=" + text.replace("\n", " "), environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """Keep-alive for WatchdogSec=. Call it from the sampling loop, only after a tick completed,
    so that a hung NVML call (the failure the watchdog exists for) stops the pings."""
    return notify("WATCHDOG=1", environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when no watchdog is armed for us.

    systemd sets WATCHDOG_USEC and WATCHDOG_PID; the PID check matters because the variables are
    inherited by children, which must not think the watchdog is theirs. Ping at half the interval
    (sd_watchdog_enabled(3) recommends that margin).
    """
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
