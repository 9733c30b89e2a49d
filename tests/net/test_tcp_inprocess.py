"""The TCP connection path in this process: long-lived worker greenlets, relays that run
in the hub without a greenlet, closers for `redis.close_removed`, the fast stop, and
the batched metrics and access lines (pushed before the lines are written).
"""

from __future__ import annotations

import socket

import gevent
import pytest

from dynproxy.net.tcp_accept import IDLE_WORKERS

from sockio import recv_line

CONFIG = "server:\n  timeouts:\n    client_hello: 5s\n    idle: 30s\n"


def greeted(s) -> socket.socket:
    """A connection through `s` that the backend has greeted."""
    sock = s.connect()
    assert recv_line(sock) == b"backend=web\n"
    return sock


@pytest.fixture
def site(in_process, backends):
    """start(extra_rules="", max_connections=100) -> InProcess with one TCP listener."""
    web = backends("web")

    def start(extra: str = "", max_connections: int = 100):
        s = in_process(f"backend web {web.address}\n{extra}default -> forward(web)\n", CONFIG)
        s.tcp(max_connections)
        return s
    return start


def test_a_relayed_connection_is_counted_before_its_access_line_is_written(site):
    s = site()
    with greeted(s) as sock:
        client = sock.getsockname()
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
    s.wait_until(lambda: s.access_lines())
    [line] = s.access_lines()
    assert (line["client"], line["backend"], line["end"]) == (
        f"127.0.0.1:{client[1]}", "web", "closed")
    assert (line["bytes_up"], line["bytes_down"]) == (4, 12 + 4)
    # the line is written by the batch flush, after the metrics it implies
    assert s.sample("proxy_requests_total", proto="tcp", result="closed") == 1
    assert s.sample("proxy_bytes_transferred_total", direction="down", proto="tcp") == 16
    assert s.sample("proxy_request_duration_seconds_count", proto="tcp") == 1
    assert s.sample("proxy_active_connections", proto="tcp") == 0
    assert s.proxy.connections == 0


def test_idle_connections_hold_no_greenlet_and_one_worker_serves_one_after_another(site):
    s = site()
    held = [greeted(s) for _ in range(IDLE_WORKERS + 10)]
    assert s.proxy.connections == len(held) == len(s.proxy.relays)
    # each connection's worker went back to take the next one: none is held by a relay
    assert len(s.proxy.acceptor.workers) == len(s.proxy.acceptor.idle) == 1
    for sock in held:
        sock.close()
    s.wait_until(lambda: s.proxy.connections == 0)
    assert s.proxy.relays == set()


def test_a_member_leaving_with_close_removed_closes_its_relayed_connections(site):
    s = site()
    member = s.serving.current.topology.members["web"]
    with greeted(s) as first, greeted(s) as second:
        assert len(member.connections) == 2 and member.active == 2
        assert member.close_connections() == 2
        assert first.recv(10) == b"" and second.recv(10) == b""
    assert (member.active, member.connections, s.proxy.connections) == (0, set(), 0)
    s.wait_until(lambda: len(s.access_lines()) == 2)


def test_kill_all_ends_relays_and_connections_still_waiting_for_a_client_hello(site):
    s = site('sni exact "a.example" -> forward(web)\n')
    relayed = [s.connect() for _ in range(3)]
    for sock in relayed:  # plain bytes: not TLS, routed at once
        sock.sendall(b"x")
        assert recv_line(sock) == b"backend=web\n"
        assert sock.recv(10) == b"x"
    silent = s.connect()  # sends nothing: its worker waits for the ClientHello
    s.wait_until(lambda: s.proxy.connections == 4)
    assert len(s.proxy.relays) == 3
    s.proxy.kill_all(timeout=1)
    for sock in relayed:  # cut mid-stream: RST, so no client takes it for a clean end
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        sock.close()
    assert silent.recv(10) == b""  # still in its handshake: closed as before
    silent.close()
    assert (s.proxy.connections, s.proxy.acceptor.workers) == (0, set())
    assert s.sample("proxy_active_connections", proto="tcp") == 0
    ends = sorted(line["end"] for line in s.access_lines())
    assert ends == ["closed", "shutdown", "shutdown", "shutdown"]  # cut relays say so


def test_the_connection_limit_keeps_the_next_client_in_the_backlog(site):
    s = site(max_connections=2)
    first, second = greeted(s), greeted(s)
    waiting = s.connect()
    gevent.sleep(0.2)
    assert s.proxy.connections == 2 and not s.proxy.acceptor.watcher.active
    first.close()
    assert recv_line(waiting) == b"backend=web\n"
    for sock in (second, waiting):
        sock.close()
    s.wait_until(lambda: s.proxy.connections == 0)
    assert s.proxy.acceptor.watcher.active
