"""Connecting to a backend: pick a member, connect within the connect budget, try
the next member on failure, and report passive health. gevent sockets only.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import time

from dynproxy.core.decision import Decision
from dynproxy.core.router import ConnInfo
from dynproxy.core.topology import Member
from dynproxy.net.tls_stream import connect_tls
from dynproxy.obs.log import log_once_per, log_transition

log = logging.getLogger("dynproxy.dial")
MAX_ATTEMPTS = 3


class DialFailed(Exception):
    def __init__(self, end: str, backend: str | None):
        super().__init__(end)
        self.end, self.backend = end, backend


def dial(snap, decision: Decision, conn: ConnInfo, metrics):
    """(member, connected socket) with member.active already counted, or DialFailed."""
    topo = snap.topology
    budget = snap.config.server.timeouts.connect
    deadline = time.monotonic() + budget
    hash_key = _hash_key(decision, conn, topo)
    last = None
    for member in topo.candidates(decision, hash_key, MAX_ATTEMPTS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        last = member
        member.active += 1
        sock = _connect(member, remaining, metrics)
        if sock is not None:
            if member.health.consecutive or not member.health.up:
                _passive_success(topo, member, metrics)
            return member, sock
        member.active -= 1
        _passive_failure(topo, member, metrics)
    if last is None:
        metrics.errors_total.labels("no_backend").inc()
        raise DialFailed("no_backend", None)
    raise DialFailed("connect_failed", last.id)


def _hash_key(decision: Decision, conn: ConnInfo, topo) -> str | None:
    """What the balancers hash: the rule's `algo=hash(...)`, else the key of the first
    target pool that balances by hash (an lb's own wrr or least_conn ignores it), so
    `lb(web, ...)` keeps web's `balance hash(src)` sticky."""
    key = decision.hash_key
    if key is None:
        pools = topo.pools
        for target in decision.targets:
            pool = pools.get(target.name)
            if pool is not None and pool.spec.hash_key is not None:
                key = pool.spec.hash_key
                break
    if key == "src":
        return conn.src
    if key == "sni":
        return conn.sni
    return None


def _connect(member: Member, timeout: float, metrics):
    spec = member.spec
    started = time.monotonic()
    try:
        family, sockaddr = resolve(spec.host, spec.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
    except (OSError, socket.timeout) as exc:
        reason = "timeout" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        metrics.errors_total.labels("connect_failed").inc()
        log_once_per(f"connect-{member.id}", 10.0, "connect to %s (%s) failed: %s",
                     member.id, spec.address, reason)
        return None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if spec.tls is not None:  # re-encrypt: a TlsStream, verified, or the next member
        sock = _secure(member, sock, started + timeout, metrics)
        if sock is None:
            return None
    sock.settimeout(None)
    metrics.backend_response_time_seconds.labels(member.id).observe(time.monotonic() - started)
    return sock


def _secure(member: Member, sock, deadline: float, metrics):
    """TLS to the backend within the connect budget; None (counted, logged) when the
    handshake fails or its certificate does not verify."""
    spec = member.spec
    try:
        return connect_tls(sock, spec.tls, spec.host, deadline)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        sock.close()
        metrics.errors_total.labels("backend_tls").inc()
        why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        log_once_per(f"backend-tls-{member.id}", 10.0, "TLS to %s (%s) failed: %s",
                     member.id, spec.address, why)
        return None


@functools.lru_cache(maxsize=4096)
def _literal(host: str, port: int):
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def resolve(host: str, port: int):
    """(family, sockaddr); IP literals skip the resolver (and its thread pool)."""
    literal = _literal(host, port)
    if literal is not None:
        return literal
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    return family, sockaddr


def _passive_failure(topo, member: Member, metrics) -> None:
    transition = member.record(False, "connect failed")
    if transition is not None:
        report_health(topo, member, metrics)


def _passive_success(topo, member: Member, metrics) -> None:
    if member.record(True, "connected") is not None:
        report_health(topo, member, metrics)


def report_health(topo, member: Member, metrics) -> None:
    up = member.health.up
    metrics.backend_health.labels(topo.pool_of(member), member.id).set(1 if up else 0)
    log_transition(f"health-{member.id}", "up" if up else "down",
                   "backend %s (%s) is %s: %s", member.id, member.spec.address,
                   "up" if up else "down", member.health.reason)
