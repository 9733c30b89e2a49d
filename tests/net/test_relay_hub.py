"""The relay as the TCP path drives it: a `Relay` in hub callbacks with no greenlet,
`on_done` and `abort`, copy-first flows that turn to splice for bulk, one idle clock per
timeout value, and io watchers reused from WATCHERS.
"""

from __future__ import annotations

import _socket
import os
import socket

import gevent
from gevent.hub import get_hub

from dynproxy.net import relay as relay_mod
from dynproxy.net.relay import PIPES, WATCHERS, Relay
from dynproxy.net.relay_flows import BULK_READ, CopyFlow, SpliceFlow

from sockio import recv_to_eof


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


class Ends:
    """client <-TCP-> raw client [Relay] raw upstream <-TCP-> server."""

    def __init__(self) -> None:
        self.client, proxy_client = tcp_pair()
        proxy_upstream, self.server = tcp_pair()
        # C-level sockets, as the TCP path hands them over (not gevent's: no watchers)
        self.raw = [_socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, s.detach())
                    for s in (proxy_client, proxy_upstream)]
        self.done: list[Relay] = []

    def relay(self, **kw) -> Relay:
        kw.setdefault("idle_timeout", 30.0)
        kw.setdefault("buffer_size", 65536)
        job = Relay(*self.raw, on_done=self.done.append, **kw)
        job.start(kw.pop("initial_up", b""))
        return job

    def close(self) -> None:
        self.client.close()
        self.server.close()


def test_on_done_gets_the_relay_once_after_both_sockets_are_closed():
    ends = Ends()
    job = ends.relay()
    ends.client.sendall(b"request")
    assert ends.server.recv(100) == b"request"
    ends.server.sendall(b"reply")
    assert ends.client.recv(100) == b"reply"
    ends.client.shutdown(socket.SHUT_WR)
    ends.server.shutdown(socket.SHUT_WR)
    assert recv_to_eof(ends.client) == recv_to_eof(ends.server) == b""
    gevent.sleep(0.05)
    assert ends.done == [job]
    assert (job.up.moved, job.down.moved, job.end) == (7, 5, "closed")
    assert job.result.bytes_up == 7
    assert ends.raw[0].fileno() == ends.raw[1].fileno() == -1
    ends.close()


def test_abort_closes_both_sockets_without_calling_on_done():
    ends = Ends()
    job = ends.relay()
    job.abort()
    assert ends.done == [] and job.end == "closed"
    assert ends.client.recv(10) == b"" and ends.server.recv(10) == b""
    job.abort()  # a second abort does nothing
    ends.close()


def test_copy_first_needs_no_pipe_for_small_messages_and_splices_bulk():
    ends = Ends()
    created, lent = PIPES.created, PIPES.lent
    job = ends.relay(copy_first=True)
    for _ in range(50):  # keep-alive traffic: many small messages, never bulk
        ends.client.sendall(b"GET / HTTP/1.1\r\n" + b"x" * 1000 + b"\r\n\r\n")
        assert len(ends.server.recv(2000)) == 1020
    gevent.sleep(0.01)
    assert type(job.up) is CopyFlow and PIPES.created == created and PIPES.lent == lent
    bulk = os.urandom(8 * BULK_READ)
    gevent.spawn(ends.server.sendall, bulk)
    got = bytearray()
    while len(got) < len(bulk):
        got += ends.client.recv(1 << 20)
    assert bytes(got) == bulk
    assert type(job.down) is SpliceFlow  # a read of BULK_READ bytes: the flow splices
    ends.client.close()
    ends.server.close()
    gevent.sleep(0.05)
    assert ends.done == [job] and job.down.moved == len(bulk)


def test_relays_with_one_idle_timeout_share_one_timer_that_stops_when_they_end():
    pairs = [Ends() for _ in range(3)]
    jobs = [p.relay(idle_timeout=0.25) for p in pairs]
    clock = relay_mod._CLOCKS[0.25]
    assert clock.relays == set(jobs) and clock.timer.active
    for p in pairs:
        assert p.client.recv(10) == b""  # the proxy closed the silent pair: idle timeout
    gevent.sleep(0.05)
    assert [j.end for j in jobs] == ["timeout"] * 3
    assert clock.relays == set() and not clock.timer.active
    for p in pairs:
        p.close()


def test_watchers_of_an_ended_relay_are_reused_by_the_next():
    loop = get_hub().loop
    ends = Ends()
    job = ends.relay()
    reader = job.up.reader
    job.abort()
    assert not reader.active
    again = [WATCHERS.take(loop, 0, 1) for _ in range(2)]  # the last two given back
    assert reader in again and reader.fd == 0
    for watcher in again:
        WATCHERS.give(watcher)
    ends.close()
