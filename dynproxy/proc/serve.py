"""One serving process: listeners, the metrics endpoint, background jobs, signals.

Used directly with one worker, and by each worker process under the master. It
loads nothing itself: it is handed a ready Snapshot (rules compiled and linted,
config validated). Reload = build a new Snapshot off to the side and swap one
reference; shutdown = stop accepting, drain up to the timeout, close the rest.
Signal handlers only record the signal; the owner loop acts on it.
"""

from __future__ import annotations

import logging
import signal
import time

import gevent
from gevent.event import Event
from gevent.queue import Queue

from dynproxy.net.state import Serving, Snapshot
from dynproxy.net.tcp import TcpProxy, open_tcp_listener
from dynproxy.net.udp import UdpProxy, open_udp_socket

log = logging.getLogger("dynproxy.serve")


class Server:
    """Owns every listener and background greenlet of one process."""

    def __init__(self, snapshot: Snapshot, metrics, *, reuse_port: bool = False,
                 reloader=None, jobs=None):
        self.serving = Serving(snapshot)
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.reloader = reloader  # callable(previous Snapshot) -> Snapshot, raises on error
        self.jobs = jobs  # proc.jobs.Jobs: health checks, Redis watchers (may be None)
        self.tcp: list[TcpProxy] = []
        self.udp: list[UdpProxy] = []
        self.state = "starting"
        self.signals: Queue = Queue()
        self.stopped = Event()

    # starting ----------------------------------------------------------------------
    def open_listeners(self) -> None:
        """Bind everything first, so a taken port fails the start before serving."""
        cfg = self.serving.current.config.server
        for bind in cfg.tcp_bind:
            sock = open_tcp_listener(bind.host, bind.port, cfg.backlog, self.reuse_port)
            name = _listener_name("tcp", bind.host, sock.getsockname()[1])
            self.tcp.append(TcpProxy(sock, name, self.serving, self.metrics,
                                     cfg.max_connections))
        for lst in cfg.udp_bind:
            sock = open_udp_socket(lst.bind.host, lst.bind.port, self.reuse_port)
            name = _listener_name("udp", lst.bind.host, sock.getsockname()[1])
            self.udp.append(UdpProxy(sock, name, self.serving, self.metrics,
                                     lst.session_idle or cfg.timeouts.udp_session_idle,
                                     lst.max_sessions or cfg.udp_max_sessions))

    def start(self) -> None:
        for proxy in [*self.tcp, *self.udp]:
            proxy.start()
        if self.jobs is not None:
            self.jobs.start(self.serving)
        self._set_state("serving")

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.set_lifecycle_state(state)
        log.info("state: %s", state, extra={"state": state})

    # signals -------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            gevent.signal_handler(sig, self.signals.put, sig)

    def run_forever(self) -> int:
        """Dispatch signals until stopped; returns the exit code."""
        while not self.stopped.is_set():
            sig = self.signals.get()
            handler = {signal.SIGHUP: self.reload, signal.SIGQUIT: self.stop_fast}.get(
                sig, self.stop_graceful)
            handler()
        return 0

    # reload ------------------------------------------------------------------------------
    def reload(self) -> bool:
        if self.reloader is None:
            return False
        self._set_state("reloading")
        try:
            snapshot = self.reloader(self.serving.current)
        except Exception as exc:  # noqa: BLE001 - a bad reload keeps the old state
            self.metrics.reloads_total.labels("failed").inc()
            log.error("reload failed, still serving generation %d: %s",
                      self.serving.current.generation, exc)
            self._set_state("serving")
            return False
        self.serving.swap(snapshot)
        if self.jobs is not None:
            self.jobs.reconfigure(self.serving)
        self.metrics.reloads_total.labels("ok").inc()
        self.metrics.config_generation.set(snapshot.generation)
        log.info("reloaded: generation %d", snapshot.generation)
        self._set_state("serving")
        return True

    # stopping ------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        for proxy in [*self.tcp, *self.udp]:
            proxy.stop_accepting()

    def open_connections(self) -> int:
        """TCP connections still open. UDP sessions are not waited for: a session has
        no end but silence, so they keep relaying during the drain and close with it."""
        return sum(len(p.pool) for p in self.tcp)

    def stop_graceful(self) -> None:
        """Stop accepting now; let connections finish up to the drain timeout."""
        self._set_state("draining")
        self.stop_accepting()
        timeout = self.serving.current.config.shutdown.drain_timeout
        deadline = time.monotonic() + timeout
        log.info("draining %d connection(s) for up to %ss", self.open_connections(), timeout)
        while self.open_connections() and time.monotonic() < deadline:
            if not self.signals.empty() and self.signals.get() in (
                    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                log.warning("second signal during drain: closing everything now")
                break
            gevent.sleep(0.05)
        self.stop_fast()

    def stop_fast(self) -> None:
        self._set_state("stopping")
        self.stop_accepting()
        left = self.open_connections()
        if left:
            log.info("closing %d connection(s)", left)
        for proxy in [*self.tcp, *self.udp]:
            proxy.kill_all()
        if self.jobs is not None:
            self.jobs.stop()
        self.stopped.set()


def _listener_name(proto: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else (host or "0.0.0.0")
    return f"{proto}:{shown}:{port}"
