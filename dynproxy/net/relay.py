"""Relay bytes both ways between a client socket and an upstream socket: the TCP hot path.

`relay()` runs in the connection's own greenlet and multiplexes both directions there:
it starts libev watchers (the gevent socket's own read/write watchers when it has them,
so nothing is allocated for them) whose callback switches back into this greenlet with a
small int naming the event, and parks in `hub.switch()` in between. One greenlet per
connection, one switch per readiness event, no Waiter or Timeout objects.

Bytes go through `splice(2)` and a pipe borrowed from a per-process free list
(`relay_pools.PIPES`) only while bytes are in flight, so an idle connection owns no pipe and no buffer, and the bytes
never enter Python. Without splice (`use_splice=False`, or a socket type splice refuses)
the same loop copies through a pooled buffer with `recv_into`/`send`.

Must never: spawn a greenlet, make a call that can block the hub (every socket and pipe
call here is non-blocking), hold more than one pipe or buffer per direction, give back
a pipe that still holds bytes, leave a watcher running or an fd open when it returns or
is killed, or touch TLS sockets (splice would bypass the SSL object).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
from dataclasses import dataclass

import gevent.ssl
from gevent.hub import get_hub
from greenlet import getcurrent

from dynproxy.net.relay_pools import BUFFERS, PIPES, BufferPool, PipePool

__all__ = ["BUFFERS", "PIPES", "BufferPool", "PipePool", "RelayResult", "relay"]

_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_READ, _WRITE = 1, 2  # libev event masks
# Tokens the watchers switch back with: bit 0 = writable, bit 1 = downstream flow.
_UP_READ, _UP_WRITE, _DOWN_READ, _DOWN_WRITE, _TICK = range(5)
# The idle timer ticks this many times per idle_timeout: one timer started once per
# connection (never re-armed per chunk), and a silent pair ends within 1/8 of the timeout.
_IDLE_TICKS = 8
# A read that fills the whole chunk means more is waiting: read again at once rather
# than after another trip through the event loop, a few times before letting others run.
_READS_PER_WAKEUP = 4
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN})
_LINGER_ABORT = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN
_TLS_SOCKETS = (ssl.SSLSocket, gevent.ssl.SSLSocket)


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


class _Broken(Exception):
    """A socket failed mid-relay; `side` names it, `end` says how the relay ends."""

    def __init__(self, end: str, side: str) -> None:
        super().__init__(end, side)
        self.end = end
        self.side = side
        self.first = side

    @classmethod
    def from_error(cls, exc: OSError, side: str) -> _Broken:
        return cls("reset" if exc.errno in _RESET_ERRNOS else "error", side)


class _Flow:
    """One direction of a relay: bytes read from src are written to dst.

    States: reading (reader watcher on) or writing (bytes pending, writer watcher on,
    reader off: that is the backpressure), until src's EOF is passed on as dst's
    half-close (`done`). The subclasses move the bytes; they add no slots, so a splice
    flow can turn into a copy flow in place.
    """

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "reader", "writer", "switch", "token",
                 "size", "moved", "done", "side", "peer", "head", "pipe", "inflight",
                 "view", "out")

    def __init__(self, src: tuple, dst: tuple, token: int, switch, size: int,
                 side: str, peer: str) -> None:
        self.src, self.src_fd, self.reader, _ = src
        self.dst, self.dst_fd, _, self.writer = dst
        self.switch = switch
        self.token = token
        self.size = size
        self.side = side
        self.peer = peer
        self.moved = 0
        self.done = False
        self.head = self.pipe = self.view = self.out = None
        self.inflight = 0

    def begin(self, head) -> None:
        """Send `head` (the peeked bytes) before anything else, then start reading."""
        if head:
            self.head = memoryview(head)
            if not self._send_head():
                self.writer.start(self.switch, self.token + 1)
                return
        self.reader.start(self.switch, self.token)

    def release(self) -> None:
        """Stop both watchers and give back (or, with bytes in it, close) the pipe."""
        self.reader.stop()
        self.writer.stop()
        # A kill's traceback holds our frames; without this, frame -> flow -> greenlet
        # -> exception -> traceback -> frame would be a cycle only the cyclic GC frees.
        self.switch = None
        pipe, self.pipe = self.pipe, None
        if pipe is not None and self.inflight:
            PIPES.discard(pipe)
        elif pipe is not None:
            PIPES.give(pipe)
        view, self.view, self.out = self.view, None, None
        if view is not None:
            BUFFERS.give(view)

    def _send_head(self) -> bool:
        head = self.head
        try:
            sent = self.dst.send(head)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _Broken.from_error(exc, self.peer) from None
        self.moved += sent
        if sent < len(head):
            self.head = head[sent:]
            return False
        self.head = None
        return True

    def _wait_writable(self) -> None:
        """dst is full: keep the bytes, stop reading src until dst drains."""
        self.reader.stop()
        self.writer.start(self.switch, self.token + 1)

    def _resume_reading(self) -> None:
        self.writer.stop()
        self.reader.start(self.switch, self.token)

    def _finish(self) -> None:
        """src sent EOF with nothing pending: this direction is done (see half_close)."""
        self.reader.stop()
        self.done = True

    def half_close(self) -> None:
        """Pass src's EOF on to dst while the other direction goes on.

        Not called for the direction that finishes last: closing both sockets right
        after sends that FIN anyway, one syscall fewer per connection. ENOTCONN means
        dst's connection is already gone (its peer closed fully and was reset, e.g. a
        client that closed before the server's last bytes): the half-close is moot, not
        a reset; if dst's peer aborted mid-stream, its own read says so.
        """
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise _Broken.from_error(exc, self.peer) from None


class _SpliceFlow(_Flow):
    """src -> pipe -> dst with splice(2); the pipe is held only while it holds bytes."""

    __slots__ = ()

    def on_readable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = PIPES.take(self.size)
        size = self.size
        for _ in range(_READS_PER_WAKEUP):
            try:
                got = _SPLICE(self.src_fd, pipe[1], size, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                break  # spurious wakeup, or drained
            except OSError as exc:
                if exc.errno == errno.EINVAL and not self.moved:
                    return self._fall_back_to_copy()
                raise _Broken.from_error(exc, self.side) from None
            if not got:
                self._finish()
                break
            self.inflight = got
            if not self._drain():
                return self._wait_writable()
            if got < size:
                break
        self.pipe = None
        PIPES.give(pipe)

    def on_writable(self) -> None:
        if self.head is not None and not self._send_head():
            return
        pipe = self.pipe
        if pipe is not None:
            if not self._drain():
                return
            self.pipe = None
            PIPES.give(pipe)
        self._resume_reading()

    def _drain(self) -> bool:
        """Move the pipe's bytes to dst; False when dst is full (the rest stays in the pipe)."""
        left = self.inflight
        pipe_fd, dst_fd = self.pipe[0], self.dst_fd
        while left:
            try:
                sent = _SPLICE(pipe_fd, dst_fd, left, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                self.inflight = left
                return False
            except OSError as exc:
                self.inflight = left
                raise _Broken.from_error(exc, self.peer) from None
            if not sent:  # the pipe lost bytes we counted: never spin on it
                self.inflight = left
                raise _Broken("error", self.peer)
            left -= sent
            self.moved += sent
        self.inflight = 0
        return True

    def _fall_back_to_copy(self) -> None:
        """This socket type refuses splice (EINVAL) before any byte moved: copy instead."""
        PIPES.give(self.pipe)
        self.pipe = None
        self.__class__ = _CopyFlow
        self.on_readable()


class _CopyFlow(_Flow):
    """src -> pooled buffer -> dst with recv_into/send; the buffer is held while it holds bytes."""

    __slots__ = ()

    def on_readable(self) -> None:
        view = self.view
        if view is None:
            view = self.view = BUFFERS.take(self.size)
        size = len(view)
        for _ in range(_READS_PER_WAKEUP):
            try:
                got = self.src.recv_into(view)
            except BlockingIOError:
                break  # spurious wakeup, or drained
            except OSError as exc:
                raise _Broken.from_error(exc, self.side) from None
            if not got:
                self._finish()
                break
            self.out = view if got == size else view[:got]
            if not self._drain():
                return self._wait_writable()
            if got < size:
                break
        self.view = None
        BUFFERS.give(view)

    def on_writable(self) -> None:
        if self.head is not None and not self._send_head():
            return
        view = self.view
        if view is not None:
            if not self._drain():
                return
            self.view = None
            BUFFERS.give(view)
        self._resume_reading()

    def _drain(self) -> bool:
        """Send the pending bytes to dst; False when dst is full (the rest stays pending)."""
        out = self.out
        while True:
            try:
                sent = self.dst.send(out)
            except BlockingIOError:
                self.out = out
                return False
            except OSError as exc:
                raise _Broken.from_error(exc, self.peer) from None
            self.moved += sent
            if sent == len(out):
                self.out = None
                return True
            out = out[sent:]


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

    The relay owns both sockets from the call on: they are closed when it returns, raises
    or is killed (GreenletExit passes through after cleanup). Plain sockets only: a TLS
    socket raises TypeError; a non-positive buffer_size or idle_timeout, ValueError.
    """
    _check_arguments(client, upstream, idle_timeout, buffer_size)
    hub = get_hub()
    flow_type = _SpliceFlow if use_splice and _SPLICE is not None else _CopyFlow
    switch = getcurrent().switch
    up = down = ticker = None
    ends = (_endpoint(client, hub.loop), _endpoint(upstream, hub.loop))
    try:
        up = flow_type(ends[0], ends[1], _UP_READ, switch, buffer_size, "client", "upstream")
        down = flow_type(ends[1], ends[0], _DOWN_READ, switch, buffer_size, "upstream", "client")
        if idle_timeout is not None:
            tick = idle_timeout / _IDLE_TICKS
            ticker = hub.loop.timer(tick, tick)
            ticker.start(switch, _TICK)
        up.begin(initial_up)
        down.begin(b"")
        end, first = _pump(hub, up, down)
    except _Broken as broken:
        end, first = broken.end, broken.first
        if end == "reset":
            _abort(ends[1][0] if broken.side == "client" else ends[0][0])
    finally:
        _clean_up(ticker, up, down, ends, client, upstream)
        switch = None  # see _Flow.release: no frame -> greenlet reference survives us
    return RelayResult(up.moved, down.moved, end, first)


def _pump(hub, up: _Flow, down: _Flow) -> tuple[str, str]:
    """Dispatch readiness events to the flows until both are done or the pair is idle.

    Kept as one loop (not one function per event) because it runs once per event of
    every connection: locals and a couple of int tests are all it costs.
    """
    hub_switch = hub.switch
    first = ""
    last_moved = up.moved + down.moved
    quiet_ticks = 0
    try:
        while True:
            token = hub_switch()
            if token == _TICK:
                moved = up.moved + down.moved
                if moved != last_moved:
                    last_moved, quiet_ticks = moved, 0
                    continue
                quiet_ticks += 1
                if quiet_ticks == _IDLE_TICKS:
                    return "timeout", first
                continue
            flow = up if token < _DOWN_READ else down
            if token & 1:
                flow.on_writable()
            else:
                flow.on_readable()
            if flow.done:  # it finished at this very event: no event follows a done flow
                if up.done and down.done:
                    return "closed", first
                first = flow.side
                flow.half_close()
    except _Broken as broken:
        broken.first = first or broken.side
        raise


def _endpoint(sock: socket.socket, loop) -> tuple:
    """(never-waiting socket object, fd, read watcher, write watcher) for `sock`.

    A gevent socket wraps a non-blocking `_sock` and owns two idle watchers for its fd:
    borrow both (they are ours while the relay owns the socket). A stdlib socket is made
    non-blocking and gets watchers of its own, closed by `_clean_up`.
    """
    raw = getattr(sock, "_sock", None)
    reader = getattr(sock, "_read_event", None)
    if raw is not None and reader is not None:
        return raw, raw.fileno(), reader, sock._write_event
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    fd = sock.fileno()
    return sock, fd, loop.io(fd, _READ), loop.io(fd, _WRITE)


def _clean_up(ticker, up, down, ends, client, upstream) -> None:
    """Stop every watcher, settle the pipes and buffers, close both sockets."""
    if ticker is not None:
        ticker.close()
    for flow in (up, down):
        if flow is not None:
            flow.release()
    for end, sock in zip(ends, (client, upstream), strict=True):
        if end[0] is sock:  # stdlib socket: the watchers were ours
            end[2].close()
            end[3].close()
        sock.close()


def _abort(raw) -> None:
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
