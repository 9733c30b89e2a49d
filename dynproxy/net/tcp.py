"""TCP listeners and the life of one proxied TCP connection (gevent, monkey-patched).

accept -> peek the ClientHello (only if some rule needs SNI/ALPN) -> decide ->
reject, or pick a member and connect (next member on failure, within the connect
budget) -> PROXY header -> peeked bytes -> relay both ways -> one access-log line.
Each connection is one greenlet from the listener's bounded pool. Nothing here may
block the hub; every wait has a deadline.

Running out of file descriptors must degrade, never crash or spin: the pool is sized to
what RLIMIT_NOFILE allows (connections beyond it wait in the kernel's listen backlog),
and an accept that still fails for lack of descriptors pauses accepting with backoff,
counted and logged once per interval.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import sys
import time

from gevent.pool import Pool
from gevent.server import StreamServer

from dynproxy.core.clienthello import ClientHello, ClientHelloParser, Malformed, NeedMore
from dynproxy.core.decision import Decision
from dynproxy.core.proxyproto import encode_v1, encode_v2
from dynproxy.core.router import ConnInfo
from dynproxy.net.dial import DialFailed, dial
from dynproxy.net.relay import relay
from dynproxy.net.tls_stream import TlsStream, relay_streams
from dynproxy.net.routing import route
from dynproxy.net.state import Serving
from dynproxy.obs.log import access_log, log_once_per

log = logging.getLogger("dynproxy.tcp")
PEEK_MAX = 65536
# Descriptors per connection: the client and upstream sockets, plus a share of the
# splice pipes held while bytes are in flight; as HAProxy sizes them (maxpipes =
# maxconn / 4), 2.5 in all. The reserve covers what a worker opens besides connections.
FDS_PER_TWO_CONNECTIONS = 5
FD_RESERVE = 16
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ConnStats:
    """What the access log and metrics report for one connection."""

    __slots__ = ("start", "sni", "rule", "backend", "up", "down", "end", "alpn")

    def __init__(self):
        self.start = time.monotonic()
        self.sni = self.rule = self.backend = None
        self.alpn = ()
        self.up = self.down = 0
        self.end = "closed"


class TcpProxy:
    """One listening socket and its bounded pool of connection greenlets."""

    def __init__(self, sock: socket.socket, name: str, serving: Serving, metrics,
                 max_connections: int):
        self.name = name
        self.serving = serving
        self.metrics = metrics
        self.max_connections = connection_budget(max_connections, name)
        self.pool = Pool(self.max_connections)
        self.server = _Listener(sock, self.handle, self.pool, self._out_of_fds)
        self.port = sock.getsockname()[1]
        self._m_conn = metrics.connections_total.labels("tcp", name)
        self._m_active = metrics.active_connections.labels("tcp")
        self._m_full = metrics.errors_total.labels("max_connections")
        self._m_fds = metrics.errors_total.labels("fd_limit")

    def start(self) -> None:
        self.server.start()

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on."""
        self.server.close()

    def kill_all(self, timeout: float = 1.0) -> None:
        self.pool.kill(timeout=timeout, block=True)

    def handle(self, client: socket.socket, addr) -> None:
        self._m_conn.inc()
        self._m_active.inc()
        if self.pool.full():  # this one took the last slot: accepting pauses until one ends
            self._limit_reached()
        stats = ConnStats()
        try:
            self._serve(client, addr, stats)
        except Exception as exc:  # noqa: BLE001 - one connection must never kill a worker
            stats.end = "error"
            self.metrics.errors_total.labels("internal").inc()
            log_once_per(f"tcp-internal-{type(exc).__name__}", 10.0,
                         "connection failed unexpectedly: %r", exc)
        finally:
            client.close()
            self._m_active.dec()
            self._finish(addr, stats)

    def _limit_reached(self) -> None:
        self._m_full.inc()
        log_once_per(f"max-connections-{self.name}", 10.0,
                     "%s: %d connections open, the most it takes at once "
                     "(server.max_connections, or what the file descriptor limit allows): "
                     "new connections wait in the listen backlog", self.name,
                     self.max_connections)

    def _out_of_fds(self, exc: OSError, pause: float) -> None:
        self._m_fds.inc()
        log_once_per(f"fd-limit-{self.name}", 10.0,
                     "%s: cannot accept: %s; pausing accepts for %.2fs (new connections wait "
                     "in the listen backlog). Raise the file descriptor limit (ulimit -n, "
                     "systemd LimitNOFILE=) or lower server.max_connections",
                     self.name, exc.strerror or exc, pause)

    # the connection, step by step ---------------------------------------------------
    def _serve(self, client: socket.socket, addr, stats: ConnStats) -> None:
        snap = self.serving.current  # this connection keeps this snapshot throughout
        initial = b""
        if snap.needs_peek:
            initial = self._peek_hello(client, snap.config.server.timeouts.client_hello, stats)
            if initial is None:
                return
        conn = ConnInfo("tcp", addr[0], self.port, stats.sni, stats.alpn)
        decision = route(snap, conn, self.metrics)
        if decision.rule is not None:
            stats.rule = decision.rule.where
        if decision.rejects:
            stats.end = "rejected"
            return
        if decision.terminate is not None and snap.tls is not None:
            from dynproxy.net.terminate import serve_terminated

            serve_terminated(self, snap, client, addr, conn, decision, initial, stats)
            return
        self._forward(snap, client, addr, conn, decision, initial, stats)

    def _forward(self, snap, client, addr, conn, decision: Decision, initial, stats) -> None:
        cfg = snap.config.server
        try:
            member, upstream = dial(snap, decision, conn, self.metrics)
        except DialFailed as failed:
            stats.end, stats.backend = failed.end, failed.backend
            return
        stats.backend = member.id
        try:
            header = proxy_header(member.spec.send_proxy, client, addr)
            # a backend declared with `tls` is re-encrypted: copy through its SSL object
            pump = relay_streams if isinstance(upstream, TlsStream) else relay
            result = pump(client, upstream, initial_up=header + initial,
                          idle_timeout=cfg.timeouts.idle, buffer_size=cfg.buffer_size)
            # the header is ours, not the client's (and may not have gone out whole)
            stats.up = max(0, result.bytes_up - len(header))
            stats.down, stats.end = result.bytes_down, result.end
            if result.end == "reset":
                self.metrics.errors_total.labels("reset").inc()
        finally:
            member.active -= 1
            upstream.close()

    def _peek_hello(self, client: socket.socket, timeout: float, stats: ConnStats):
        """The peeked bytes, with SNI and ALPN noted in `stats`; None if the client reset."""
        try:
            initial, hello = self._peek(client, timeout)
        except OSError:  # reset (or vanished) before its ClientHello ended
            stats.end = "reset"
            self.metrics.errors_total.labels("reset").inc()
            return None
        if hello is not None:
            stats.sni, stats.alpn = hello.sni, hello.alpn
        return initial

    def _peek(self, client: socket.socket, timeout: float):
        """Read until the ClientHello is complete, clearly not TLS, or time is up."""
        parser = ClientHelloParser(PEEK_MAX)
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.metrics.errors_total.labels("client_hello_timeout").inc()
                break
            client.settimeout(remaining)
            try:
                data = client.recv(PEEK_MAX - len(buf))
            except socket.timeout:
                self.metrics.errors_total.labels("client_hello_timeout").inc()
                break
            if not data:
                if buf:  # EOF in the middle of what looked like a ClientHello
                    self._bad_hello("the client closed after %d bytes" % len(buf))
                break
            buf += data
            result = parser.feed(data)
            if isinstance(result, ClientHello):
                client.settimeout(None)
                return bytes(buf), result
            if isinstance(result, Malformed):
                self._bad_hello(result.reason)
                break
            if not isinstance(result, NeedMore):
                break  # NotTLS: route as plain TCP
        client.settimeout(None)
        return bytes(buf), None

    def _bad_hello(self, reason: str) -> None:
        self.metrics.errors_total.labels("bad_client_hello").inc()
        log_once_per("bad-client-hello", 10.0,
                     "malformed ClientHello, routed without SNI: %s", reason)

    def _finish(self, addr, stats: ConnStats) -> None:
        m = self.metrics
        duration = time.monotonic() - stats.start
        m.requests_total.labels("tcp", stats.end).inc()
        if stats.up:
            m.bytes_transferred_total.labels("up", "tcp").inc(stats.up)
        if stats.down:
            m.bytes_transferred_total.labels("down", "tcp").inc(stats.down)
        m.request_duration_seconds.labels("tcp").observe(duration)
        access_log(client=host_port(addr), listener=self.name, proto="tcp",
                   sni=stats.sni, rule=stats.rule, backend=stats.backend, bytes_up=stats.up,
                   bytes_down=stats.down, duration_ms=round(duration * 1000, 3), end=stats.end)


def host_port(addr) -> str:
    """`127.0.0.1:5000` or `[::1]:5000`: an IPv6 address in brackets, so the port is clear."""
    host = addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def proxy_header(version: str | None, client: socket.socket, addr) -> bytes:
    if version is None:
        return b""
    dst = client.getsockname()
    return encode_v1(addr, dst) if version == "v1" else encode_v2(addr, dst)


class _Listener(StreamServer):
    """gevent's StreamServer, except that an accept failing for lack of file descriptors
    pauses accepting with backoff and calls `on_exhausted(exc, pause)`, instead of
    printing a traceback per attempt. A connection ending resumes accepting at once
    (gevent relinks the pool's semaphore), since it just freed descriptors.
    """

    def __init__(self, sock: socket.socket, handle, pool: Pool, on_exhausted):
        super().__init__(sock, handle, spawn=pool)
        self._on_exhausted = on_exhausted

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in _FD_ERRNOS:
                raise
            pause = self.delay
            self._on_exhausted(exc, pause)
            # What gevent does after a failed accept (its `_timer` is cleared by
            # stop_accepting and close), minus the traceback: retry after `pause`.
            self.stop_accepting()
            self._timer = self.loop.timer(pause)
            self._timer.start(self._start_accepting_if_started)
            self.delay = min(self.max_delay, pause * 2)
            return None


def connection_budget(wanted: int, name: str) -> int:
    """How many connections at once the file descriptor limit allows, at most `wanted`.

    The soft limit is first raised toward the hard one as far as `wanted` needs (as
    HAProxy does); when even that is short, a warning says so once per listener and the
    pool is sized to fit, so extra clients wait in the backlog instead of failing.
    """
    used = _open_fds()
    needed = used + FD_RESERVE + (FDS_PER_TWO_CONNECTIONS * wanted + 1) // 2
    soft = _raise_soft_limit(needed)
    if soft >= needed:
        return wanted
    budget = max(1, 2 * (soft - used - FD_RESERVE) // FDS_PER_TWO_CONNECTIONS)
    log.warning("%s: the file descriptor limit (RLIMIT_NOFILE %d) allows about %d "
                "connections at once, not server.max_connections %d; more wait in the "
                "listen backlog. Raise it (ulimit -n, systemd LimitNOFILE=)",
                name, soft, budget, wanted)
    return budget


def _raise_soft_limit(needed: int) -> int:
    """The soft RLIMIT_NOFILE, raised to `needed` if below it and the hard limit allows
    (up to the hard limit otherwise); unlimited counts as plenty."""
    soft, hard = (_finite(v) for v in resource.getrlimit(resource.RLIMIT_NOFILE))
    if soft < needed:
        raised = min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, resource.getrlimit(
                resource.RLIMIT_NOFILE)[1]))
            soft = raised
        except (OSError, ValueError):
            pass
    return soft


def _finite(limit: int) -> int:
    return sys.maxsize if limit == resource.RLIM_INFINITY else limit


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a typical worker
        return 32


def open_tcp_listener(host: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    """A bound, listening socket; IPv6 literals get an AF_INET6 socket (v6 only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host or "0.0.0.0", port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError("tcp", host, port, exc) from None
    return sock


class BindError(Exception):
    """A listener could not be opened: says which address and why."""

    def __init__(self, proto: str, host: str, port: int, exc: OSError):
        what = {errno.EADDRINUSE: "the port is already in use",
                errno.EACCES: "permission denied (ports below 1024 need privileges)",
                errno.EADDRNOTAVAIL: "no such local address"}.get(exc.errno, str(exc))
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot listen on {proto} {shown}: {what}")
        self.proto, self.host, self.port, self.errno = proto, host, port, exc.errno
