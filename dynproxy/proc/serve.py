"""One serving process: its listeners, the snapshot they serve, reload and drain.

Each worker process runs one Server (proc.worker owns its loop and signals; the
master owns the rest). It loads nothing itself: it is handed ready Snapshots (rules
compiled and linted, config validated). Reload = swap one reference, after opening
any listener the new config adds; listeners it drops stop accepting and finish what
they carry. Shutdown = stop accepting, drain up to a deadline, close the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import gevent
from gevent.pool import Group

from dynproxy.net.state import Serving, Snapshot
from dynproxy.net.tcp import TcpProxy, open_tcp_listener
from dynproxy.net.tls_watch import CertWatcher
from dynproxy.net.udp import UdpProxy
from dynproxy.net.udp_listen import open_udp_socket

log = logging.getLogger("dynproxy.serve")

DRAIN_POLL = 0.05  # seconds between looks at the open-connection count while draining
Key = tuple[str, str, int]  # (proto, host, port) of a listener


class Server:
    """Owns every listener and background greenlet of one process."""

    def __init__(self, snapshot: Snapshot, metrics, *, reuse_port: bool = False,
                 jobs=None, report_lifecycle: bool = True):
        self.serving = Serving(snapshot)
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.jobs = jobs  # health checks, Redis watchers (None in workers: the master runs them)
        self.cert_watcher = CertWatcher(metrics)  # certificate files replaced on disk
        self.report_lifecycle = report_lifecycle  # workers leave the gauge to the master
        self.tcp: dict[Key, TcpProxy] = {}
        self.udp: dict[Key, UdpProxy] = {}
        self.retired_tcp: list[TcpProxy] = []  # stopped accepting, still carrying connections
        self.background = Group()
        self.state = "starting"
        self.stopped = False

    # starting ----------------------------------------------------------------------
    def open_listeners(self) -> None:
        """Bind everything first, so a taken port fails the start before serving."""
        tcp, udp = self._open_missing(self.serving.current)
        self.tcp.update(tcp)
        self.udp.update(udp)

    def start(self) -> None:
        for proxy in self._listeners():
            proxy.start()
        self.cert_watcher.start(self.serving)
        if self.jobs is not None:
            self.jobs.start(self.serving)
        self.set_state("serving")

    def set_state(self, state: str) -> None:
        self.state = state
        if self.report_lifecycle:
            self.metrics.set_lifecycle_state(state)
        log.info("state: %s", state, extra={"state": state})

    def _listeners(self) -> list:
        return [*self.tcp.values(), *self.udp.values()]

    def _open_missing(self, snapshot: Snapshot) -> tuple[dict, dict]:
        """Listeners `snapshot` asks for that are not open yet; all or none (BindError)."""
        cfg = snapshot.config.server
        tcp: dict[Key, TcpProxy] = {}
        udp: dict[Key, UdpProxy] = {}
        try:
            for bind in cfg.tcp_bind:
                key = ("tcp", bind.host, bind.port)
                if key not in self.tcp and key not in tcp:
                    tcp[key] = self._open_tcp(bind, cfg)
            for lst in cfg.udp_bind:
                key = ("udp", lst.bind.host, lst.bind.port)
                if key not in self.udp and key not in udp:
                    udp[key] = self._open_udp(lst, cfg)
        except BaseException:
            for proxy in [*tcp.values(), *udp.values()]:
                proxy.kill_all(timeout=0)
                proxy.stop_accepting()
            raise
        return tcp, udp

    def _open_tcp(self, bind, cfg) -> TcpProxy:
        sock = open_tcp_listener(bind.host, bind.port, cfg.backlog, self.reuse_port)
        name = listener_name("tcp", bind.host, sock.getsockname()[1])
        return TcpProxy(sock, name, self.serving, self.metrics, cfg.max_connections)

    def _open_udp(self, lst, cfg) -> UdpProxy:
        sock = open_udp_socket(lst.bind.host, lst.bind.port, self.reuse_port)
        name = listener_name("udp", lst.bind.host, sock.getsockname()[1])
        return UdpProxy(sock, name, self.serving, self.metrics,
                        lst.session_idle or cfg.timeouts.udp_session_idle,
                        lst.max_sessions or cfg.udp_max_sessions)

    # reload ------------------------------------------------------------------------------
    def swap(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from now on. New listeners are opened first (BindError leaves
        everything as it was); listeners it no longer names stop accepting and finish
        their connections; the others keep their sockets, connections and sessions."""
        tcp, udp = self._open_missing(snapshot)
        before = self.serving.current.topology
        self.serving.swap(snapshot)
        _fresh_health_series(before, snapshot.topology, self.metrics)
        for proxy in [*tcp.values(), *udp.values()]:
            proxy.start()
        self.tcp.update(tcp)
        self.udp.update(udp)
        self._retire_dropped(snapshot)
        self.cert_watcher.reconfigure(self.serving)
        if self.jobs is not None:
            self.jobs.reconfigure(self.serving)
        self.metrics.config_generation.set(snapshot.generation)

    def _retire_dropped(self, snapshot: Snapshot) -> None:
        self.retired_tcp = [p for p in self.retired_tcp if p.connections]
        cfg = snapshot.config.server
        keep_tcp = {("tcp", b.host, b.port) for b in cfg.tcp_bind}
        keep_udp = {("udp", lst.bind.host, lst.bind.port) for lst in cfg.udp_bind}
        for key in [k for k in self.tcp if k not in keep_tcp]:
            proxy = self.tcp.pop(key)
            proxy.stop_accepting()
            self.retired_tcp.append(proxy)
            log.info("listener %s closed; its %d connection(s) finish", proxy.name,
                     proxy.connections)
        for key in [k for k in self.udp if k not in keep_udp]:
            proxy = self.udp.pop(key)
            proxy.stop_accepting()
            self.background.spawn(_close_when_idle, proxy)
            log.info("listener %s takes no new sessions; it closes when its %d session(s) "
                     "end", proxy.name, proxy.sessions)

    # stopping ------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        for proxy in self._listeners():
            proxy.stop_accepting()

    def open_connections(self) -> int:
        """TCP connections still open. UDP sessions are not waited for: a session has
        no end but silence, so they keep relaying during the drain and close with it."""
        return sum(p.connections for p in [*self.tcp.values(), *self.retired_tcp])

    def drain(self, timeout: float, interrupted: Callable[[], bool]) -> None:
        """Stop accepting now; let connections finish up to `timeout` seconds or until
        `interrupted()` says to hurry; then cut the rest (stop_fast)."""
        self.set_state("draining")
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        log.info("stopped accepting; draining %d connection(s) for up to %ss",
                 self.open_connections(), timeout, extra={"event": "draining"})
        why = f"the drain timeout ({timeout:g}s) passed"
        while self.open_connections() and time.monotonic() < deadline:
            if interrupted():
                log.warning("told to hurry during the drain: closing everything now")
                why = "told to hurry"
                break
            gevent.sleep(DRAIN_POLL)
        self.stop_fast(why)

    def stop_fast(self, why: str = "fast stop") -> None:
        """Cut every connection now: relayed ones with RST, so a client cannot take the
        cut for a complete response (TcpProxy.kill_all); close UDP sessions."""
        if self.stopped:
            return
        self.set_state("stopping")
        self.stop_accepting()
        left = self.open_connections()
        if left:
            log.warning("%s: closing %d connection(s) still open; relayed ones with a "
                        "reset (RST), so their clients see the stream cut, not ended", why, left,
                        extra={"event": "connections_cut", "connections": left})
        self.background.kill(block=False)
        self.cert_watcher.stop()
        for proxy in [*self._listeners(), *self.retired_tcp]:
            proxy.kill_all(timeout=0.5)
        if self.jobs is not None:
            self.jobs.stop()
        self.stopped = True


def _close_when_idle(proxy: UdpProxy) -> None:
    while proxy.sessions:
        gevent.sleep(1.0)
    proxy.kill_all()


def listener_name(proto: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else (host or "0.0.0.0")
    return f"{proto}:{shown}:{port}"


def _fresh_health_series(before, after, metrics) -> None:
    """A member a reload adds to a pool (or brings back) starts with its state now: its
    proxy_backend_health series must not keep the value of an earlier life (a worker's
    multiprocess file cannot forget a series, only overwrite it)."""
    had = {(name, m.id) for name, pool in before.pools.items() for m in pool.members}
    for name, pool in after.pools.items():
        for member in pool.members:
            if (name, member.id) not in had:
                metrics.backend_health.labels(name, member.id).set(int(member.health.up))
