"""Accepting TCP connections cheaply: a hub callback on the listening socket, and a set
of long-lived worker greenlets that carry each connection through its handshake.

Why not gevent's StreamServer + Pool: those spawn a greenlet per connection (a new
greenlet maps a fresh 16 KiB frame stack, and the spawn, the Pool's semaphore and
links cost more than the proxying work), and wrap each socket in a gevent socket
(fcntl/ioctl and two watchers). Here the accept callback accepts raw non-blocking
sockets and switches straight into a parked worker (or a new one), which runs
`serve(sock, addr)` until it first waits and parks again when `serve` returns; a
relay then goes on in hub callbacks without any greenlet. At most `idle_limit` parked
workers are kept; more exit.

`max_connections` holds as before: `open` counts connections from accept until the
owner calls `finished()`; while it is at the limit the listener is not watched, so new
clients wait in the kernel backlog, and `on_full()` is told each time the limit is
reached. An accept failing for lack of file descriptors pauses accepting with backoff
(`on_out_of_fds(exc, pause)`); a connection ending resumes it at once, since it just
freed descriptors.

Must never: block the hub, let an exception out of a worker or the callback (it would
land in the hub), or leave a watcher or timer running after `close()`.
"""

from __future__ import annotations

import _socket
import errno
import logging
import posix
import time

from gevent import sleep
from gevent.hub import get_hub
from greenlet import GreenletExit, getcurrent, greenlet

from dynproxy.obs.log import log_once_per

log = logging.getLogger("dynproxy.tcp")
_READ = 1
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPTS_PER_WAKEUP = 64  # then let the connections already accepted move on
IDLE_WORKERS = 64  # parked worker greenlets kept for the next connections
_GO = object()  # what the acceptor switches into a parked worker with, first
MIN_PAUSE, MAX_PAUSE = 0.01, 1.0  # backoff of accepts failing for lack of descriptors


class Acceptor:
    """One listening socket's accept loop and worker greenlets (see the module doc)."""

    def __init__(self, sock, serve, limit: int, on_full, on_out_of_fds,
                 idle_limit: int = IDLE_WORKERS) -> None:
        self.sock = sock  # the object the caller made (kept open until close())
        self._listener = getattr(sock, "_sock", sock)  # its C socket: _accept() is raw
        if self._listener.gettimeout() != 0.0:  # a stdlib socket: accept must never block
            self._listener.setblocking(False)
        self.family = sock.family
        self.serve = serve
        self.limit = limit
        self.on_full = on_full
        self.on_out_of_fds = on_out_of_fds
        self.idle_limit = idle_limit
        self.hub = get_hub()
        self.loop = self.hub.loop
        self.watcher = self.loop.io(self._listener.fileno(), _READ)
        self.open = 0  # connections accepted and not finished
        self.workers: set[greenlet] = set()
        self.idle: list[greenlet] = []
        self.started = self.closed = False
        self._pause_timer = None
        self._pause = MIN_PAUSE

    # the listener ---------------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        self._watch()

    def close(self) -> None:
        """Stop accepting and close the listening socket; open connections go on."""
        self.closed = True
        self._cancel_pause()
        self.watcher.close()
        self.sock.close()

    def _watch(self) -> None:
        if self.started and not self.closed and self._pause_timer is None \
                and self.open < self.limit:
            self.watcher.start(self._on_acceptable)

    def finished(self) -> None:
        """A connection ended: its slot (and its descriptors) are free again."""
        self.open -= 1
        if self._pause_timer is not None:  # it just freed descriptors: try at once
            self._cancel_pause()
        if not self.watcher.active:
            self._watch()

    # accepting (a hub callback) ---------------------------------------------------------
    def _on_acceptable(self) -> None:
        accept = self._listener._accept
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self.open >= self.limit:
                self.watcher.stop()  # the backlog holds the rest until a slot frees
                return
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if not self._accept_failed(exc):
                    return
                continue
            self._pause = MIN_PAUSE
            self._dispatch(fd, addr)

    def _accept_failed(self, exc: OSError) -> bool:
        """True to go on accepting (the client gave up first); False to stop for now."""
        if exc.errno in _FD_ERRNOS:
            pause = self._pause
            self._pause = min(MAX_PAUSE, pause * 2)
            self.watcher.stop()
            self._pause_timer = timer = self.loop.timer(pause)
            timer.start(self._resume)
            self.on_out_of_fds(exc, pause)
            return False
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
            return True
        log_once_per("tcp-accept", 10.0, "accept failed: %r", exc)
        return False

    def _resume(self) -> None:
        self._cancel_pause()
        self._watch()

    def _cancel_pause(self) -> None:
        timer, self._pause_timer = self._pause_timer, None
        if timer is not None:
            timer.close()

    def _dispatch(self, fd: int, addr) -> None:
        try:
            sock = _socket.socket(self.family, _socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
        except OSError:  # the fd went bad already; nothing was counted yet
            _close_fd(fd)
            return
        self.open += 1
        if self.open >= self.limit:
            self.on_full()
        idle = self.idle
        worker = idle.pop() if idle else self._new_worker()
        try:
            worker.switch(_GO, sock, addr)  # back here when it first waits or parks
        except Exception as exc:  # noqa: BLE001 - serve() never raises: a bug, not traffic
            log_once_per("tcp-worker", 10.0, "connection worker failed: %r", exc)

    # the workers ---------------------------------------------------------------------------
    def _new_worker(self) -> greenlet:
        worker = greenlet(self._work, self.hub)
        self.workers.add(worker)
        return worker

    def _work(self, _go, sock, addr) -> None:
        """Serve connections one after another; park in between (at most idle_limit)."""
        me = getcurrent()
        hub_switch = self.hub.switch
        try:
            while True:
                self.serve(sock, addr)  # never raises but GreenletExit (a kill)
                sock = addr = None
                if self.closed or len(self.idle) >= self.idle_limit:
                    return
                self.idle.append(me)
                got = hub_switch()
                while type(got) is not tuple or not got or got[0] is not _GO:
                    got = hub_switch()  # not ours (nothing should do that): keep waiting
                _, sock, addr = got
        except GreenletExit:
            pass
        finally:
            self.workers.discard(me)
            if me in self.idle:
                self.idle.remove(me)

    def kill_workers(self, timeout: float) -> None:
        """Kill every worker (their connections end as a kill ends them); wait up to
        `timeout` seconds for them to be gone (0: do not wait)."""
        for worker in list(self.workers):
            self.loop.run_callback(_throw_exit, worker)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            sleep(0.01)


def _throw_exit(worker: greenlet) -> None:
    if not worker.dead:
        worker.throw(GreenletExit)


def _close_fd(fd: int) -> None:
    try:
        posix.close(fd)  # not gevent's os.close: no watcher was ever made for it
    except OSError:
        pass
