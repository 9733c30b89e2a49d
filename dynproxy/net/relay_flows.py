"""One direction of a relay: bytes read from one socket are written to the other.

`net.relay.Relay` dispatches libev events to its two flows in the hub: `on_readable`
when the source has bytes (or EOF), `on_writable` when the destination, full before,
drains. A flow moves the bytes with splice(2) through a pooled pipe (SpliceFlow), or
with recv_into/send through a pooled buffer (CopyFlow), holding either only while
bytes are in flight. A splice flow that gets no pipe (the process is out of descriptors)
copies instead: a connection never fails for want of a pipe.

Must never: block or yield (every socket and pipe call is non-blocking), hold more
than one pipe or buffer, give back a pipe that still holds bytes, or touch a TLS
socket (splice would bypass the SSL object).
"""

from __future__ import annotations

import errno
import os
import socket

from dynproxy.net.relay_pools import BUFFERS, NO_PIPE_ERRNOS, PIPES, WATCHERS
from dynproxy.obs.log import log_once_per

__all__ = ["READ", "WRITE", "Broken", "CopyFlow", "Flow", "SpliceFlow"]

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
READ, WRITE = 1, 2  # libev event masks
# A read that fills the whole chunk means more is waiting: read again at once rather
# than after another trip through the event loop, a few times before letting others run.
_READS_PER_WAKEUP = 4
# A copy-first flow turns to splice at a read this large (or one that fills its buffer):
# messages of a few KiB (requests, small replies, keep-alive traffic) cost less copied
# than spliced through a pipe; a stream that has this much waiting is bulk.
BULK_READ = 16384
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN})


class Broken(Exception):
    """A socket failed mid-relay; `side` names it, `end` says how the relay ends."""

    def __init__(self, end: str, side: str) -> None:
        super().__init__(end, side)
        self.end = end
        self.side = side

    @classmethod
    def from_error(cls, exc: OSError, side: str) -> Broken:
        return cls("reset" if exc.errno in _RESET_ERRNOS else "error", side)


class Flow:
    """One direction of a relay: bytes read from src are written to dst.

    States: reading (reader watcher on) or writing (bytes pending, writer watcher on,
    reader off: that is the backpressure), until src's EOF is passed on as dst's
    half-close (`done`). The subclasses move the bytes; they add no slots, so a splice
    flow can turn into a copy flow in place. The reader is src's read watcher, the
    writer dst's write watcher (made on first use: most flows never wait to write);
    `pooled` says they come from (and go back to) WATCHERS rather than being a gevent
    socket's own, which are only ever stopped.
    """

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "reader", "writer", "pooled", "callback",
                 "token", "size", "moved", "done", "side", "peer", "head", "pipe",
                 "inflight", "view", "out", "splice")

    def __init__(self, src: tuple, dst: tuple, token: int, callback, size: int,
                 side: str, peer: str, splice=None) -> None:
        self.splice = splice  # os.splice, or what a test put in its place
        self.src, self.src_fd, self.reader, _, self.pooled = src
        self.dst, self.dst_fd, _, self.writer, _ = dst
        self.callback = callback
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
                self._writer().start(self.callback, self.token + 1)
                return
        self.reader.start(self.callback, self.token)

    def release(self) -> None:
        """Stop (or give back) both watchers; give back (or, with bytes in it, close) the
        pipe or buffer."""
        # relay -> flow -> bound method -> relay would outlive us without the cyclic GC
        self.callback = None
        reader, writer = self.reader, self.writer
        if self.pooled:
            WATCHERS.give(reader)
            if writer is not None:
                WATCHERS.give(writer)
        else:
            reader.stop()
            if writer is not None:
                writer.stop()
        pipe, self.pipe = self.pipe, None
        if pipe is not None and self.inflight:
            PIPES.discard(pipe)
        elif pipe is not None:
            PIPES.give(pipe)
        view, self.view, self.out = self.view, None, None
        if view is not None:
            BUFFERS.give(view)

    def _writer(self):
        writer = self.writer
        if writer is None:
            writer = self.writer = WATCHERS.take(self.reader.loop, self.dst_fd, WRITE)
        return writer

    def _send_head(self) -> bool:
        """Send the bytes queued before the relay began; True once all of them went."""
        self.head = self._send(self.head)
        return self.head is None

    def _send(self, out):
        """Send `out` to dst; None when all of it went, else what dst could not take."""
        while True:
            try:
                sent = self.dst.send(out)
            except BlockingIOError:
                return out
            except OSError as exc:
                raise Broken.from_error(exc, self.peer) from None
            self.moved += sent
            if sent == len(out):
                return None
            out = out[sent:]

    def _wait_writable(self) -> None:
        """dst is full: keep the bytes, stop reading src until dst drains."""
        self.reader.stop()
        self._writer().start(self.callback, self.token + 1)

    def _resume_reading(self) -> None:
        self.writer.stop()
        self.reader.start(self.callback, self.token)

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
                raise Broken.from_error(exc, self.peer) from None


class SpliceFlow(Flow):
    """src -> pipe -> dst with splice(2); the pipe is held only while it holds bytes."""

    __slots__ = ()

    def on_readable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = PIPES.take(self.size)
            except OSError as exc:
                if exc.errno not in NO_PIPE_ERRNOS:
                    raise
                return self._copy_for_now(exc)
        size = self.size
        for _ in range(_READS_PER_WAKEUP):
            try:
                got = self.splice(self.src_fd, pipe[1], size, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                break  # spurious wakeup, or drained
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # nothing moved: the pipe is empty here
                    return self._fall_back_to_copy()
                raise Broken.from_error(exc, self.side) from None
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
        pipe_fd, dst_fd, splice = self.pipe[0], self.dst_fd, self.splice
        while left:
            try:
                sent = splice(pipe_fd, dst_fd, left, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                self.inflight = left
                return False
            except OSError as exc:
                self.inflight = left
                raise Broken.from_error(exc, self.peer) from None
            if not sent:  # the pipe lost bytes we counted: never spin on it
                self.inflight = left
                raise Broken("error", self.peer)
            left -= sent
            self.moved += sent
        self.inflight = 0
        return True

    def _fall_back_to_copy(self) -> None:
        """This socket type refuses splice (EINVAL): copy instead, for good."""
        PIPES.give(self.pipe)
        self.pipe = None
        self.splice = None
        self.__class__ = CopyFlow
        self.on_readable()

    def _copy_for_now(self, exc: OSError) -> None:
        """No pipe to be had (out of descriptors or pipe memory): copy these bytes rather
        than fail the connection. Unlike EINVAL this passes, so the flow keeps its splice:
        its next bulk read tries again, most likely with a pipe another flow gave back."""
        log_once_per("relay-no-pipe", 10.0,
                     "cannot make a pipe for splice(2): %s; copying instead. Raise the file "
                     "descriptor limit (ulimit -n, systemd LimitNOFILE=) or lower "
                     "server.max_connections", exc.strerror or exc)
        self.__class__ = CopyFlow
        self.on_readable()


class CopyFlow(Flow):
    """src -> buffer -> dst with recv_into/send.

    Bytes are read into one scratch buffer per process and sent on at once; only bytes
    dst cannot take yet are copied into a pooled buffer, held until they are sent (so a
    flow holds a buffer only under backpressure, and a short exchange takes none).

    With a splice function (a relay that copies first), a read that fills the whole
    buffer, or brings BULK_READ bytes at once, means bulk: the flow turns into a
    SpliceFlow.
    """

    __slots__ = ()

    def on_readable(self) -> None:
        size = self.size
        scratch = _SCRATCH.get(size) or _scratch(size)
        try:
            got = self.src.recv_into(scratch)
        except BlockingIOError:
            return  # spurious wakeup
        except OSError as exc:
            raise Broken.from_error(exc, self.side) from None
        if not got:
            return self._finish()
        if got < BULK_READ and got < size:  # a message (the usual case): pass it on
            left = self._send(scratch[:got])
            if left is not None:
                self._keep(left)
            return
        self._bulk(scratch, got)

    def _bulk(self, scratch: memoryview, got: int) -> None:
        """A big read: pass it on, read on a few times, then turn to splice."""
        size = self.size
        reads = 1
        while True:
            left = self._send(scratch if got == size else scratch[:got])
            if left is not None:
                return self._keep(left)
            if got < size or reads == _READS_PER_WAKEUP:
                break
            try:
                got = self.src.recv_into(scratch)
            except BlockingIOError:
                break  # drained
            except OSError as exc:
                raise Broken.from_error(exc, self.side) from None
            if not got:
                return self._finish()
            reads += 1
        if self.splice is not None:
            self.__class__ = SpliceFlow

    def _keep(self, left: memoryview) -> None:
        """dst is full: copy what it did not take out of the shared scratch, and wait."""
        view = self.view = BUFFERS.take(self.size)
        view[:len(left)] = left
        self.out = view[:len(left)]
        self._wait_writable()

    def on_writable(self) -> None:
        if self.head is not None and not self._send_head():
            return
        view = self.view
        if view is not None:
            left = self._send(self.out)
            if left is not None:
                self.out = left
                return
            self.view = self.out = None
            BUFFERS.give(view)
        self._resume_reading()


_SCRATCH: dict[int, memoryview] = {}  # buffer_size -> the process's scratch of that size


def _scratch(size: int) -> memoryview:
    """The scratch buffer of `size` bytes: one allocation per size per process (the
    hub runs one callback at a time and a flow never yields while it is in use)."""
    view = _SCRATCH[size] = memoryview(bytearray(size))
    return view
