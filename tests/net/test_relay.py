"""Tests for dynproxy.net.relay: real TCP sockets on 127.0.0.1, gevent greenlets.

Each test builds the four sockets of one proxied connection: the test's client end,
the proxy's client side and upstream side (handed to relay()), and the test's server
end. Most tests run through both the splice path and the copy path.
"""

import errno
import fcntl
import hashlib
import os
import socket
import ssl
import struct
import time

import gevent
import pytest
from gevent.hub import get_hub
from gevent.monkey import get_original

from dynproxy.net import relay as relay_mod
from dynproxy.net.relay import BUFFERS, PIPES, BufferPool, PipePool, RelayResult, relay

from sockio import recv_to_eof

MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411  # bytes queued to read / not yet sent by a socket
LINGER_ABORT = struct.pack("ii", 1, 0)
StdlibSocket = get_original("socket", "socket")
LISTENER: list[socket.socket] = []  # made on first use, kept for the whole module


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one real TCP connection on loopback.

    One listener serves every pair (pairs are made one at a time, so accept returns the
    one just connected): a busy machine full of TIME_WAIT sockets runs out of free
    ports for a listener per pair long before it runs out of connections.
    """
    if not LISTENER:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        LISTENER.append(listener)
    near = socket.socket()
    near.connect(LISTENER[0].getsockname())  # a numeric address: no resolver thread
    far, _ = LISTENER[0].accept()
    return near, far


def stdlib_socket(sock: socket.socket) -> socket.socket:
    """The same connection as a plain stdlib socket object (no gevent watchers of its own)."""
    return StdlibSocket(fileno=sock.detach())


class Pair:
    """client_end <-TCP-> proxy_client [relay] proxy_upstream <-TCP-> server_end."""

    def __init__(self, bufsize: int | None = None, stdlib: bool = False) -> None:
        self.client_end, self.proxy_client = tcp_pair()
        self.proxy_upstream, self.server_end = tcp_pair()
        if stdlib:
            self.proxy_client = stdlib_socket(self.proxy_client)
            self.proxy_upstream = stdlib_socket(self.proxy_upstream)
        if bufsize:
            for sock in self.sockets():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)

    def sockets(self):
        return (self.client_end, self.proxy_client, self.proxy_upstream, self.server_end)

    def spawn(self, **kwargs) -> gevent.Greenlet:
        return gevent.spawn(relay, self.proxy_client, self.proxy_upstream, **kwargs)

    def close_ends(self) -> None:
        self.client_end.close()
        self.server_end.close()


def send_then_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition {condition} not reached in {timeout}s"
        gevent.sleep(0.01)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def no_leaked_pool_loans():
    """Every test must end with every pipe and buffer given back."""
    yield
    assert (PIPES.lent, BUFFERS.lent) == (0, 0)


# --- bulk, ordering, half-close ----------------------------------------------------


@pytest.mark.parametrize("use_splice", MODES)
def test_10mb_each_way_is_byte_exact(use_splice):
    pair = Pair()
    up_data, down_data = os.urandom(10 << 20), os.urandom(10 << 20)
    job = pair.spawn(use_splice=use_splice)
    senders = [gevent.spawn(send_then_shut, pair.client_end, up_data),
               gevent.spawn(send_then_shut, pair.server_end, down_data)]
    at_server = gevent.spawn(recv_to_eof, pair.server_end)
    at_client = gevent.spawn(recv_to_eof, pair.client_end)
    gevent.joinall([*senders, at_server, at_client], raise_error=True)
    result = job.get(timeout=10)
    assert digest(at_server.value) == digest(up_data)
    assert digest(at_client.value) == digest(down_data)
    assert result == RelayResult(10 << 20, 10 << 20, "closed", result.ended_by)
    assert result.ended_by in ("client", "upstream")
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_stdlib_sockets_relay_too(use_splice):
    pair = Pair(stdlib=True)
    up_data, down_data = os.urandom(1 << 20), os.urandom(1 << 20)
    job = pair.spawn(use_splice=use_splice)
    gevent.spawn(send_then_shut, pair.client_end, up_data)
    gevent.spawn(send_then_shut, pair.server_end, down_data)
    assert recv_to_eof(pair.server_end) == up_data
    assert recv_to_eof(pair.client_end) == down_data
    assert job.get(timeout=10) == RelayResult(1 << 20, 1 << 20, "closed", job.value.ended_by)
    assert pair.proxy_client.fileno() == pair.proxy_upstream.fileno() == -1
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_initial_bytes_go_upstream_first_and_count(use_splice):
    pair = Pair()
    job = pair.spawn(initial_up=b"\x16\x03\x01peeked", use_splice=use_splice)
    send_then_shut(pair.client_end, b"-rest")
    assert recv_to_eof(pair.server_end) == b"\x16\x03\x01peeked-rest"
    pair.server_end.shutdown(socket.SHUT_WR)
    assert recv_to_eof(pair.client_end) == b""
    assert job.get(timeout=10) == RelayResult(14, 0, "closed", "client")
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_initial_bytes_larger_than_the_socket_buffers_wait_for_upstream(use_splice):
    pair = Pair(bufsize=65536)
    initial, rest = os.urandom(4 << 20), os.urandom(1 << 20)
    job = pair.spawn(initial_up=initial, use_splice=use_splice)
    gevent.spawn(send_then_shut, pair.client_end, rest)
    gevent.sleep(0.05)  # upstream is not reading yet: the send of `initial` was partial
    assert not job.ready()
    assert digest(recv_to_eof(pair.server_end)) == digest(initial + rest)
    pair.server_end.shutdown(socket.SHUT_WR)
    assert job.get(timeout=10) == RelayResult(5 << 20, 0, "closed", "client")
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_client_half_close_still_gets_the_late_reply(use_splice):
    pair = Pair()
    job = pair.spawn(use_splice=use_splice)
    send_then_shut(pair.client_end, b"request")
    assert recv_to_eof(pair.server_end) == b"request"  # EOF reached the server
    gevent.sleep(0.05)  # the reply comes well after the client's half-close
    send_then_shut(pair.server_end, b"late reply")
    assert recv_to_eof(pair.client_end) == b"late reply"
    assert job.get(timeout=10) == RelayResult(7, 10, "closed", "client")
    assert pair.proxy_client.fileno() == pair.proxy_upstream.fileno() == -1
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_upstream_half_close_still_gets_the_late_request(use_splice):
    pair = Pair()
    job = pair.spawn(use_splice=use_splice)
    send_then_shut(pair.server_end, b"banner")
    assert recv_to_eof(pair.client_end) == b"banner"
    gevent.sleep(0.05)
    send_then_shut(pair.client_end, b"late request")
    assert recv_to_eof(pair.server_end) == b"late request"
    assert job.get(timeout=10) == RelayResult(12, 6, "closed", "upstream")
    pair.close_ends()


# --- idle timeout ------------------------------------------------------------------


@pytest.mark.parametrize("use_splice", MODES)
def test_idle_timeout_ends_a_silent_pair(use_splice):
    pair = Pair()
    started = time.monotonic()
    result = pair.spawn(idle_timeout=0.3, use_splice=use_splice).get(timeout=10)
    elapsed = time.monotonic() - started
    assert result == RelayResult(0, 0, "timeout", "")
    assert elapsed >= 0.29  # never before the pair was silent for the whole timeout
    assert pair.client_end.recv(10) == b"" and pair.server_end.recv(10) == b""
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_trickle_of_bytes_keeps_the_pair_alive(use_splice):
    pair = Pair()
    job = pair.spawn(idle_timeout=0.4, use_splice=use_splice)
    for _ in range(12):  # 1.2 s of traffic: three timeouts' worth
        pair.client_end.sendall(b"x")
        gevent.sleep(0.1)
    assert not job.ready()
    result = job.get(timeout=10)
    assert result == RelayResult(12, 0, "timeout", "")
    assert recv_to_eof(pair.server_end) == b"x" * 12
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
def test_half_closed_pair_still_times_out_and_names_the_first_side(use_splice):
    pair = Pair()
    job = pair.spawn(idle_timeout=0.2, use_splice=use_splice)
    pair.server_end.shutdown(socket.SHUT_WR)
    assert job.get(timeout=10) == RelayResult(0, 0, "timeout", "upstream")
    pair.close_ends()


def test_idle_relay_does_not_spin_the_loop():
    pair = Pair()
    loop = get_hub().loop
    job = pair.spawn(idle_timeout=None)
    gevent.sleep(0.05)
    before = loop.iteration
    gevent.sleep(0.3)
    assert loop.iteration - before < 10  # one wakeup for our sleep, none from the relay
    pair.client_end.close()
    pair.server_end.close()
    assert job.get(timeout=10).end == "closed"


# --- resets and errors -------------------------------------------------------------


@pytest.mark.parametrize("use_splice", MODES)
@pytest.mark.parametrize("resetting", ["client", "upstream"])
def test_reset_from_either_side_resets_the_other_and_closes_both(resetting, use_splice):
    pair = Pair()
    job = pair.spawn(use_splice=use_splice)
    pair.client_end.sendall(b"ping")
    assert pair.server_end.recv(10) == b"ping"
    breaker, survivor = ((pair.client_end, pair.server_end) if resetting == "client"
                         else (pair.server_end, pair.client_end))
    breaker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    breaker.close()
    result = job.get(timeout=10)
    assert result == RelayResult(4, 0, "reset", resetting)
    assert pair.proxy_client.fileno() == pair.proxy_upstream.fileno() == -1
    with pytest.raises(ConnectionResetError):
        survivor.recv(10)
    survivor.close()


@pytest.mark.parametrize("use_splice", MODES)
def test_writing_to_a_vanished_client_is_a_reset(use_splice):
    pair = Pair()
    job = pair.spawn(use_splice=use_splice)
    pair.client_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    pair.client_end.close()
    pair.server_end.sendall(b"reply into the void")  # may race the relay's read of the RST
    result = job.get(timeout=10)
    assert (result.end, result.ended_by, result.bytes_down) == ("reset", "client", 0)
    pair.server_end.close()


def test_tls_sockets_and_bad_sizes_are_refused_without_closing():
    pair = Pair()
    context = ssl.create_default_context()
    wrapped = context.wrap_socket(socket.socket(), do_handshake_on_connect=False,
                                  server_hostname="example.com")
    with pytest.raises(TypeError, match="TLS socket"):
        relay(wrapped, pair.proxy_upstream)
    with pytest.raises(ValueError, match="buffer_size"):
        relay(pair.proxy_client, pair.proxy_upstream, buffer_size=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        relay(pair.proxy_client, pair.proxy_upstream, idle_timeout=0)
    assert pair.proxy_client.fileno() != -1
    wrapped.close()
    for sock in pair.sockets():
        sock.close()


# --- backpressure, pools, cleanup ---------------------------------------------------


@pytest.mark.parametrize("use_splice", MODES)
def test_slow_reader_bounds_what_the_relay_holds(use_splice):
    buffer_size = 16384
    pair = Pair(bufsize=32768)
    data = os.urandom(8 << 20)
    sent = [0]

    def push():
        view = memoryview(data)
        while sent[0] < len(data):
            sent[0] += pair.server_end.send(view[sent[0]:])
        pair.server_end.shutdown(socket.SHUT_WR)

    job = pair.spawn(use_splice=use_splice, buffer_size=buffer_size)
    pusher = gevent.spawn(push)
    stalled = []
    wait_until(lambda: stalled.append(sent[0]) or stalled[-5:] == [sent[0]] * 5)
    in_kernel = (queued(pair.server_end, SIOCOUTQ) + queued(pair.proxy_upstream, SIOCINQ)
                 + queued(pair.proxy_client, SIOCOUTQ) + queued(pair.client_end, SIOCINQ))
    held_by_relay = sent[0] - in_kernel
    assert 0 <= held_by_relay <= buffer_size
    assert sent[0] < len(data)  # the pusher is blocked: nothing buffers without bound
    assert PIPES.lent + BUFFERS.lent <= 1
    received = recv_to_eof(pair.client_end)
    pusher.get(timeout=10)
    assert digest(received) == digest(data)
    pair.client_end.shutdown(socket.SHUT_WR)
    assert job.get(timeout=10).bytes_down == len(data)
    pair.close_ends()


@pytest.mark.parametrize("use_splice", MODES)
@pytest.mark.parametrize("stdlib", [False, True], ids=["gevent-sockets", "stdlib-sockets"])
def test_killed_mid_transfer_leaves_no_fd_and_no_watcher(use_splice, stdlib):
    for sock in tcp_pair():  # the shared listener exists before the count
        sock.close()
    PIPES.close_idle()
    loop = get_hub().loop
    fds_before, watchers_before = open_fds(), loop.activecnt
    pair = Pair(bufsize=32768, stdlib=stdlib)
    job = pair.spawn(use_splice=use_splice)
    pusher = gevent.spawn(pair.client_end.sendall, os.urandom(8 << 20))
    first = pair.server_end.recv(65536)  # bytes are flowing; then nobody reads
    assert first
    wait_until(lambda: PIPES.lent + BUFFERS.lent == 1)  # the relay holds bytes in flight
    job.kill()
    assert isinstance(job.value, gevent.GreenletExit)
    assert pair.proxy_client.fileno() == pair.proxy_upstream.fileno() == -1
    pusher.kill()
    pair.close_ends()
    gevent.sleep(0)
    PIPES.close_idle()
    assert (open_fds(), loop.activecnt) == (fds_before, watchers_before)


@pytest.mark.parametrize("use_splice", MODES)
def test_idle_connection_holds_no_pipe_or_buffer(use_splice):
    pair = Pair()
    job = pair.spawn(use_splice=use_splice)
    pair.client_end.sendall(b"hello")
    assert pair.server_end.recv(10) == b"hello"
    pair.server_end.sendall(b"world")
    assert pair.client_end.recv(10) == b"world"
    assert (PIPES.lent, BUFFERS.lent) == (0, 0)
    assert not job.ready()
    pair.client_end.close()
    pair.server_end.close()
    assert job.get(timeout=10).end == "closed"


@pytest.mark.parametrize("use_splice", MODES)
def test_200_concurrent_relays_are_byte_exact(use_splice):
    pairs = [Pair() for _ in range(200)]
    jobs, checks = [], []
    for index, pair in enumerate(pairs):
        up_data = os.urandom(32768 + index)
        down_data = os.urandom(65536 - index)
        jobs.append(pair.spawn(use_splice=use_splice))
        gevent.spawn(send_then_shut, pair.client_end, up_data)
        gevent.spawn(send_then_shut, pair.server_end, down_data)
        checks.append((gevent.spawn(recv_to_eof, pair.server_end), up_data,
                       gevent.spawn(recv_to_eof, pair.client_end), down_data))
    for at_server, up_data, at_client, down_data in checks:
        assert at_server.get(timeout=30) == up_data
        assert at_client.get(timeout=30) == down_data
    for job, (_, up_data, _, down_data) in zip(jobs, checks, strict=True):
        result = job.get(timeout=30)
        assert (result.bytes_up, result.bytes_down, result.end) == (
            len(up_data), len(down_data), "closed")
    for pair in pairs:
        pair.close_ends()


def test_pipe_pool_is_bounded_and_reused(monkeypatch):
    PIPES.close_idle()
    monkeypatch.setattr(PIPES, "limit", 4)
    created = PIPES.created
    for _ in range(5):  # one after the other: one pipe serves them all
        pair = Pair()
        job = pair.spawn()
        send_then_shut(pair.client_end, b"x" * 1000)
        send_then_shut(pair.server_end, b"y" * 1000)
        assert recv_to_eof(pair.server_end) and recv_to_eof(pair.client_end)
        assert job.get(timeout=10).end == "closed"
        pair.close_ends()
    assert PIPES.created - created == 1
    stuck = [Pair(bufsize=65536) for _ in range(10)]  # readers that do not read yet
    jobs = [pair.spawn() for pair in stuck]
    pushers = [gevent.spawn(send_then_shut, pair.server_end, os.urandom(1 << 20))
               for pair in stuck]
    wait_until(lambda: PIPES.lent == 10)  # each stalled relay holds one pipe
    for pair in stuck:
        assert len(recv_to_eof(pair.client_end)) == 1 << 20
        pair.client_end.shutdown(socket.SHUT_WR)
    gevent.joinall(pushers + jobs, raise_error=True)
    assert (PIPES.lent, len(PIPES)) == (0, 4)  # the other 6 were closed, not kept
    assert PIPES.created - created >= 10
    for pair in stuck:
        pair.close_ends()


def test_pipe_pool_closes_what_it_does_not_keep():
    pool = PipePool(limit=1)
    first, second = pool.take(65536), pool.take(1 << 18)
    assert fcntl.fcntl(second[1], fcntl.F_GETPIPE_SZ) == 1 << 18
    pool.give(first)
    pool.give(second)  # over the limit: closed
    with pytest.raises(OSError):
        os.fstat(second[0])
    assert pool.take(65536) is first and pool.created == 2
    pool.discard(first)
    with pytest.raises(OSError):
        os.fstat(first[0])
    assert (pool.lent, len(pool)) == (0, 0)


def test_buffer_pool_keeps_up_to_its_limit_per_size():
    pool = BufferPool(limit=1)
    a, b, small = pool.take(1024), pool.take(1024), pool.take(10)
    assert (len(a), len(small)) == (1024, 10)
    for view in (a, b, small):
        pool.give(view)
    assert len(pool) == 2 and pool.lent == 0
    assert pool.take(1024) is a and pool.take(10) is small and pool.take(1024) is not b


def test_splice_refused_by_the_socket_falls_back_to_copy(monkeypatch):
    real_splice = os.splice
    sockets = set()

    def splice_refusing_sockets(src, dst, count, off_src, off_dst, flags):
        if src in sockets:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count, off_src, off_dst, flags)

    monkeypatch.setattr(relay_mod, "_SPLICE", splice_refusing_sockets)
    pair = Pair()
    sockets.update((pair.proxy_client.fileno(), pair.proxy_upstream.fileno()))
    job = pair.spawn()
    data = os.urandom(1 << 20)
    gevent.spawn(send_then_shut, pair.client_end, data)
    assert recv_to_eof(pair.server_end) == data
    pair.server_end.shutdown(socket.SHUT_WR)
    assert recv_to_eof(pair.client_end) == b""
    assert job.get(timeout=10) == RelayResult(len(data), 0, "closed", "client")
    pair.close_ends()


@pytest.mark.parametrize("failure", [pytest.param(errno.EMFILE, id="EMFILE"),
                                     pytest.param(errno.ENFILE, id="ENFILE"),
                                     pytest.param(errno.ENOMEM, id="ENOMEM")])
def test_no_pipe_for_lack_of_descriptors_copies_instead_and_logs_once(monkeypatch, failure):
    from dynproxy.net import relay_pools
    from dynproxy.obs import log as obs_log

    lines = []

    class Lines:  # a fresh once-logger: no earlier test's line within its interval
        def log(self, level, msg, *args, **kw):
            lines.append(msg % args)

    monkeypatch.setattr(obs_log, "_default", obs_log.OnceLogger(Lines()))
    refusals = []
    monkeypatch.setattr(PIPES, "on_refused", lambda: refusals.append(1))

    def pipe2_refused(flags):
        raise OSError(failure, os.strerror(failure))

    PIPES.close_idle()  # nothing to reuse: every take must create a pipe
    monkeypatch.setattr(relay_pools.os, "pipe2", pipe2_refused)
    created, refused = PIPES.created, PIPES.refused
    pair = Pair()
    job = pair.spawn(use_splice=True)  # splice from the first byte
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    senders = [gevent.spawn(send_then_shut, pair.client_end, up),
               gevent.spawn(send_then_shut, pair.server_end, down)]
    assert digest(recv_to_eof(pair.server_end)) == digest(up)
    assert digest(recv_to_eof(pair.client_end)) == digest(down)
    gevent.joinall(senders, raise_error=True)
    result = job.get(timeout=10)
    assert (result.bytes_up, result.bytes_down, result.end) == (len(up), len(down), "closed")
    assert PIPES.created == created
    # each bulk read tried a pipe again (one might have been given back meanwhile)
    assert PIPES.refused - refused == len(refusals) >= 2
    assert len(lines) == 1 and "copying instead" in lines[0]
    assert os.strerror(failure) in lines[0]
    pair.close_ends()


def test_other_pipe_failures_still_end_the_relay_as_errors(monkeypatch):
    from dynproxy.net import relay_pools

    def pipe2_broken(flags):
        raise OSError(errno.EINVAL, "Invalid argument")

    PIPES.close_idle()
    monkeypatch.setattr(relay_pools.os, "pipe2", pipe2_broken)
    refused = PIPES.refused
    pair = Pair()
    job = pair.spawn(use_splice=True)
    pair.client_end.sendall(b"x" * 1000)
    assert job.get(timeout=10).end == "error"
    assert PIPES.refused == refused  # not a lack of resources: not counted as one
    pair.close_ends()
