"""Relay bytes both ways between a client socket and an upstream socket: the TCP hot path.

A `Relay` runs in the hub, on libev callbacks, with no greenlet of its own: its read and
write watchers (the sockets' own when they are gevent sockets) call `Relay._event` with
a small int naming the event, which moves bytes and returns. An idle proxied connection
is therefore only a few small objects: no greenlet, no stack, no frame. When the
exchange ends the relay closes both sockets and calls `on_done(relay)`.
`relay()` is the same thing for a greenlet that wants to wait for the result.

Bytes go through `splice(2)` and a pipe borrowed from a per-process free list
(`relay_pools.PIPES`) only while bytes are in flight, so an idle connection owns no pipe
and no buffer, and the bytes never enter Python. Without splice (`use_splice=False`, or
a socket type splice refuses) the same flows copy with `recv_into`/`send`; with
`copy_first` they copy until the exchange turns out to be bulk (relay_flows.CopyFlow),
which is cheaper for a request and a reply.

Must never: spawn a greenlet, block or yield in a callback (every socket and pipe call
is non-blocking), let an exception reach the hub, hold more than one pipe or buffer per
direction, give back a pipe that still holds bytes, leave a watcher running or an fd
open when it ends or is aborted, or touch TLS sockets (splice would bypass the SSL
object).
"""

from __future__ import annotations

import _socket
import os
import socket
import ssl
import struct
from dataclasses import dataclass

import gevent.ssl
from gevent.hub import get_hub
from greenlet import getcurrent

from dynproxy.net.relay_flows import READ, Broken, CopyFlow, SpliceFlow
from dynproxy.net.relay_pools import BUFFERS, PIPES, WATCHERS, BufferPool, PipePool
from dynproxy.obs.log import log_once_per

__all__ = ["BUFFERS", "PIPES", "BufferPool", "PipePool", "Relay", "RelayResult", "relay",
           "reset_on_close"]

_SPLICE = getattr(os, "splice", None)  # the flows get it from here (tests replace it)
# Tokens the watchers call back with: bit 0 = writable, bit 1 = downstream flow.
_UP_READ, _UP_WRITE, _DOWN_READ, _DOWN_WRITE = range(4)
# The idle clock ticks this many times per idle_timeout: one timer per timeout value for
# all relays (never re-armed per chunk), and a silent pair ends within 1/8 of the timeout.
_IDLE_TICKS = 8
_LINGER_ABORT = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN
_TLS_SOCKETS = (ssl.SSLSocket, gevent.ssl.SSLSocket)
_CSocket = _socket.socket


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How one relay ended.

    bytes_up: bytes delivered to upstream (initial_up included); bytes_down: bytes
    delivered to the client. end: "closed" (both directions saw EOF), "reset" (a peer
    reset or vanished), "timeout" (idle_timeout passed with no byte moved) or "error"
    (any other socket error). ended_by: "client" or "upstream", the side whose EOF, reset
    or error came first; "" when neither did (a timeout on a pair that never half-closed).
    """

    bytes_up: int
    bytes_down: int
    end: str
    ended_by: str


class Relay:
    """One relay in progress, driven by libev callbacks in the hub (see the module doc).

    Owns both sockets from `start()` on: they are closed when it ends or is aborted.
    `on_done(relay)` is called once, after the sockets are closed, unless `abort()`
    ended it; then `end` and `first` say how it ended and `up.moved`/`down.moved` what
    went through (`result` makes a RelayResult of them). `client_reader` and
    `upstream_writer` are watchers the caller already made for those sockets (from
    WATCHERS; the relay gives them back). `copy_first`: copy with recv/send until a read
    fills the buffer or brings BULK_READ bytes, then splice: small messages need no pipe.
    """

    __slots__ = ("up", "down", "client", "upstream", "clock", "on_done", "first", "end",
                 "last_moved", "quiet")

    def __init__(self, client, upstream, *, idle_timeout: float | None, buffer_size: int,
                 use_splice: bool = True, copy_first: bool = False, on_done=None,
                 client_reader=None, upstream_writer=None, loop=None) -> None:
        if loop is None:
            loop = get_hub().loop
        splice = _SPLICE if use_splice else None
        flow_type = SpliceFlow if splice is not None and not copy_first else CopyFlow
        event = self._event  # one bound method for every watcher of this relay
        near = _endpoint(client, loop, client_reader, None)
        far = _endpoint(upstream, loop, None, upstream_writer)
        self.client, self.upstream = client, upstream
        self.up = flow_type(near, far, _UP_READ, event, buffer_size, "client", "upstream",
                            splice)
        self.down = flow_type(far, near, _DOWN_READ, event, buffer_size, "upstream",
                              "client", splice)
        self.on_done = on_done
        self.first = self.end = ""
        self.last_moved = -1  # the first tick never counts: the pair is quiet >= timeout
        self.quiet = 0
        self.clock = None if idle_timeout is None else _idle_clock(loop, idle_timeout)

    @property
    def result(self) -> RelayResult | None:
        if not self.end:
            return None
        return RelayResult(self.up.moved, self.down.moved, self.end, self.first)

    def start(self, initial_up=b"") -> None:
        """Send `initial_up` upstream, then relay; may end (and call on_done) at once."""
        try:
            if self.clock is not None:
                self.clock.add(self)
            self.up.begin(initial_up)
            self.down.begin(b"")
        except Broken as broken:
            self._broken(broken)
        except Exception as exc:  # noqa: BLE001 - a relay must never take the process down
            self._failed(exc)

    def abort(self, end: str = "closed", reset: bool = False) -> None:
        """End it now without calling on_done (a kill, a fast stop). `reset`: both
        sockets close with RST, not FIN, so neither peer takes the cut for a clean end."""
        if not self.end:
            if reset:
                reset_on_close(self.client)
                reset_on_close(self.upstream)
            self.on_done = None
            self._end(end, self.first)

    def _event(self, token: int) -> None:
        """A watcher fired: move bytes; end the relay when both sides are done."""
        try:
            flow = self.up if token < _DOWN_READ else self.down
            if token & 1:
                flow.on_writable()
            else:
                flow.on_readable()
            if not flow.done:  # no event follows a done flow: this runs once per flow
                return
            if not (self.up.done and self.down.done):
                self.first = flow.side
                # At the end of this loop iteration: when the other side's EOF came in the
                # same iteration (a short exchange), the pair just closes and the
                # shutdown(2) and its FIN are saved.
                flow.reader.loop.run_callback(self._half_close, flow)
                return
        except Broken as broken:
            return self._broken(broken)
        except Exception as exc:  # noqa: BLE001 - never let it reach the hub
            return self._failed(exc)
        self._end("closed", self.first)

    def _half_close(self, flow) -> None:
        """Pass `flow`'s EOF on, unless the relay ended meanwhile (then close does it)."""
        if self.end:
            return
        try:
            flow.half_close()
        except Broken as broken:
            self._broken(broken)
        except Exception as exc:  # noqa: BLE001 - never let it reach the hub
            self._failed(exc)

    def tick(self) -> None:
        """The idle clock ticked: end the relay when the pair was silent for the whole
        idle timeout (at least _IDLE_TICKS ticks after the last byte moved)."""
        moved = self.up.moved + self.down.moved
        if moved != self.last_moved:
            self.last_moved, self.quiet = moved, 0
            return
        self.quiet += 1
        if self.quiet >= _IDLE_TICKS:
            self._end("timeout", self.first)

    def _broken(self, broken: Broken) -> None:
        if broken.end == "reset":  # the survivor must see the stream was cut, not ended
            reset_on_close(self.down.src if broken.side == "client" else self.up.src)
        self._end(broken.end, self.first or broken.side)

    def _failed(self, exc: Exception) -> None:
        log_once_per(f"relay-{type(exc).__name__}", 10.0, "relay failed unexpectedly: %r", exc)
        self._end("error", self.first)

    def _end(self, end: str, first: str) -> None:
        if self.end:
            return
        self.end, self.first = end, first
        if self.clock is not None:
            self.clock.discard(self)
        self.up.release()
        self.down.release()
        self.client.close()
        self.upstream.close()
        done, self.on_done = self.on_done, None
        if done is not None:
            done(self)


class _IdleClock:
    """One repeating timer for every relay of one idle timeout, ticking every 1/8 of it
    while any is registered (a timer per relay would be made, started and closed per
    connection, and kept per idle connection)."""

    __slots__ = ("loop", "timer", "relays")

    def __init__(self, loop, idle_timeout: float) -> None:
        tick = idle_timeout / _IDLE_TICKS
        self.loop = loop
        self.timer = loop.timer(tick, tick)
        self.relays: set[Relay] = set()

    def add(self, relay: Relay) -> None:
        if not self.relays:
            self.timer.start(self._tick)
        self.relays.add(relay)

    def discard(self, relay: Relay) -> None:
        relays = self.relays
        relays.discard(relay)
        if not relays:
            self.timer.stop()  # an idle process has no timer running

    def _tick(self) -> None:
        for relay in list(self.relays):  # a relay told to end leaves the set
            try:
                relay.tick()
            except Exception as exc:  # noqa: BLE001 - never let it reach the hub
                log_once_per("relay-idle-tick", 10.0, "idle check failed: %r", exc)


_CLOCKS: dict[float, _IdleClock] = {}


def _idle_clock(loop, idle_timeout: float) -> _IdleClock:
    clock = _CLOCKS.get(idle_timeout)
    if clock is None or clock.loop is not loop:
        if len(_CLOCKS) >= 64:  # timeouts come from configs: drop the unused ones
            for key in [k for k, c in _CLOCKS.items() if not c.relays]:
                del _CLOCKS[key]
        clock = _CLOCKS[idle_timeout] = _IdleClock(loop, idle_timeout)
    return clock


def _endpoint(sock, loop, reader, writer) -> tuple:
    """(never-waiting socket object, fd, read watcher, write watcher or None, pooled).

    A gevent socket lends its own two watchers (they are ours while the relay owns the
    socket). Any other socket is made non-blocking and gets watchers from WATCHERS.
    """
    if type(sock) is not _CSocket:  # the TCP path's own sockets skip these probes
        raw = getattr(sock, "_sock", None)
        borrowed = getattr(sock, "_read_event", None)
        if raw is not None and borrowed is not None:
            return raw, raw.fileno(), borrowed, sock._write_event, False
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    fd = sock.fileno()
    if reader is None:
        reader = WATCHERS.take(loop, fd, READ)
    return sock, fd, reader, writer, True


def relay(client: socket.socket, upstream: socket.socket, *, initial_up: bytes = b"",
          idle_timeout: float | None = 300.0, buffer_size: int = 65536,
          use_splice: bool = True) -> RelayResult:
    """Relay bytes between two connected TCP sockets until the exchange ends; close both.

    `initial_up` (the peeked ClientHello) goes upstream first and counts in bytes_up.
    EOF from one side becomes shutdown(SHUT_WR) on the other while the other direction
    goes on; the relay returns "closed" once both directions saw EOF. A reset or error
    on either side ends it at once ("reset" also resets the other side, so the stream is
    seen to be cut); `idle_timeout` seconds without a byte delivered ends it with
    "timeout" (None: never). At most `buffer_size` bytes per direction are in flight.

    The calling greenlet waits; the relay owns both sockets from the call on: they are
    closed when it returns, raises or is killed (GreenletExit passes through after
    cleanup). Plain sockets only: a TLS socket raises TypeError; a non-positive
    buffer_size or idle_timeout, ValueError.
    """
    _check_arguments(client, upstream, idle_timeout, buffer_size)
    job = Relay(client, upstream, idle_timeout=idle_timeout, buffer_size=buffer_size,
                use_splice=use_splice)
    job.start(initial_up)
    if not job.end:
        hub = get_hub()
        job.on_done = getcurrent().switch
        try:
            while not job.end:
                hub.switch()
        except BaseException:
            job.abort()
            raise
        finally:
            job.on_done = None  # no frame -> greenlet reference survives us
    return job.result


def reset_on_close(raw) -> None:
    """Make close() send RST, so the surviving peer learns the stream was cut."""
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass


def _check_arguments(client, upstream, idle_timeout, buffer_size) -> None:
    for name, sock in (("client", client), ("upstream", upstream)):
        if isinstance(sock, _TLS_SOCKETS):
            raise TypeError(f"relay() {name} is a TLS socket {sock!r}: splice and recv would "
                            f"bypass TLS; relay the decrypted bytes through the SSL object")
    if buffer_size <= 0:
        raise ValueError(f"relay() buffer_size must be a positive int, got {buffer_size!r}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ValueError(f"relay() idle_timeout must be None or > 0 seconds, "
                        f"got {idle_timeout!r}")
