"""TCP listeners and the life of one proxied TCP connection (gevent, monkey-patched).

accept -> peek the ClientHello (only if some rule needs SNI/ALPN) -> decide ->
reject, or pick a member and connect (next member on failure, within the connect
budget) -> PROXY header -> peeked bytes -> relay both ways -> one access-log line.
Each connection is one greenlet from the listener's bounded pool. Nothing here may
block the hub; every wait has a deadline.
"""

from __future__ import annotations

import errno
import logging
import socket
import time

from gevent.pool import Pool
from gevent.server import StreamServer

from dynproxy.core.clienthello import ClientHello, ClientHelloParser, Malformed, NeedMore
from dynproxy.core.decision import Decision
from dynproxy.core.proxyproto import encode_v1, encode_v2
from dynproxy.core.router import ConnInfo
from dynproxy.net.dial import DialFailed, dial
from dynproxy.net.relay import relay
from dynproxy.net.routing import route
from dynproxy.net.state import Serving
from dynproxy.obs.log import access_log, log_once_per

log = logging.getLogger("dynproxy.tcp")
PEEK_MAX = 65536


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
        self.pool = Pool(max_connections)
        self.server = StreamServer(sock, self.handle, spawn=self.pool)
        self.port = sock.getsockname()[1]
        self._m_conn = metrics.connections_total.labels("tcp", name)
        self._m_active = metrics.active_connections.labels("tcp")

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

    # the connection, step by step ---------------------------------------------------
    def _serve(self, client: socket.socket, addr, stats: ConnStats) -> None:
        snap = self.serving.current  # this connection keeps this snapshot throughout
        cfg = snap.config.server
        initial, hello = b"", None
        if snap.needs_peek:
            initial, hello = self._peek(client, cfg.timeouts.client_hello)
            if hello is not None:
                stats.sni, stats.alpn = hello.sni, hello.alpn
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
            result = relay(client, upstream, initial_up=header + initial,
                           idle_timeout=cfg.timeouts.idle, buffer_size=cfg.buffer_size)
            stats.up, stats.down, stats.end = result.bytes_up - len(header), result.bytes_down, \
                result.end
            if result.end == "reset":
                self.metrics.errors_total.labels("reset").inc()
        finally:
            member.active -= 1
            upstream.close()

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
                break
            buf += data
            result = parser.feed(data)
            if isinstance(result, ClientHello):
                client.settimeout(None)
                return bytes(buf), result
            if isinstance(result, Malformed):
                self.metrics.errors_total.labels("bad_client_hello").inc()
                log_once_per("bad-client-hello", 10.0,
                             "malformed ClientHello, routed without SNI: %s", result.reason)
                break
            if not isinstance(result, NeedMore):
                break  # NotTLS: route as plain TCP
        client.settimeout(None)
        return bytes(buf), None

    def _finish(self, addr, stats: ConnStats) -> None:
        m = self.metrics
        duration = time.monotonic() - stats.start
        m.requests_total.labels("tcp", stats.end).inc()
        if stats.up:
            m.bytes_transferred_total.labels("up", "tcp").inc(stats.up)
        if stats.down:
            m.bytes_transferred_total.labels("down", "tcp").inc(stats.down)
        m.request_duration_seconds.labels("tcp").observe(duration)
        access_log(client=f"{addr[0]}:{addr[1]}", listener=self.name, proto="tcp",
                   sni=stats.sni, rule=stats.rule, backend=stats.backend, bytes_up=stats.up,
                   bytes_down=stats.down, duration_ms=round(duration * 1000, 3), end=stats.end)


def proxy_header(version: str | None, client: socket.socket, addr) -> bytes:
    if version is None:
        return b""
    dst = client.getsockname()
    return encode_v1(addr, dst) if version == "v1" else encode_v2(addr, dst)


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
