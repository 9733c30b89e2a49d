"""Active health checks: `health tcp|tls [send "..." expect "..."]` in a pool.

`check_once` is one probe against one backend: TCP connect, optionally a TLS
handshake, optionally send bytes and wait for expected bytes, all within the pool's
`timeout`. `ProbeLoop` repeats it every `interval` (jittered +-10%, first check at a
random point of the first interval, so checks of many members never fire in
lockstep) and hands each result to a callback; the hysteresis (rise/fall) belongs to
the caller (proc.jobs), which runs one loop per member in its greenlet group.

The TLS check does not verify the certificate unless the backend asks for
verification (`tls ca "..."` in the rules), as HAProxy's `check-ssl` does by default:
it checks that a TLS server answers, not who it is. Never raises out of `check_once`.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable

import gevent

from dynproxy.core.decision import BackendSpec, HealthSpec
from dynproxy.core.health import jittered_interval
from dynproxy.net.dial import resolve

__all__ = ["ProbeLoop", "ProbeResult", "check_once"]

MAX_EXPECT_READ = 16 * 1024


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # "connected", "connect refused", "timeout", "expect mismatch", ...
    at: float  # epoch seconds when the check finished


def check_once(spec: BackendSpec, health: HealthSpec) -> ProbeResult:
    """Probe `spec` once as `health` says; the reason tells an operator what happened."""
    sock = None
    try:
        with gevent.Timeout(health.timeout):
            sock = _connect(spec)
            if health.kind == "tls":
                sock = _handshake(sock, spec)
            reason = _exchange(sock, health) if health.send is not None else _ok_reason(health)
    except gevent.Timeout:
        reason = f"timeout after {health.timeout:g}s"
    except ssl.SSLError as exc:
        reason = f"tls handshake failed: {exc.reason or exc}"
    except OSError as exc:
        reason = f"connect failed: {exc.strerror or exc}"
    finally:
        if sock is not None:
            sock.close()
    return ProbeResult(reason in ("connected", "tls handshake ok", "expect matched"), reason,
                       time.time())


def _ok_reason(health: HealthSpec) -> str:
    return "tls handshake ok" if health.kind == "tls" else "connected"


def _connect(spec: BackendSpec) -> socket.socket:
    family, sockaddr = resolve(spec.host, spec.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _handshake(sock: socket.socket, spec: BackendSpec) -> ssl.SSLSocket:
    tls = spec.tls
    ctx = ssl.create_default_context(cafile=tls.ca if tls and tls.ca else None)
    if not (tls and tls.verify and tls.ca):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    server_name = (tls.sni if tls and tls.sni else None) or _name_or_none(spec.host)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def _name_or_none(host: str) -> str | None:
    return None if host.replace(".", "").isdigit() or ":" in host else host


def _exchange(sock, health: HealthSpec) -> str:
    sock.sendall(health.send)
    expect = health.expect or b""
    got = b""
    while expect not in got:
        data = sock.recv(4096)
        if not data:
            return f"expect mismatch: connection closed after {len(got)} bytes"
        got += data
        if len(got) > MAX_EXPECT_READ:
            return f"expect mismatch: {expect!r} not in the first {MAX_EXPECT_READ} bytes"
    return "expect matched"


class ProbeLoop:
    """Runs `check_once` for one member forever; `run` is a greenlet body."""

    def __init__(self, spec: BackendSpec, health: HealthSpec,
                 on_result: Callable[[ProbeResult], None], rng=random):
        self.spec, self.health = spec, health
        self.on_result = on_result
        self._rng = rng

    def run(self) -> None:
        gevent.sleep(self.health.interval * self._rng.random())
        while True:
            self.on_result(check_once(self.spec, self.health))
            gevent.sleep(jittered_interval(self.health.interval, self._rng))
