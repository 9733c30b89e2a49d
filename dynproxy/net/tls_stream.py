"""TLS over a gevent socket through memory BIOs, and relaying between such streams.

`TlsStream` runs an `ssl.SSLObject` over two `ssl.MemoryBIO`s, so bytes already read
from the socket (the ClientHello the proxy peeked at to route) can be fed to OpenSSL
first: a socket cannot be un-read, and an SSLSocket would read only from the kernel.
It looks like a socket to the relay: recv, sendall, shutdown (close_notify, then
FIN), settimeout, close. The same class re-encrypts towards backends (`connect_tls`).

`relay_streams` copies both ways between two socket-like objects (TLS or plain) with
half-close, an idle timeout and byte counts, in the connection's greenlet and one
helper greenlet it owns (both end before it returns). The splice relay (relay.py) must
never see TLS: it would move ciphertext past the SSL object.

Never blocks the hub: every wait is a gevent socket wait; handshakes have a deadline,
relays one idle timer.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time

import gevent
from gevent.hub import get_hub

from dynproxy.net.relay import RelayResult, reset_on_close
from dynproxy.net.tls_certs import FileStamp

__all__ = ["TlsStream", "backend_context", "connect_tls", "relay_streams"]

# EBADF too: a socket closed under a waiting greenlet means the other direction failed.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN,
                           errno.EBADF})
_IDLE_TICKS = 8  # a silent pair ends within 1/8 of the idle timeout after it
_BACKEND_CONTEXTS: dict = {}  # BackendTlsSpec -> (CA file stamp, SSLContext)


class TlsStream:
    """One TLS connection on a connected gevent socket; socket-like for the relay.

    Two greenlets may use one stream, one reading and one writing: OpenSSL calls never
    yield, and only one greenlet at a time sends the outgoing BIO's bytes (in order).
    """

    __slots__ = ("sock", "tls", "_in", "_out", "_sending", "read_size")

    def __init__(self, sock, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, initial: bytes = b"",
                 read_size: int = 65536):
        self.sock = sock
        self.read_size = read_size
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._sending = False
        if initial:
            self._in.write(initial)
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)

    def handshake(self, deadline: float, *, defer_tickets: bool = False) -> None:
        """Complete the handshake by `deadline` (monotonic); raises ssl.SSLError (with
        the alert, if any, sent to the peer), TimeoutError or OSError.

        defer_tickets (server side): what a TLS 1.3 server has left to send once the
        handshake is done is only session tickets, which no client waits for; they go
        out with the first record sent, one write and one packet fewer per connection.
        """
        tls, sock = self.tls, self.sock
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.settimeout(_remaining(deadline))
                    if self._out.pending:
                        sock.sendall(self._out.read())
                    self._feed(sock.recv(self.read_size))
            if self._out.pending and not (defer_tickets and tls.version() == "TLSv1.3"):
                sock.settimeout(_remaining(deadline))
                sock.sendall(self._out.read())
        except ssl.SSLError:
            self._send_alert()
            raise
        sock.settimeout(None)

    def _feed(self, data: bytes) -> None:
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def _send_alert(self) -> None:
        """Best effort: let the peer see why (no shared cipher, protocol version)."""
        if self._out.pending:
            try:
                self.sock.settimeout(0.5)
                self.sock.sendall(self._out.read())
            except OSError:
                pass

    # socket-like -----------------------------------------------------------------------
    def recv(self, size: int) -> bytes:
        """Up to `size` decrypted bytes; b"" at close_notify or EOF (ragged or not)."""
        tls = self.tls
        while True:
            try:
                return tls.read(size)
            except ssl.SSLWantReadError:
                if self._out.pending:
                    self._flush()  # e.g. a KeyUpdate answer
                self._feed(self.sock.recv(self.read_size))
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def sendall(self, data) -> None:
        self.tls.write(data)
        self._flush()

    def _flush(self) -> None:
        if self._sending:  # the greenlet already sending will send these too, in order
            return
        self._sending = True
        try:
            out, send = self._out, self.sock.sendall
            while out.pending:
                send(out.read())
        finally:
            self._sending = False

    def shutdown(self, how: int) -> None:
        """SHUT_WR: close_notify then FIN; reading the peer's last bytes goes on."""
        if how != socket.SHUT_RD:
            try:
                self.tls.unwrap()
            except ssl.SSLError:  # WantRead: ours is queued, the peer's comes when it is done
                pass
            self._flush()
        self.sock.shutdown(how)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    @property
    def version(self) -> str | None:
        return self.tls.version()

    @property
    def alpn(self) -> str | None:
        return self.tls.selected_alpn_protocol()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("TLS handshake timed out")
    return left


# --- towards backends -------------------------------------------------------------------


def backend_context(spec) -> ssl.SSLContext:
    """Client context for a BackendTlsSpec: verify against `ca` (the system store when
    None) unless `verify` is off. Built once; rebuilt when the CA file changes."""
    stamp = FileStamp.of(spec.ca) if spec.ca else None
    cached = _BACKEND_CONTEXTS.get(spec)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    if spec.verify:
        ctx = ssl.create_default_context(cafile=spec.ca)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if len(_BACKEND_CONTEXTS) > 1024:  # specs from Redis come and go: never grow forever
        _BACKEND_CONTEXTS.clear()
    _BACKEND_CONTEXTS[spec] = (stamp, ctx)
    return ctx


def connect_tls(sock, spec, host: str, deadline: float) -> TlsStream:
    """Handshake with a backend on connected `sock`, sending `spec.sni` (else `host`)
    and verifying its certificate; raises ssl.SSLError / OSError / TimeoutError."""
    stream = TlsStream(sock, backend_context(spec), server_side=False,
                       server_hostname=spec.sni or host)
    stream.handshake(deadline)
    return stream


# --- relaying -----------------------------------------------------------------------------


class _Pair:
    """What both directions of one relay share."""

    __slots__ = ("end", "first", "up", "down", "ends", "seen", "quiet")

    def __init__(self, ends: tuple):
        self.end = self.first = ""
        self.up = self.down = 0
        self.ends = ends  # (client, upstream)
        self.seen = self.quiet = 0  # bytes moved at the last idle tick; quiet ticks since

    def reset_on_close(self) -> None:
        """Make both sockets' close send RST, not FIN (the relay is being cut: a fast
        stop, or the drain timeout), so neither peer takes the cut for a clean end."""
        for sock in self.ends:
            reset_on_close(sock)


def relay_streams(client, upstream, *, initial_up: bytes = b"",
                  idle_timeout: float | None = 300.0, buffer_size: int = 65536,
                  watch=None) -> RelayResult:
    """Relay between two connected socket-likes (TlsStream or plain) until both sides
    closed, one reset, or `idle_timeout` passed with no byte moved; close both.

    Same meaning of the result as relay.relay(). EOF from one side becomes shutdown
    (SHUT_WR: close_notify + FIN for TLS) on the other; a failure in either direction
    ends both (the sockets are closed, which wakes the other direction). One timer per
    relay watches for idleness (no timeout object per read). `watch(counts)`, if given,
    is called once at the start with an object whose `up` and `down` are the bytes
    moved so far (initial_up included), for a caller that reports them while open.
    """
    pair = _Pair((client, upstream))
    if watch is not None:
        watch(pair)
    down = ticker = None
    try:
        client.settimeout(None)
        upstream.settimeout(None)
        if initial_up:
            upstream.sendall(initial_up)
            pair.up += len(initial_up)
        if idle_timeout is not None:
            ticker = get_hub().loop.timer(idle_timeout / _IDLE_TICKS, idle_timeout / _IDLE_TICKS)
            ticker.start(_tick, pair)
        down = gevent.spawn(_direction, upstream, client, pair, False, buffer_size)
        _direction(client, upstream, pair, True, buffer_size)
        down.join()
    except OSError as exc:  # sending initial_up failed
        _failed(pair, _end_of(exc), "upstream")
    finally:
        if ticker is not None:
            ticker.close()
        if down is not None:
            down.kill()
        client.close()
        upstream.close()
    return RelayResult(pair.up, pair.down, pair.end or "closed", pair.first)


def _tick(pair: _Pair) -> None:
    """Runs in the hub, _IDLE_TICKS times per idle timeout: end a pair that moved
    nothing for all of them."""
    moved = pair.up + pair.down
    if moved != pair.seen:
        pair.seen, pair.quiet = moved, 0
        return
    pair.quiet += 1
    if pair.quiet >= _IDLE_TICKS:
        _failed(pair, "timeout", "")


def _direction(src, dst, pair: _Pair, up: bool, size: int) -> None:
    """Copy src -> dst until EOF (then half-close dst) or the pair ends."""
    side, peer = ("client", "upstream") if up else ("upstream", "client")
    while not pair.end:
        try:
            data = src.recv(size)
        except OSError as exc:
            return _failed(pair, _end_of(exc), side)
        if not data:
            pair.first = pair.first or side
            return _half_close(dst, pair, peer)
        try:
            dst.sendall(data)
        except OSError as exc:
            return _failed(pair, _end_of(exc), peer)
        if up:
            pair.up += len(data)
        else:
            pair.down += len(data)


def _half_close(dst, pair: _Pair, peer: str) -> None:
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError as exc:
        # A peer that already closed both ways (its EOF came first) may answer our
        # close_notify/FIN with RST: the exchange is over, not cut.
        if pair.first != peer:
            _failed(pair, _end_of(exc), peer)


def _end_of(exc: OSError) -> str:
    return "reset" if exc.errno in _RESET_ERRNOS else "error"


def _failed(pair: _Pair, end: str, side: str) -> None:
    """The first failure decides how the relay ends; closing both sockets wakes the
    other direction (gevent raises in a greenlet waiting on a socket closed under it)."""
    if pair.end:
        return
    pair.end = end
    pair.first = pair.first or side
    for sock in pair.ends:
        if end == "reset":  # the surviving peer must learn the stream was cut
            reset_on_close(sock)
        try:
            sock.close()
        except OSError:
            pass
