"""Connecting to a backend: pick a member, connect within the connect timeout, try
the next member on failure, and report passive health (`health.passive_fall`
consecutive failures in live traffic mark a member down in this worker). A socket
that cannot be made for lack of descriptors or memory is the proxy's shortage, not
the member's: the connection ends "fd_limit" and no health is touched (`new_socket`).

`dial_raw` is the TCP hot path: a plain non-blocking `_socket.socket` (SOCK_NONBLOCK,
so no fcntl/ioctl), one connect(2), one wait for writability (a libev watcher and a
timer with the remaining budget, switching straight back into this greenlet), one
getsockopt(SO_ERROR). gevent's own connect costs two connect calls, two getsockopts,
an ioctl, two fcntls and a Timeout object. `dial` wraps the result in a gevent socket
for callers that need blocking-style sockets (TLS termination).

Must never block the hub: every wait has the remaining budget as its deadline.
"""

from __future__ import annotations

import _socket
import errno
import functools
import ipaddress
import logging
import os
import socket
import time

from gevent import socket as gsocket
from gevent.hub import get_hub
from greenlet import getcurrent

from dynproxy.core.decision import Decision
from dynproxy.core.router import ConnInfo
from dynproxy.core.topology import Member
from dynproxy.net.relay_pools import WATCHERS
from dynproxy.net.tls_stream import TlsStream, connect_tls
from dynproxy.obs.log import log_once_per, log_transition

log = logging.getLogger("dynproxy.dial")
MAX_ATTEMPTS = 3
_WRITE = 2  # libev event mask
_READY, _EXPIRED = 1, 0  # what the watcher and the timer switch back with
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_CONNECTING = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY})
_NOBODY: frozenset[str] = frozenset()
_UNKNOWN = object()  # dial_raw's `hashed` when the caller did not work it out
# socket() failing with these is the proxy's shortage, not the backend's (as accept's)
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FD_LIMIT_REASON = "fd_limit_upstream"  # proxy_errors_total{reason}: accept's is "fd_limit"


class DialFailed(Exception):
    def __init__(self, end: str, backend: str | None):
        super().__init__(end)
        self.end, self.backend = end, backend


def dial(snap, decision: Decision, conn: ConnInfo, metrics):
    """(member, connected gevent socket or TlsStream) with member.active already
    counted, or DialFailed."""
    member, sock, writer = dial_raw(snap, decision, conn, metrics)
    if writer is not None:
        WATCHERS.give(writer)
    if isinstance(sock, TlsStream):
        return member, sock
    return member, gsocket.socket(sock.family, socket.SOCK_STREAM, fileno=sock.detach())


def dial_raw(snap, decision: Decision, conn: ConnInfo, metrics, hashed=_UNKNOWN):
    """(member, socket, write watcher or None) with member.active already counted, or
    DialFailed. The socket is a non-blocking `_socket.socket` (a TlsStream for a backend
    declared with `tls`); the watcher, when not None, is the libev write watcher the
    connect waited on (from WATCHERS): the caller owns it (the relay reuses it).
    `hashed`: what hash_source(decision, topology) said, when the caller keeps it.
    DialFailed("fd_limit") at once when no socket can be made (see new_socket)."""
    topo = snap.topology
    # Each member gets the whole connect timeout (as HAProxy's `timeout connect` per
    # retry): one blackholed member must not eat the time a healthy one needs.
    per_attempt = snap.config.server.timeouts.connect
    if hashed is _UNKNOWN:
        hashed = hash_source(decision, topo)
    hash_key = None if hashed is None else conn.src if hashed == "src" else conn.sni
    last = None
    tried: list[str] = []  # as Topology.candidates, without a generator and sets per try
    for _ in range(MAX_ATTEMPTS):
        member = topo.pick(decision, hash_key, frozenset(tried) if tried else _NOBODY)
        if member is None:
            break
        tried.append(member.id)
        last = member
        member.active += 1
        try:
            connected = _connect(member, per_attempt, metrics)
        except BaseException:  # a kill, or no socket (fd_limit): the count must not leak
            member.active -= 1
            raise
        if type(connected) is tuple:
            if member.health.passive_failures or not member.health.up:
                _passive_success(topo, member, metrics)
            return member, *connected
        member.active -= 1
        _passive_failure(snap, member, metrics, connected)
    if last is None:
        metrics.errors_total.labels("no_backend").inc()
        raise DialFailed("no_backend", None)
    raise DialFailed("connect_failed", last.id)


def _hash_key(decision: Decision, conn: ConnInfo, topo) -> str | None:
    """What the balancers hash for this connection (see hash_source)."""
    key = hash_source(decision, topo)
    if key == "src":
        return conn.src
    if key == "sni":
        return conn.sni
    return None


def hash_source(decision: Decision, topo) -> str | None:
    """Which connection fact the balancers hash: the rule's `algo=hash(...)`, else the
    key of the first target pool that balances by hash (an lb's own wrr or least_conn
    ignores it), so `lb(web, ...)` keeps web's `balance hash(src)` sticky. "src", "sni"
    or None; it depends only on the decision and its rule set's pools, so callers may
    keep it per decision."""
    key = decision.hash_key
    if key is None:
        pools = topo.pools
        for target in decision.targets:
            pool = pools.get(target.name)
            if pool is not None and pool.spec.hash_key is not None:
                return pool.spec.hash_key
    return key


def _connect(member: Member, timeout: float, metrics):
    """(socket, write watcher or None) connected within `timeout`; when it fails, why
    (a str: counted, logged once per interval). DialFailed("fd_limit") when this
    process cannot make a socket at all: no member could be tried."""
    spec = member.spec
    started = time.monotonic()
    writer = None
    try:
        family, sockaddr = resolve(spec.host, spec.port)
        sock = new_socket(family, _NONBLOCKING_STREAM, "tcp", metrics)
        try:
            writer = _connect_within(sock, sockaddr, timeout)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        metrics.errors_total.labels("connect_failed").inc()
        log_once_per(f"connect-{member.id}", 10.0, "connect to %s (%s) failed: %s",
                     member.id, spec.address, reason)
        return reason
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if spec.tls is not None:  # re-encrypt: a TlsStream, verified, or the next member
        if writer is not None:
            WATCHERS.give(writer)
            writer = None
        sock = _secure(member, gsocket.socket(family, socket.SOCK_STREAM,
                                              fileno=sock.detach()),
                       started + timeout, metrics)
        if sock is None:
            return "TLS handshake failed"
    metrics.batch.cell(metrics.backend_response_time_seconds, member.id).observe(
        time.monotonic() - started)
    return sock, writer


def _connect_within(sock, sockaddr, timeout: float):
    """connect(2) a non-blocking socket; wait for it at most `timeout` seconds. Returns
    the write watcher it waited with (None when it connected at once); raises OSError
    (TimeoutError when time ran out), closing the watcher."""
    err = sock.connect_ex(sockaddr)
    if not err:
        return None
    if err not in _CONNECTING:
        raise OSError(err, os.strerror(err))
    loop = get_hub().loop
    writer = WATCHERS.take(loop, sock.fileno(), _WRITE)
    try:
        if not wait_ready(writer, timeout, loop):
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        WATCHERS.give(writer)
        raise
    writer.stop()
    return writer


def wait_ready(watcher, timeout: float, loop=None) -> bool:
    """Park this greenlet until `watcher` fires (True) or `timeout` seconds pass (False).

    The watcher and a timer call this greenlet's switch directly: no Waiter, no
    Timeout object, no exception on expiry. Both are stopped before it returns.
    """
    hub = get_hub()
    timer = (loop or hub.loop).timer(timeout)
    switch = getcurrent().switch
    watcher.start(switch, _READY)
    timer.start(switch, _EXPIRED)
    try:
        return hub.switch() == _READY
    finally:
        watcher.stop()
        timer.close()


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


def new_socket(family: int, kind: int, proto: str, metrics):
    """A socket towards a backend. When the process is out of descriptors or socket
    memory that is no fault of the backend's: DialFailed("fd_limit", None), counted in
    proxy_errors_total{reason="fd_limit_upstream"} and logged at most once per 10 s,
    and no member's health is touched. `proto` ("tcp", "udp") is for the log only."""
    try:
        return _socket.socket(family, kind)
    except OSError as exc:
        if exc.errno not in FD_ERRNOS:
            raise
        metrics.errors_total.labels(FD_LIMIT_REASON).inc()
        log_once_per("fd-limit-upstream", 10.0,
                     "cannot open a %s socket to a backend: %s; %s (end \"fd_limit\") and no "
                     "backend's health is touched: this process is out of file descriptors "
                     "or socket memory, not the backend. Raise the open-files limit "
                     "(ulimit -n, systemd LimitNOFILE=) or lower server.max_connections "
                     "(and UDP max_sessions)", proto.upper(), exc.strerror or exc,
                     "the datagram is dropped" if proto == "udp" else "the connection is closed")
        raise DialFailed("fd_limit", None) from None


def _passive_failure(snap, member: Member, metrics, reason: str) -> None:
    """A connect failed in live traffic: counts towards `health.passive_fall`."""
    transition = member.record_passive(False, snap.config.health.passive_fall, reason)
    if transition is not None:
        report_health(snap.topology, member, metrics)


def _passive_success(topo, member: Member, metrics) -> None:
    if member.record_passive(True, 0, "connected") is not None:
        report_health(topo, member, metrics)


def report_health(topo, member: Member, metrics) -> None:
    up = member.health.up
    metrics.backend_health.labels(topo.pool_of(member), member.id).set(1 if up else 0)
    log_transition(f"health-{member.id}", "up" if up else "down",
                   "backend %s (%s) is %s: %s", member.id, member.spec.address,
                   "up" if up else "down", member.health.reason)
