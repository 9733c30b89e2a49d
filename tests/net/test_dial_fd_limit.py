"""The proxy's own descriptor shortage is not the backend's fault: when the upstream
socket cannot be made (EMFILE, ENFILE, ENOBUFS, ENOMEM), the TCP connection ends
"fd_limit" and the UDP datagram is dropped "fd_limit", counted in
proxy_errors_total{reason="fd_limit_upstream"}, logged once per interval, and no
member's health moves. socket() is made to fail at the edge (dial's `_socket`); the
backends, the clients and everything after the shortage are real sockets.
"""

from __future__ import annotations

import _socket
import errno
import socket
from types import SimpleNamespace

import gevent
import pytest
from gevent import socket as gsocket

from dynproxy.net import dial, udp
from dynproxy.obs import log as obs_log

SHORTAGES = [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]


class FailingSockets:
    """Stands in for dial's `_socket` module: the next `failures` socket() calls fail
    with `code`, later ones make real sockets."""

    def __init__(self, code: int, failures: int):
        self.code, self.failures, self.calls = code, failures, 0

    def socket(self, *args):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError(self.code, errno.errorcode[self.code])
        return _socket.socket(*args)


@pytest.fixture
def site(in_process, monkeypatch):
    """make(rules) -> InProcess (no listener yet) with `health.passive_fall: 1`."""
    # a fresh once-per-interval memory: another test's warning must not hide this one's
    monkeypatch.setattr(obs_log, "_default", obs_log.OnceLogger("dynproxy"))
    return lambda rules: in_process(rules, "health:\n  passive_fall: 1\n")


def members(s) -> dict:
    return s.serving.current.topology.members


def refused(port: int) -> bool:
    """Connect through the proxy: True when it closes without a byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(100) == b""


def greeting(port: int) -> bytes:
    """Connect through the proxy: the backend's greeting line (NamedBackend)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.makefile("rb").readline()


@pytest.mark.parametrize("code", SHORTAGES, ids=[errno.errorcode[c] for c in SHORTAGES])
def test_tcp_shortage_ends_fd_limit_and_leaves_every_member_up(site, backends, monkeypatch,
                                                               code):
    a, b = backends("a"), backends("b")
    s = site(f"backend a {a.address}\nbackend b {b.address}\n"
             "pool p { member a\n member b }\ndefault -> forward(p)\n")
    proxy = s.tcp()
    failing = FailingSockets(code, failures=6)  # passive_fall is 1 here: one would do
    monkeypatch.setattr(dial, "_socket", failing)
    for _ in range(6):
        assert refused(proxy.port)
    assert failing.calls == 6  # one attempt per connection: no next member tried
    s.wait_until(lambda: len(s.access_lines()) == 6)
    assert {(x["end"], x["backend"]) for x in s.access_lines()} == {("fd_limit", None)}
    assert s.value("proxy_errors_total", reason="fd_limit_upstream") == 6
    assert s.value("proxy_requests_total", proto="tcp", result="fd_limit") == 6
    assert s.value("proxy_errors_total", reason="connect_failed") == 0
    for member in members(s).values():
        assert member.health.up and member.health.passive_failures == 0, member.health
        assert member.active == 0
    [warning] = [r for r in s.records() if "cannot open a TCP socket" in r.get("msg", "")]
    assert "ulimit -n" in warning["msg"] and "server.max_connections" in warning["msg"]
    # descriptors again: both members serve at once, none had been marked down
    served = {greeting(proxy.port) for _ in range(4)}
    assert served == {b"backend=a\n", b"backend=b\n"}
    assert a.accepted + b.accepted == 4


def test_a_refused_connect_still_counts_against_the_member(site, backends, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    a = backends("a")
    s = site(f"backend dead {dead}\nbackend a {a.address}\n"
             "pool p { member dead\n member a }\ndefault -> forward(p)\n")
    proxy = s.tcp()
    monkeypatch.setattr(dial, "_socket", FailingSockets(errno.EMFILE, failures=1))
    assert refused(proxy.port)  # the shortage: nobody's fault but ours
    assert members(s)["dead"].health.up
    for _ in range(2):  # passive_fall 1: the first refused connect marks `dead` down
        assert greeting(proxy.port) == b"backend=a\n"
    assert not members(s)["dead"].health.up and members(s)["a"].health.up
    assert s.value("proxy_errors_total", reason="connect_failed") == 1


def test_udp_shortage_drops_the_datagram_fd_limit_and_leaves_the_member_up(
        site, monkeypatch):
    echo = gsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]

    def serve():
        while True:
            data, peer = echo.recvfrom(65535)
            echo.sendto(b"e:" + data, peer)

    server = gevent.spawn(serve)
    client = gsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    try:
        s = site(f"backend e 127.0.0.1:{echo_port}\ndefault -> forward(e)\n")
        proxy = s.udp()
        monkeypatch.setattr(udp, "REFUSAL_TTL", 0.2)  # the source's refusal is remembered
        monkeypatch.setattr(dial, "_socket", SimpleNamespace(socket=FailingSockets(
            errno.EMFILE, failures=1).socket))
        client.sendto(b"lost", ("127.0.0.1", proxy.port))
        s.wait_until(lambda: s.value("proxy_errors_total", reason="fd_limit_upstream") == 1)
        assert s.value("proxy_errors_total", reason="udp_fd_limit") == 1
        assert s.value("proxy_requests_total", proto="udp", result="fd_limit") == 1
        assert proxy.sessions == 0
        member = members(s)["e"]
        assert member.health.up and member.health.passive_failures == 0
        assert member.active == 0
        [line] = s.access_lines()
        assert (line["end"], line["backend"], line["proto"]) == ("fd_limit", None, "udp")
        assert any("cannot open a UDP socket" in r.get("msg", "") for r in s.records())
        gevent.sleep(0.25)  # past the refusal: the same client gets a session now
        client.sendto(b"back", ("127.0.0.1", proxy.port))
        assert client.recvfrom(65535)[0] == b"e:back"
        assert proxy.sessions == 1 and member.health.up
    finally:
        client.close()
        server.kill()
        echo.close()
