"""UDP listeners: a session per client address, relaying datagrams to one upstream.

The first datagram from a client address is routed (rules, plugins, balancer) and
gets a connected upstream socket of its own; later datagrams from that address go to
it, and everything the upstream sends back goes to the client through the listener
socket (any number of replies per datagram). A session ends when idle longer than
the listener's `session_idle` (end "timeout", as a TCP idle timeout), when the table is full and it is the least
recently active (end "evicted"), when the upstream refuses (ICMP port unreachable: a
passive health failure), or at shutdown; each end writes one access-log line and adds
the session's counts to the metrics. A first datagram for which no upstream socket
can be made (the process is out of descriptors) is dropped with end "fd_limit" and
touches no member's health.

Per datagram this does one dict lookup and one send, nothing else that allocates:
counts are plain ints on the session, the clock is read once per batch, and the
session table (kept in activity order for expiry and eviction) is touched at most
once per `idle / TOUCH_DIVISOR` per session. One greenlet per listener reads the
listener socket in batches; replies are relayed by a hub io-watcher callback per
session (no greenlet per session); one greenlet per listener expires sessions. Nothing here may block the hub:
every socket is non-blocking, and a full socket buffer drops the datagram (counted).
"""

from __future__ import annotations

import logging
import socket
from time import monotonic

import gevent

from dynproxy.core.router import ConnInfo
from dynproxy.core.udp_sessions import SessionTable
from dynproxy.net.dial import DialFailed, _hash_key, new_socket, report_health, resolve
from dynproxy.net.routing import route
from dynproxy.net.state import Serving
from dynproxy.obs.log import access_log, log_once_per
from dynproxy.obs.metrics_batch import Sampler

log = logging.getLogger("dynproxy.udp")

MAX_DATAGRAM = 65535  # largest UDP payload (IPv6 without jumbograms)
BATCH = 256  # datagrams handled per wake before letting other sockets have a turn
TOUCH_DIVISOR = 8  # the table's activity order is exact to within idle / this
REFUSAL_TTL = 1.0  # seconds a rejected (or backend-less) source is dropped unrouted
REFUSAL_MAX = 4096  # sources remembered; the memory is cleared rather than grown
MIN_SLEEP = 0.001


class UdpSession:
    """One client address and its upstream socket; counts are summed at its end, and
    `counted_up`/`counted_down` are the bytes already in the byte counters while open."""

    __slots__ = ("addr", "sock", "send", "recv", "watcher", "member", "snap", "rule",
                 "start", "last", "touch_due", "up", "down", "datagrams_up",
                 "datagrams_down", "answered", "counted_up", "counted_down")

    def __init__(self, addr, sock, member, snap, rule: str | None, now: float):
        self.addr, self.sock, self.member, self.snap, self.rule = addr, sock, member, snap, rule
        self.send, self.recv = sock.send, sock.recv  # bound once, used per datagram
        self.watcher = None
        self.start = self.last = self.touch_due = now
        self.up = self.down = self.datagrams_up = self.datagrams_down = 0
        self.counted_up = self.counted_down = 0
        self.answered = False


class UdpProxy:
    """One UDP listener socket, its session table, and its two greenlets."""

    def __init__(self, sock: socket.socket, name: str, serving: Serving, metrics,
                 session_idle: float, max_sessions: int):
        self.name = name
        self.serving = serving
        self.metrics = metrics
        self._owner = sock  # closing the caller's object closes the socket
        self._sock = getattr(sock, "_sock", sock)  # under gevent's wrapper, the C socket
        self._sock.setblocking(False)
        self._sendto = self._sock.sendto
        self.port = self._sock.getsockname()[1]
        self._v6 = self._sock.family == socket.AF_INET6
        self._table: SessionTable[UdpSession] = SessionTable(max_sessions, session_idle)
        self._by_addr: dict[tuple, UdpSession] = {}  # the hot path's one lookup
        self._idle = session_idle
        self._slack = session_idle / TOUCH_DIVISOR
        self._accepting = True
        self._refused: dict[str, tuple[float, object]] = {}  # src ip -> (until, counter)
        self._refused_snap = None
        self._loop = gevent.get_hub().loop
        self._greenlets: list[gevent.Greenlet] = []
        self._bind_metrics(metrics, name)
        self._open_bytes = Sampler(self._loop, self._count_open_bytes)

    def _bind_metrics(self, m, name: str) -> None:
        self._m_sessions = m.udp_sessions.labels(name)
        self._m_evicted = m.udp_sessions_evicted_total.labels(name)
        self._m_conn = m.connections_total.labels("udp", name)
        self._m_up = m.bytes_transferred_total.labels("up", "udp")
        self._m_down = m.bytes_transferred_total.labels("down", "udp")
        self._m_duration = m.request_duration_seconds.labels("udp")
        drop = m.errors_total.labels
        self._m_drop_rejected = drop("udp_rejected")
        self._m_drop_no_backend = drop("udp_no_backend")
        self._m_drop_connect_failed = drop("udp_connect_failed")
        self._m_drop_fd_limit = drop("udp_fd_limit")
        self._m_drop_not_accepting = drop("udp_not_accepting")
        self._m_upstream_full = drop("udp_upstream_full")
        self._m_client_full = drop("udp_client_full")

    # lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._greenlets = [gevent.spawn(self._read_loop), gevent.spawn(self._expire_loop)]

    def stop_accepting(self) -> None:
        """Create no new sessions; existing ones relay until they expire or kill_all."""
        self._accepting = False

    def kill_all(self, timeout: float = 1.0) -> None:
        """End every session now and close the listener socket."""
        gevent.killall(self._greenlets, timeout=timeout)
        self._open_bytes.stop()
        for _, sess in self._table.pop_all():
            self._close(sess, "shutdown")
        self._refused.clear()
        self._owner.close()

    @property
    def sessions(self) -> int:
        return len(self._by_addr)

    # client -> upstream ---------------------------------------------------------------
    def _read_loop(self) -> None:
        hub = gevent.get_hub()
        readable = self._loop.io(self._sock.fileno(), 1)
        try:
            while True:
                hub.wait(readable)
                self._drain()
        finally:
            readable.close()

    def _drain(self) -> None:
        recvfrom, sessions, now = self._sock.recvfrom, self._by_addr, monotonic()
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                return self._listener_error(exc)
            sess = sessions.get(addr)
            if sess is None:
                self._first_datagram(addr, data, now)
                continue
            try:
                sess.send(data)
            except OSError as exc:
                self._send_up_failed(sess, exc)
                continue
            sess.up += len(data)
            sess.datagrams_up += 1
            sess.last = now
            if now >= sess.touch_due:
                self._touch(sess, now)

    def _first_datagram(self, addr, data: bytes, now: float) -> None:
        if not self._accepting:
            self._m_drop_not_accepting.inc()
            return
        snap = self.serving.current
        refused = self._refused_until(addr[0], snap)
        if refused is not None and refused[0] > now:
            refused[1].inc()
            return
        try:
            sess = self._open_session(snap, addr, now)
        except Exception as exc:  # noqa: BLE001 - one client must never stop the listener
            self.metrics.errors_total.labels("internal").inc()
            log_once_per("udp-internal", 10.0, "UDP session for %s failed: %r",
                         self._client(addr), exc)
            return
        if sess is None:
            return
        self._by_addr[addr] = sess
        self._open_bytes.wake()
        evicted = self._table.add(addr, sess, now)
        if evicted is not None:
            self._m_evicted.inc()
            self._close(evicted[1], "evicted")
        try:
            sess.send(data)
        except OSError as exc:
            return self._send_up_failed(sess, exc)
        sess.up, sess.datagrams_up = len(data), 1

    def _send_up_failed(self, sess: UdpSession, exc: OSError) -> None:
        if isinstance(exc, BlockingIOError):
            self._m_upstream_full.inc()  # socket buffer full: drop, as the network would
        else:
            self._upstream_failed(sess, exc)

    def _listener_error(self, exc: OSError) -> None:
        self.metrics.errors_total.labels("udp_listener").inc()
        log_once_per(f"udp-listener-{self.name}", 10.0, "UDP listener %s: recvfrom failed: %s",
                     self.name, exc)
        gevent.sleep(0.01)  # an error that persists must not spin this greenlet

    # opening a session -----------------------------------------------------------------
    def _open_session(self, snap, addr, now: float) -> UdpSession | None:
        conn = ConnInfo("udp", addr[0], self.port, None, ())
        decision = route(snap, conn, self.metrics)
        rule = decision.rule.where if decision.rule is not None else None
        if decision.rejects:
            return self._refuse(addr, rule, None, "rejected", now, self._m_drop_rejected)
        topo = snap.topology
        member = next(topo.candidates(decision, _hash_key(decision, conn, topo), 1), None)
        if member is None:
            self.metrics.errors_total.labels("no_backend").inc()
            return self._refuse(addr, rule, None, "no_backend", now, self._m_drop_no_backend)
        try:
            sock = self._connect(member)
        except DialFailed:  # out of descriptors: ours to fix, not the member's (new_socket)
            return self._refuse(addr, rule, None, "fd_limit", now, self._m_drop_fd_limit)
        if sock is None:
            self._passive_failure(snap, member, "udp socket failed")
            return self._refuse(addr, rule, member.id, "connect_failed", now,
                                self._m_drop_connect_failed)
        member.active += 1
        sess = UdpSession(addr, sock, member, snap, rule, now)
        sess.touch_due = now + self._slack  # the table learns `now` when this is added
        sess.watcher = self._loop.io(sock.fileno(), 1)
        sess.watcher.start(self._on_reply, sess)
        self._m_sessions.inc()
        self._m_conn.inc()
        return sess

    def _connect(self, member):
        """A connected upstream socket; None when the member's address fails (counted,
        logged); DialFailed when the process cannot make a socket at all."""
        spec = member.spec
        try:
            family, sockaddr = resolve(spec.host, spec.port)
            sock = new_socket(family, socket.SOCK_DGRAM, "udp", self.metrics)
            try:
                sock.setblocking(False)
                sock.connect(sockaddr)  # UDP: sets the peer, sends nothing
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            self.metrics.errors_total.labels("connect_failed").inc()
            log_once_per(f"udp-connect-{member.id}", 10.0, "UDP socket to %s (%s) failed: %s",
                         member.id, spec.address, exc)
            return None
        return sock

    def _refuse(self, addr, rule, backend, end: str, now: float, counter) -> None:
        """Drop this datagram, and for REFUSAL_TTL every datagram from that source
        without routing it again: a flood from one rejected source stays cheap."""
        refused = self._refused
        if len(refused) >= REFUSAL_MAX:
            refused.clear()
        refused[addr[0]] = (now + REFUSAL_TTL, counter)
        counter.inc()
        self.metrics.requests_total.labels("udp", end).inc()
        access_log(client=self._client(addr), listener=self.name, proto="udp", sni=None,
                   rule=rule, backend=backend, bytes_up=0, bytes_down=0, duration_ms=0.0,
                   end=end)
        return None

    def _refused_until(self, ip: str, snap):
        if snap is not self._refused_snap:  # new rules: every source gets a fresh decision
            self._refused.clear()
            self._refused_snap = snap
        return self._refused.get(ip)

    # upstream -> client (hub callbacks: must never block or raise) ---------------------
    def _on_reply(self, sess: UdpSession) -> None:
        # One datagram per call: the watcher is level-triggered, so the loop calls
        # again while more wait, and most upstreams answer once, so draining to EAGAIN
        # would add a failing recv (a syscall) to nearly every round trip.
        try:
            data = sess.recv(MAX_DATAGRAM)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._upstream_failed(sess, exc)
        try:
            self._sendto(data, sess.addr)
        except OSError as exc:
            self._send_down_failed(exc)
        else:
            sess.down += len(data)
            sess.datagrams_down += 1
        now = monotonic()
        sess.last = now
        if now >= sess.touch_due:
            self._touch(sess, now)
        if not sess.answered:
            self._first_answer(sess)

    def _send_down_failed(self, exc: OSError) -> None:
        self._m_client_full.inc()  # the client's side is full or gone: drop, never wait
        if not isinstance(exc, BlockingIOError):
            log_once_per(f"udp-sendto-{self.name}", 10.0,
                         "UDP listener %s: reply to a client failed: %s", self.name, exc)

    def _first_answer(self, sess: UdpSession) -> None:
        sess.answered = True
        health = sess.member.health
        if health.passive_failures or not health.up:
            if sess.member.record_passive(True, 0, "udp reply") is not None:
                report_health(sess.snap.topology, sess.member, self.metrics)

    def _upstream_failed(self, sess: UdpSession, exc: OSError) -> None:
        if isinstance(exc, ConnectionRefusedError):  # ICMP port unreachable
            self.metrics.errors_total.labels("udp_refused").inc()
            self._passive_failure(sess.snap, sess.member, "udp port unreachable")
            end = "connect_failed" if not sess.datagrams_down else "reset"
        else:
            self.metrics.errors_total.labels("udp_upstream").inc()
            log_once_per(f"udp-upstream-{sess.member.id}", 10.0, "UDP upstream %s (%s): %s",
                         sess.member.id, sess.member.spec.address, exc)
            end = "error"
        self._table.remove(sess.addr)
        self._close(sess, end, str(exc.strerror or exc))

    def _passive_failure(self, snap, member, reason: str) -> None:
        """Live traffic failed on `member`: counts towards `health.passive_fall`."""
        if member.record_passive(False, snap.config.health.passive_fall, reason) is not None:
            report_health(snap.topology, member, self.metrics)

    # activity, expiry, ending -----------------------------------------------------------
    def _touch(self, sess: UdpSession, now: float) -> None:
        self._table.touch(sess.addr, now)
        sess.touch_due = now + self._slack

    def _expire_loop(self) -> None:
        table = self._table
        while True:
            due = table.next_expiry()
            # An empty table may sleep a full timeout: nothing added later ends sooner.
            gevent.sleep(self._idle if due is None else max(due - monotonic(), MIN_SLEEP))
            self._expire(monotonic())

    def _expire(self, now: float) -> None:
        """End sessions idle past the timeout; the table's times may lag the truth by
        up to the touch slack, so sessions active since go back in, in activity order."""
        deadline = now - self._idle
        still_active = []
        for _, sess in self._table.expire(now):
            if sess.last >= deadline:
                still_active.append(sess)
            else:
                self._close(sess, "timeout")
        still_active.sort(key=_last_active)
        for sess in still_active:
            self._table.add(sess.addr, sess, sess.last)
            sess.touch_due = sess.last + self._slack

    def _close(self, sess: UdpSession, end: str, detail: str | None = None) -> None:
        """Release a session already out of the table: socket, counts, log line."""
        self._by_addr.pop(sess.addr, None)
        sess.watcher.stop()
        sess.watcher.close()
        sess.sock.close()
        sess.member.active -= 1
        self._m_sessions.dec()
        self._report(sess, end, detail)

    def _report(self, sess: UdpSession, end: str, detail: str | None) -> None:
        duration = monotonic() - sess.start
        self.metrics.requests_total.labels("udp", end).inc()
        if sess.up > sess.counted_up:  # the rest: the sampler counted the first part
            self._m_up.inc(sess.up - sess.counted_up)
        if sess.down > sess.counted_down:
            self._m_down.inc(sess.down - sess.counted_down)
        self._m_duration.observe(duration)
        extra = {"detail": detail} if detail else {}
        access_log(client=self._client(sess.addr), listener=self.name, proto="udp", sni=None,
                   rule=sess.rule, backend=sess.member.id, bytes_up=sess.up,
                   bytes_down=sess.down, duration_ms=duration * 1000, end=end,
                   datagrams_up=sess.datagrams_up, datagrams_down=sess.datagrams_down,
                   **extra)

    def _count_open_bytes(self) -> bool:
        """Once a second: add what each open session moved since the last count to the
        byte counters, so a steady stream (which never goes idle) shows while it lasts;
        _report adds the rest. False when no session is open."""
        up = down = 0
        for sess in self._by_addr.values():
            if sess.up > sess.counted_up:
                up += sess.up - sess.counted_up
                sess.counted_up = sess.up
            if sess.down > sess.counted_down:
                down += sess.down - sess.counted_down
                sess.counted_down = sess.down
        if up:
            self._m_up.inc(up)
        if down:
            self._m_down.inc(down)
        return bool(self._by_addr)

    def _client(self, addr) -> str:
        return f"[{addr[0]}]:{addr[1]}" if self._v6 else f"{addr[0]}:{addr[1]}"


def _last_active(sess: UdpSession) -> float:
    return sess.last
