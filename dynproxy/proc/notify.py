"""systemd's readiness protocol (sd_notify) in a few lines: READY, RELOADING, STOPPING.

When systemd starts a `Type=notify` (or `notify-reload`) service it sets NOTIFY_SOCKET
to a Unix datagram socket; the service writes `KEY=VALUE` lines there. Without
NOTIFY_SOCKET every call here does nothing, so the proxy behaves the same outside
systemd. Only the master notifies (workers are started without NOTIFY_SOCKET).

Must never raise: a lost notification is logged once and the proxy goes on serving.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("dynproxy.notify")

__all__ = ["notify", "ready", "reloading", "status", "stopping"]


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1") to systemd; False when not under systemd or on error."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at NOTIFY_SOCKET=%r: %s", address, exc)
        return False
    return True


def ready(text: str = "serving") -> bool:
    return notify("READY=1", f"STATUS={text}")


def reloading() -> bool:
    """systemd (Type=notify-reload) wants the monotonic time the reload started at."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping(text: str = "draining") -> bool:
    return notify("STOPPING=1", f"STATUS={text}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")
