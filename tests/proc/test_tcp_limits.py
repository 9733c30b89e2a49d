"""Connection lifetimes and limits through a real `python -m dynproxy`: half-close both
ways, the idle timeout, `max_connections`, and a file descriptor limit (RLIMIT_NOFILE 64)
that must queue clients instead of crashing or failing them.
"""

from __future__ import annotations

import re
import resource
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from sockio import recv_line, recv_to_eof


class Held:
    """A connection through the proxy that got its backend's greeting; open until close()."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.client = self.sock.getsockname(), self.sock.getpeername()
        self.greeting = recv_line(self.sock)
        assert self.greeting.startswith(b"backend="), self.greeting

    def close(self) -> None:
        self.sock.close()


def readable(socks: list, wait: float) -> list:
    return select.select(socks, [], [], wait)[0]


def assert_alive(p) -> None:
    assert p.proc.poll() is None, p.logs()
    assert p.http("/healthz")[0] == 200
    assert "Traceback" not in p.logs()


# ---------------------------------------------------------------- one proxy: half-close, max

@pytest.fixture(scope="module")
def site(testkit, tmp_path_factory):
    k = testkit
    late: dict[str, bytes] = {}
    got_late = threading.Event()

    def reply_after_eof(conn):
        data = recv_to_eof(conn)
        time.sleep(0.1)  # the reply comes well after the client's half-close
        conn.sendall(b"got %d bytes\n" % len(data))

    def banner_then_read(conn):
        conn.sendall(b"banner\n")
        conn.shutdown(socket.SHUT_WR)
        late["data"] = recv_to_eof(conn)
        got_late.set()

    web = k.NamedBackend("web")
    after_eof, banner = k.ScriptedBackend(reply_after_eof), k.ScriptedBackend(banner_then_read)
    ports = {"after_eof": k.free_port(), "banner": k.free_port()}
    p = k.Proxy(tmp_path_factory.mktemp("limits"), f"""
backend web {web.address}
backend after_eof {after_eof.address}
backend banner {banner.address}
rule a: dport {ports["after_eof"]} -> forward(after_eof)
rule b: dport {ports["banner"]} -> forward(banner)
default -> forward(web)
""", udp=False, config=k.fast_config({"max_connections": 5}, idle="30s"),
                extra_args=tuple(a for port in ports.values()
                                 for a in ("--tcp-bind", f"127.0.0.1:{port}")))
    yield SimpleNamespace(proxy=p, ports=ports, web=web, late=late, got_late=got_late,
                          line_of=lambda client: k.access_line_of(p, client))
    p.stop()
    for b in (web, after_eof, banner):
        b.stop()


def test_client_half_close_still_receives_the_backends_later_reply(site):
    data = bytes(range(256)) * 12
    with socket.create_connection(("127.0.0.1", site.ports["after_eof"]), timeout=5) as sock:
        client = sock.getsockname(), sock.getpeername()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # "I am done sending", still listening
        assert recv_to_eof(sock) == b"got 3072 bytes\n"
    line = site.line_of(client)
    assert (line["end"], line["bytes_up"], line["bytes_down"]) == ("closed", 3072, 15)


def test_backend_half_close_still_receives_the_clients_later_bytes(site):
    with socket.create_connection(("127.0.0.1", site.ports["banner"]), timeout=5) as sock:
        client = sock.getsockname(), sock.getpeername()
        assert recv_to_eof(sock) == b"banner\n"  # the backend's EOF reached us...
        sock.sendall(b"late bytes")  # ...and our direction is still open
        sock.shutdown(socket.SHUT_WR)
        assert site.got_late.wait(5)
        assert recv_to_eof(sock) == b""
    assert site.late["data"] == b"late bytes"
    line = site.line_of(client)
    assert (line["end"], line["bytes_up"], line["bytes_down"]) == ("closed", 10, 7)


def test_max_connections_makes_the_next_client_wait_then_serves_it(site):
    p = site.proxy
    limit_hits = p.metric("proxy_errors_total", reason="max_connections")
    held = [Held(p.tcp_port) for _ in range(5)]
    waiting = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5)
    waiting.sendall(b"queued\n")
    # The 6th is in the kernel's backlog: connected, but the proxy does not take it
    # (no backend greeting) while 5 are open.
    assert readable([waiting], 0.5) == []
    assert p.metric("proxy_active_connections", proto="tcp") == 5
    assert site.web.accepted == 5
    held[0].close()
    assert recv_line(waiting) == b"backend=web\n"
    assert waiting.recv(100) == b"queued\n"
    for h in held[1:]:
        h.close()
    waiting.close()
    for h in held:
        assert site.line_of(h.client)["end"] == "closed"
    assert p.metric("proxy_errors_total", reason="max_connections") >= limit_hits + 1
    assert "the most it takes at once" in p.logs()
    assert_alive(p)


# ---------------------------------------------------------------- idle timeout

def test_idle_timeout_closes_a_silent_pair_but_not_a_talking_one(proxy, proxy_config,
                                                                  backends):
    web = backends("web")
    p = proxy(f"backend web {web.address}\ndefault -> forward(web)\n",
              udp=False, config=proxy_config(idle="1s"))
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10) as talking, \
            socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10) as silent:
        assert recv_line(talking) == recv_line(silent) == b"backend=web\n"
        for i in range(7):  # 1.75 s of traffic, a byte every 0.25 s: never idle for 1 s
            talking.sendall(b"%d" % i)
            assert talking.recv(10) == b"%d" % i
            time.sleep(0.25)
        # the silent pair was closed by the proxy meanwhile (EOF, not our socket timeout)
        assert silent.recv(100) == b""
        silent_client = silent.getsockname()
        talking.sendall(b"still here")
        assert talking.recv(100) == b"still here"
    line = [x for x in p.wait_access_lines(1) if x["end"] == "timeout"]
    assert [x["client"] for x in line] == [f"127.0.0.1:{silent_client[1]}"]
    assert p.metric("proxy_requests_total", proto="tcp", result="timeout") == 1


# ---------------------------------------------------------------- file descriptor limit

def test_fd_limit_queues_clients_and_serves_them_once_others_close(proxy, proxy_config,
                                                                    backends):
    web = backends("web")

    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    p = proxy(f"backend web {web.address}\ndefault -> forward(web)\n",
              udp=False, config=proxy_config(idle="30s"), preexec_fn=limit_fds)
    found = re.search(r"allows about (\d+) connections at once", p.logs())
    assert found, p.logs()
    budget = int(found[1])
    assert 1 <= budget < 30
    clients = [socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5)
               for _ in range(100)]
    served = wait_served(clients, budget)
    assert len(served) == budget  # the rest wait in the backlog: not closed, not reset
    # Those served close: as many queued clients are served in their place.
    for sock in served:
        sock.close()
    rest = [s for s in clients if s not in served]
    assert len(wait_served(rest, budget)) == budget
    for sock in clients:
        sock.close()
    # Once all are gone, new clients are served as usual, byte-exact.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10) as sock:
            assert recv_line(sock) == b"backend=web\n"
            sock.sendall(b"after the storm")
            assert sock.recv(100) == b"after the storm"
    assert_alive(p)
    assert p.metric("proxy_errors_total", reason="connect_failed") == 0
    assert p.metric("proxy_errors_total", reason="max_connections") >= 1


def wait_served(socks: list, count: int) -> list:
    """The sockets that received their greeting: wait for `count`, then make sure no
    other one gets served for a while (the proxy holds no more than that)."""
    served = []
    deadline = time.monotonic() + 10
    waiting = list(socks)
    while len(served) < count and time.monotonic() < deadline:
        for sock in readable(waiting, 0.2):
            assert recv_line(sock) == b"backend=web\n"
            served.append(sock)
            waiting.remove(sock)
    assert readable(waiting, 0.5) == []
    return served


def test_fds_used_up_elsewhere_pause_accepts_quietly_until_some_are_freed(
        proxy, proxy_config, backends):
    """UDP sessions (one upstream socket each) eat every descriptor: TCP accepts fail
    with EMFILE. The listener pauses and retries (counted, logged once, no traceback);
    the TCP client waits in the backlog and is served once the sessions expire."""
    web = backends("web")
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives, never answers
    upstream.bind(("127.0.0.1", 0))

    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    p = proxy(f"""backend web {web.address}
backend dns 127.0.0.1:{upstream.getsockname()[1]}
rule dns: proto udp -> forward(dns)
default -> forward(web)
""", config=proxy_config(udp_session_idle="1s"), preexec_fn=limit_fds)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(80)]
    try:
        for s in senders:
            s.sendto(b"query", ("127.0.0.1", p.udp_port))
        deadline = time.monotonic() + 10  # until the UDP side has run out of descriptors
        while p.metric("proxy_errors_total", reason="fd_limit_upstream") == 0:
            assert time.monotonic() < deadline, p.logs()
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=15) as sock:
            assert recv_line(sock) == b"backend=web\n"
            sock.sendall(b"served at last")
            assert sock.recv(100) == b"served at last"
    finally:
        for s in [*senders, upstream]:
            s.close()
    assert p.metric("proxy_errors_total", reason="fd_limit") >= 1
    assert p.logs().count("cannot accept: Too many open files") == 1
    # the UDP side's shortage is ours, not the backend's: `dns` was never marked down
    assert "backend dns (" not in p.logs() and p.logs().count("cannot open a UDP socket") == 1
    assert_alive(p)
