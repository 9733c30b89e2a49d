"""TCP listeners and the life of one proxied TCP connection (gevent, monkey-patched).

accept -> peek the ClientHello (only if some rule needs SNI/ALPN) -> decide ->
reject, or pick a member and connect (next member on failure, within the connect
budget) -> PROXY header -> peeked bytes -> relay both ways -> one access-log line.

The handshake runs in a long-lived worker greenlet of the listener's `Acceptor`
(net/tcp_accept.py); the relay then runs in hub callbacks (net/relay.py) and the
worker goes back to take the next connection, so an idle proxied connection holds no
greenlet. A connection terminating TLS, or re-encrypting to a `tls` backend, keeps its
worker until it ends. Nothing here may block the hub; every wait has a deadline.

Per connection, the hot path allocates and calls as little as it can: raw non-blocking
sockets (no gevent wrapper), one recv attempt into a shared buffer before any timer is
armed, metrics as plain-number cells pushed at most ten times a second
(obs/metrics_batch), and the access-log line from one f-string, written in a batch
right after the metrics it implies (obs/log.ACCESS_LINES). The bytes of open relays
are read once a second, not per read, so a long-lived stream shows in the byte
counters while it lasts.
"""

from __future__ import annotations

import logging
import socket
import time

from gevent import socket as gsocket

from dynproxy.core.clienthello import ClientHello, ClientHelloParser, Malformed, NeedMore
from dynproxy.core.proxyproto import encode_v1, encode_v2
from dynproxy.core.router import ConnInfo
from dynproxy.net.dial import DialFailed, dial_raw, wait_ready
from dynproxy.net.relay import Relay
from dynproxy.net.relay_pools import PIPES, WATCHERS
from dynproxy.net.routing import route_facts
from dynproxy.net.state import Serving
from dynproxy.net.tcp_accept import Acceptor
from dynproxy.net.tcp_conn import ConnStats
from dynproxy.net.tcp_listen import BindError, connection_budget, open_tcp_listener
from dynproxy.net.tls_stream import TlsStream, relay_streams
from dynproxy.obs.log import ACCESS_LINES, json_text, log_once_per
from dynproxy.obs.metrics_batch import Sampler

__all__ = ["BindError", "ConnStats", "TcpProxy", "connection_budget", "host_port",
           "open_tcp_listener", "proxy_header"]

log = logging.getLogger("dynproxy.tcp")
PEEK_MAX = 65536
_TLS_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello record
# One peek buffer per process: a recv into it is copied out before anything can yield.
_PEEK_VIEW = memoryview(bytearray(PEEK_MAX))
_JSON_CACHE_MAX = 4096
_INFO_CACHE_MAX = 4096


class TcpProxy:
    """One listening socket, its accept loop and worker greenlets, and its connections."""

    def __init__(self, sock: socket.socket, name: str, serving: Serving, metrics,
                 max_connections: int):
        self.name = name
        self.serving = serving
        self.metrics = metrics
        self.max_connections = connection_budget(max_connections, name)
        self.port = sock.getsockname()[1]
        self.acceptor = Acceptor(sock, self._connection, self.max_connections,
                                 self._limit_reached, self._out_of_fds)
        self.loop = self.acceptor.loop
        self.relays: set[ConnStats] = set()  # connections whose relay runs in the hub
        # connections relayed in their greenlet (TLS) -> their live byte counts
        self.streams: dict[ConnStats, object] = {}
        self._listener_json = json_text(name)
        self._json: dict[str | None, str] = {}
        self._infos: dict[object, ConnInfo] = {}
        batch = metrics.batch
        batch.bind(self.loop)
        batch.after_flush(ACCESS_LINES.flush)
        self._m_conn = batch.cell(metrics.connections_total, "tcp", name)
        self._m_active = batch.cell(metrics.active_connections, "tcp")
        self._m_duration = batch.cell(metrics.request_duration_seconds, "tcp")
        self._m_up = batch.cell(metrics.bytes_transferred_total, "up", "tcp")
        self._m_down = batch.cell(metrics.bytes_transferred_total, "down", "tcp")
        self._m_ends: dict[str, object] = {}  # proxy_requests_total cell by how it ended
        self._open_bytes = Sampler(self.loop, self._count_open_bytes)
        PIPES.on_refused = metrics.errors_total.labels("fd_limit").inc  # one per process

    @property
    def connections(self) -> int:
        """Connections open now (handshaking or relaying)."""
        return self.acceptor.open

    def start(self) -> None:
        self.acceptor.start()

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on."""
        self.acceptor.close()

    def kill_all(self, timeout: float = 1.0) -> None:
        """End every connection now (a fast stop, or what outlived the drain), then push
        the metrics and log lines. Relayed connections are cut with RST (SO_LINGER 0),
        not FIN, on both sides: a peer must not take a cut stream for a complete one.
        Their access lines and proxy_requests_total say `shutdown`."""
        for conn in list(self.relays):
            relay = conn.relay
            if relay is not None:
                relay.abort("shutdown", reset=True)
                conn.relayed(relay)
        for conn, counts in self.streams.items():  # relayed in workers: reset as they die
            counts.reset_on_close()
            conn.end = "shutdown"
        self._open_bytes.stop()
        self.acceptor.kill_workers(timeout)
        self.metrics.batch.flush()

    # the connection, step by step (in a worker greenlet) --------------------------------
    def _connection(self, sock, addr) -> None:
        """Serve one connection until the relay takes it over or it ends; never raises
        but GreenletExit (a kill), after cleaning up."""
        self._m_conn.inc()
        self._m_active.inc()
        conn = ConnStats(self, sock, addr)
        handed = False
        try:
            handed = self._serve(conn)
        except Exception as exc:  # noqa: BLE001 - one connection must never kill a worker
            conn.end = "error"
            self.metrics.errors_total.labels("internal").inc()
            log_once_per(f"tcp-internal-{type(exc).__name__}", 10.0,
                         "connection failed unexpectedly: %r", exc)
        finally:
            if not handed:
                conn.close()
                self.finish(conn)

    def _serve(self, conn: ConnStats) -> bool:
        """True once a relay owns the connection (it calls conn.relayed at the end)."""
        snap = self.serving.current  # this connection keeps this snapshot throughout
        initial = b""
        if snap.needs_peek:
            initial = self._peek_hello(conn, snap.config.server.timeouts.client_hello)
            if initial is None:
                return False
        info = self._conn_info(conn.addr[0], conn.sni, conn.alpn)
        facts = route_facts(snap, info, self.metrics)
        decision = facts.decision
        conn.rule = facts.where
        if decision.action == "reject":
            conn.end = "rejected"
            return False
        if decision.terminate is not None and snap.tls is not None:
            from dynproxy.net.terminate import serve_terminated

            client = self._blocking_style(conn)
            serve_terminated(self, snap, client, conn.addr, info, decision, initial, conn)
            return False
        return self._forward(snap, conn, info, facts, initial)

    def _forward(self, snap, conn: ConnStats, info, facts, initial) -> bool:
        try:
            member, upstream, writer = dial_raw(snap, facts.decision, info, self.metrics,
                                                facts.hashed)
        except DialFailed as failed:
            conn.end, conn.backend = failed.end, failed.backend
            return False
        conn.member, conn.backend = member, member.id
        conn.upstream = upstream
        member.connections.add(conn)  # closed by it if the member leaves (close_removed)
        header = proxy_header(member.spec.send_proxy, conn.sock, conn.addr)
        conn.header = len(header)
        cfg = snap.config.server
        if isinstance(upstream, TlsStream):  # re-encrypted: copy through its SSL object
            self._relay_blocking(conn, header + initial, cfg)
            return False
        conn.relay = relay = Relay(
            conn.sock, upstream, idle_timeout=cfg.timeouts.idle, buffer_size=cfg.buffer_size,
            copy_first=True, on_done=conn.relayed, client_reader=conn.reader,
            upstream_writer=writer, loop=self.loop)
        conn.upstream = conn.reader = None  # the relay owns them now
        self.relays.add(conn)
        self._open_bytes.wake()
        relay.start(header + initial if header else initial)
        return True

    def _relay_blocking(self, conn: ConnStats, initial_up: bytes, cfg) -> None:
        client = self._blocking_style(conn)
        result = relay_streams(client, conn.upstream, initial_up=initial_up,
                               idle_timeout=cfg.timeouts.idle, buffer_size=cfg.buffer_size,
                               watch=self.watch_stream(conn))
        conn.up = max(0, result.bytes_up - conn.header)  # the header is ours
        conn.down, conn.end = result.bytes_down, result.end
        if result.end == "reset":
            self.metrics.errors_total.labels("reset").inc()

    @staticmethod
    def _blocking_style(conn: ConnStats):
        """The client as a gevent socket, for code written against blocking sockets."""
        if conn.reader is not None:  # a watcher must not outlive its fd's owner
            WATCHERS.give(conn.reader)
            conn.reader = None
        raw = conn.sock
        conn.sock = gsocket.socket(raw.family, socket.SOCK_STREAM, fileno=raw.detach())
        return conn.sock

    # peeking at the ClientHello ------------------------------------------------------------
    def _peek_hello(self, conn: ConnStats, timeout: float):
        """The peeked bytes, with SNI and ALPN noted on `conn`; None if the client reset."""
        try:
            initial, hello = self._peek(conn, timeout)
        except OSError:  # reset (or vanished) before its ClientHello ended
            conn.end = "reset"
            self.metrics.errors_total.labels("reset").inc()
            return None
        if hello is not None:
            conn.sni, conn.alpn = hello.sni, hello.alpn
        return initial

    def _peek(self, conn: ConnStats, timeout: float):
        """Read until the ClientHello is complete, clearly not TLS, or time is up.

        The first read is tried at once (the bytes usually came with the connection):
        no watcher or timer is armed unless it finds nothing.
        """
        try:
            got = conn.sock.recv_into(_PEEK_VIEW)
        except BlockingIOError:
            return self._peek_slowly(conn, timeout, ClientHelloParser(PEEK_MAX), bytearray())
        if not got:
            return b"", None
        data = bytes(_PEEK_VIEW[:got])
        if data[0] != _TLS_HANDSHAKE:  # the parser's own first test: not TLS
            return data, None
        parser = ClientHelloParser(PEEK_MAX)
        result = parser.feed(data)
        if isinstance(result, NeedMore):
            return self._peek_slowly(conn, timeout, parser, bytearray(data))
        return data, self._verdict(result)

    def _peek_slowly(self, conn: ConnStats, timeout: float, parser, buf: bytearray):
        deadline = conn.start + timeout
        sock, reader = conn.sock, conn.reader_watcher()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_ready(reader, remaining, self.loop):
                self.metrics.errors_total.labels("client_hello_timeout").inc()
                return bytes(buf), None
            try:
                got = sock.recv_into(_PEEK_VIEW[:PEEK_MAX - len(buf)])
            except BlockingIOError:
                continue
            if not got:
                if buf:  # EOF in the middle of what looked like a ClientHello
                    self._bad_hello("the client closed after %d bytes" % len(buf))
                return bytes(buf), None
            data = bytes(_PEEK_VIEW[:got])
            buf += data
            result = parser.feed(data)
            if not isinstance(result, NeedMore):
                return bytes(buf), self._verdict(result)

    def _verdict(self, result) -> ClientHello | None:
        if isinstance(result, ClientHello):
            return result
        if isinstance(result, Malformed):
            self._bad_hello(result.reason)
        return None  # NotTLS: route as plain TCP

    def _bad_hello(self, reason: str) -> None:
        self.metrics.errors_total.labels("bad_client_hello").inc()
        log_once_per("bad-client-hello", 10.0,
                     "malformed ClientHello, routed without SNI: %s", reason)

    # the end -------------------------------------------------------------------------------
    def finish(self, conn: ConnStats) -> None:
        """Count the connection's end, queue its access-log line, free its slot."""
        try:
            if self.streams:
                self.streams.pop(conn, None)
            member = conn.member
            if member is not None:
                member.active -= 1
                member.connections.discard(conn)
            duration = time.monotonic() - conn.start
            end = conn.end
            self._m_active.dec()
            ended = self._m_ends.get(end)
            if ended is None:
                ended = self._m_ends[end] = self.metrics.batch.cell(
                    self.metrics.requests_total, "tcp", end)
            ended.inc()
            if conn.up > conn.counted_up:  # the rest: the sampler counted the first part
                self._m_up.inc(conn.up - conn.counted_up)
            if conn.down > conn.counted_down:
                self._m_down.inc(conn.down - conn.counted_down)
            self._m_duration.observe(duration)
            if ACCESS_LINES.enabled():  # queued: written after the metrics are pushed
                ACCESS_LINES.tcp_line(time.time(), host_port(conn.addr), self._listener_json,
                                      conn.sni, self._text(conn.rule),
                                      self._text(conn.backend), conn.up, conn.down,
                                      duration, end)
                self.metrics.batch.touch()
        finally:
            self.acceptor.finished()

    def watch_stream(self, conn: ConnStats):
        """The `watch` for relay_streams: its counts join the byte sampler's round
        until the connection finishes."""
        def watch(counts) -> None:
            self.streams[conn] = counts
            self._open_bytes.wake()
        return watch

    def _count_open_bytes(self) -> bool:
        """Once a second: add what each open connection moved since the last count to
        the byte counters (finish() adds the rest). False when none is open."""
        up = down = 0
        for conn in self.relays:
            relay = conn.relay
            more_up, more_down = conn.uncounted(relay.up.moved, relay.down.moved)
            up += more_up
            down += more_down
        for conn, counts in self.streams.items():
            more_up, more_down = conn.uncounted(counts.up, counts.down)
            up += more_up
            down += more_down
        if up:
            self._m_up.inc(up)
        if down:
            self._m_down.inc(down)
        return bool(self.relays or self.streams)

    def _conn_info(self, src: str, sni: str | None, alpn: tuple) -> ConnInfo:
        """The routing facts of a connection; equal facts share one (frozen) object,
        made once per client address (and ClientHello), not once per connection."""
        key = src if sni is None and not alpn else (src, sni, alpn)
        info = self._infos.get(key)
        if info is None:
            if len(self._infos) >= _INFO_CACHE_MAX:
                self._infos.clear()
            info = self._infos[key] = ConnInfo("tcp", src, self.port, sni, alpn)
        return info

    def _text(self, value: str | None) -> str:
        """JSON text of a rule location or backend name, encoded once per value."""
        text = self._json.get(value)
        if text is None:
            if len(self._json) >= _JSON_CACHE_MAX:
                self._json.clear()
            text = self._json[value] = json_text(value)
        return text

    def _limit_reached(self) -> None:
        self.metrics.errors_total.labels("max_connections").inc()
        log_once_per(f"max-connections-{self.name}", 10.0,
                     "%s: %d connections open, the most it takes at once "
                     "(server.max_connections, or what the file descriptor limit allows): "
                     "new connections wait in the listen backlog", self.name,
                     self.max_connections)

    def _out_of_fds(self, exc: OSError, pause: float) -> None:
        self.metrics.errors_total.labels("fd_limit").inc()
        log_once_per(f"fd-limit-{self.name}", 10.0,
                     "%s: cannot accept: %s; pausing accepts for %.2fs (new connections wait "
                     "in the listen backlog). Raise the file descriptor limit (ulimit -n, "
                     "systemd LimitNOFILE=) or lower server.max_connections",
                     self.name, exc.strerror or exc, pause)


def host_port(addr) -> str:
    """`127.0.0.1:5000` or `[::1]:5000`: an IPv6 address in brackets, so the port is clear."""
    host = addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def proxy_header(version: str | None, client, addr) -> bytes:
    if version is None:
        return b""
    dst = client.getsockname()
    return encode_v1(addr, dst) if version == "v1" else encode_v2(addr, dst)
