"""UdpProxy over real UDP sockets on 127.0.0.1 and ::1, with real echo backends.

Everything runs on one gevent hub (proxy, backends and clients use gevent sockets),
so nothing here blocks the proxy it is testing.
"""

from __future__ import annotations

import json
import logging
import socket
from time import monotonic

import gevent
import pytest
from gevent import socket as gsocket

from dynproxy.core.config import load_config
from dynproxy.core.topology import Topology
from dynproxy.lang import load_text
from dynproxy.net.state import Serving, Snapshot
from dynproxy.net.tcp import BindError
from dynproxy.net.udp import UdpProxy
from dynproxy.net.udp_listen import open_udp_socket
from dynproxy.obs.metrics import init_metrics

CONFIG = load_config(None)
WAIT = 5.0  # upper bound on waiting for an event; never a measured duration


def snapshot(text: str, generation: int = 1, previous: Snapshot | None = None) -> Snapshot:
    rules = load_text(text, "<test>")
    topo = Topology(rules.backends, rules.pools, previous.topology if previous else None)
    return Snapshot(rules, topo, CONFIG, generation, needs_peek=False)


class Echo:
    """A UDP backend answering each datagram `copies` times with NAME:DATA."""

    def __init__(self, name: str, host: str = "127.0.0.1", copies: int = 1):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = gsocket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.prefix, self.copies = name.encode() + b":", copies
        self.greenlet = gevent.spawn(self._serve)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while True:
            data, addr = self.sock.recvfrom(65535)
            for _ in range(self.copies):
                self.sock.sendto(self.prefix + data, addr)

    def close(self) -> None:
        self.greenlet.kill()
        self.sock.close()


class Harness:
    def __init__(self):
        self.proxies: list[UdpProxy] = []
        self.closables: list = []

    def echo(self, name: str, host: str = "127.0.0.1", copies: int = 1) -> Echo:
        echo = Echo(name, host, copies)
        self.closables.append(echo)
        return echo

    def proxy(self, text: str, host: str = "127.0.0.1", idle: float = 60.0,
              max_sessions: int = 1000) -> UdpProxy:
        serving = Serving(snapshot(text))
        proxy = UdpProxy(open_udp_socket(host, 0, False), "test", serving, init_metrics(),
                         idle, max_sessions)
        proxy.start()
        self.proxies.append(proxy)
        return proxy

    def client(self, host: str = "127.0.0.1") -> gsocket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = gsocket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.settimeout(WAIT)
        self.closables.append(sock)
        return sock

    def close(self):
        for proxy in self.proxies:
            proxy.kill_all()
        for thing in self.closables:
            thing.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="dynproxy.access")
    return lambda: [json.loads(r.getMessage()) for r in caplog.records
                    if r.name == "dynproxy.access"]


def ask(client, proxy: UdpProxy, data: bytes, replies: int = 1) -> list[bytes]:
    host = client.getsockname()[0]
    client.sendto(data, (host, proxy.port))
    return [client.recvfrom(65535)[0] for _ in range(replies)]


def sample(proxy: UdpProxy, name: str, **labels) -> float:
    value = proxy.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def wait_until(condition) -> bool:
    deadline = monotonic() + WAIT
    while not condition() and monotonic() < deadline:
        gevent.sleep(0.005)
    return condition()


def member(proxy: UdpProxy, name: str):
    return proxy.serving.current.topology.members[name]


def two_backends(h, action: str) -> str:
    a, b = h.echo("a"), h.echo("b")
    return f"backend a {a.address}\nbackend b {b.address}\ndefault -> {action}\n"


# relaying --------------------------------------------------------------------------------
def test_round_trip(h):
    a = h.echo("a")
    proxy = h.proxy(f"backend a {a.address}\nproto udp -> forward(a)\n")
    client = h.client()
    assert ask(client, proxy, b"hello") == [b"a:hello"]
    assert ask(client, proxy, b"again") == [b"a:again"]
    assert proxy.sessions == 1
    assert member(proxy, "a").active == 1
    assert sample(proxy, "proxy_udp_sessions", listener="test") == 1
    assert sample(proxy, "proxy_connections_total", proto="udp", listener="test") == 1


def test_bytes_of_an_open_session_are_counted_while_it_lasts_and_exactly_at_its_end(h):
    a = h.echo("a")
    proxy = h.proxy(f"backend a {a.address}\nproto udp -> forward(a)\n")
    client = h.client()

    def counted() -> tuple[float, float]:
        return tuple(sample(proxy, "proxy_bytes_transferred_total", direction=d, proto="udp")
                     for d in ("up", "down"))

    for _ in range(10):  # a steady stream: the session never goes idle
        assert ask(client, proxy, b"x" * 100) == [b"a:" + b"x" * 100]
    assert wait_until(lambda: counted() == (1000, 1020))  # while the session is open
    assert proxy.sessions == 1
    assert ask(client, proxy, b"y" * 50) == [b"a:" + b"y" * 50]
    assert wait_until(lambda: counted() == (1050, 1072))
    assert ask(client, proxy, b"z" * 30) == [b"a:" + b"z" * 30]
    proxy.kill_all()  # its end adds what the sampler has not counted yet, nothing twice
    h.proxies.remove(proxy)
    assert counted() == (1080, 1104)


def test_every_reply_to_one_datagram_reaches_the_client(h):
    a = h.echo("a", copies=3)
    proxy = h.proxy(f"backend a {a.address}\ndefault -> forward(a)\n")
    assert ask(h.client(), proxy, b"x", replies=3) == [b"a:x"] * 3


def test_clients_get_their_own_sessions_and_keep_their_upstream(h):
    proxy = h.proxy(two_backends(h, "lb(a:1, b:1)"))
    first, second = h.client(), h.client()
    answers = {ask(first, proxy, b"1")[0][:1], ask(second, proxy, b"2")[0][:1]}
    assert answers == {b"a", b"b"}
    for _ in range(5):  # the balancer would alternate; the sessions must not
        assert ask(first, proxy, b"1")[0][:1] == ask(first, proxy, b"1")[0][:1]
        assert ask(second, proxy, b"2")[0][:1] == ask(second, proxy, b"2")[0][:1]
    assert proxy.sessions == 2


def test_weights_over_many_client_ports(h):
    proxy = h.proxy(two_backends(h, "lb(a:3, b:1)"))
    counts = {b"a": 0, b"b": 0}
    for _ in range(200):
        counts[ask(h.client(), proxy, b"w")[0][:1]] += 1
    assert counts == {b"a": 150, b"b": 50}


def test_ipv6_listener_to_ipv6_and_ipv4_backends(h, access):
    six, four = h.echo("six", "::1"), h.echo("four")
    proxy = h.proxy(f"backend six {six.address}\nbackend four {four.address}\n"
                    "default -> lb(six:1, four:1)\n", host="::1")
    answers = {ask(h.client("::1"), proxy, b"v6")[0] for _ in range(2)}
    assert answers == {b"six:v6", b"four:v6"}
    proxy.kill_all()
    assert all(line["client"].startswith("[::1]:") for line in access())


# session lifetime ----------------------------------------------------------------------------
def test_idle_session_expires_frees_the_member_and_logs(h, access):
    a = h.echo("a")
    proxy = h.proxy(f"backend a {a.address}\ndefault -> forward(a)\n", idle=0.3)
    assert ask(h.client(), proxy, b"hello") == [b"a:hello"]
    assert member(proxy, "a").active == 1
    assert wait_until(lambda: proxy.sessions == 0)
    assert member(proxy, "a").active == 0
    [line] = access()
    assert line["end"] == "timeout" and line["proto"] == "udp" and line["listener"] == "test"
    assert (line["backend"], line["rule"]) == ("a", "<test>:2")
    assert (line["bytes_up"], line["bytes_down"]) == (5, 7)
    assert (line["datagrams_up"], line["datagrams_down"]) == (1, 1)
    assert sample(proxy, "proxy_requests_total", proto="udp", result="timeout") == 1
    assert sample(proxy, "proxy_bytes_transferred_total", direction="up", proto="udp") == 5
    assert sample(proxy, "proxy_bytes_transferred_total", direction="down", proto="udp") == 7
    assert sample(proxy, "proxy_udp_sessions", listener="test") == 0


def test_activity_the_table_has_not_seen_yet_keeps_a_session(h):
    a = h.echo("a")
    idle = 10.0  # the expiry greenlet stays asleep; this test drives expiry by hand
    proxy = h.proxy(f"backend a {a.address}\ndefault -> forward(a)\n", idle=idle)
    client = h.client()
    ask(client, proxy, b"1")
    [sess] = proxy._by_addr.values()
    created = sess.start
    ask(client, proxy, b"2")  # within the touch slack: only the session knows of it
    assert sess.last > created
    proxy._expire(created + idle + (sess.last - created) / 2)
    assert proxy.sessions == 1
    proxy._expire(sess.last + idle + 0.001)
    assert proxy.sessions == 0 and member(proxy, "a").active == 0


def test_full_table_evicts_the_least_recently_active(h, access):
    a = h.echo("a")
    proxy = h.proxy(f"backend a {a.address}\ndefault -> forward(a)\n", max_sessions=2)
    first, second, third = h.client(), h.client(), h.client()
    for client in (first, second, third):
        ask(client, proxy, b"x")
    assert proxy.sessions == 2
    assert sample(proxy, "proxy_udp_sessions_evicted_total", listener="test") == 1
    [line] = access()
    assert line["client"] == "127.0.0.1:%d" % first.getsockname()[1]
    assert line["end"] == "evicted" and "detail" not in line
    assert member(proxy, "a").active == 2
    ask(first, proxy, b"back")  # a new session, which evicts the second client's
    assert sample(proxy, "proxy_udp_sessions_evicted_total", listener="test") == 2
    assert access()[-1]["client"] == "127.0.0.1:%d" % second.getsockname()[1]


def test_stop_accepting_keeps_sessions_and_kill_all_ends_them(h, access):
    a = h.echo("a")
    proxy = h.proxy(f"backend a {a.address}\ndefault -> forward(a)\n")
    old = h.client()
    ask(old, proxy, b"before")
    proxy.stop_accepting()
    assert ask(old, proxy, b"after") == [b"a:after"]
    new = h.client()
    new.sendto(b"late", ("127.0.0.1", proxy.port))
    assert wait_until(lambda: sample(proxy, "proxy_errors_total",
                                     reason="udp_not_accepting") == 1)
    assert proxy.sessions == 1
    proxy.kill_all()
    assert proxy.sessions == 0 and member(proxy, "a").active == 0
    assert [line["end"] for line in access()] == ["shutdown"]
    assert sample(proxy, "proxy_requests_total", proto="udp", result="shutdown") == 1


# refusals and failures -----------------------------------------------------------------------
def test_reject_drops_and_a_flood_is_routed_once(h, access):
    a = h.echo("a")
    proxy = h.proxy(f"backend a {a.address}\nsrc 127.0.0.2 -> reject\n"
                    "default -> forward(a)\n")
    rejected = h.client("127.0.0.2")
    for _ in range(50):
        rejected.sendto(b"no", ("127.0.0.1", proxy.port))
    ask(h.client(), proxy, b"yes")  # the listener queue is FIFO: the 50 came first
    assert sample(proxy, "proxy_errors_total", reason="udp_rejected") == 50
    assert sample(proxy, "proxy_requests_total", proto="udp", result="rejected") == 1
    assert sample(proxy, "proxy_routing_decisions_total", rule="<test>:2",
                  action="reject") == 1
    rejected.setblocking(False)
    with pytest.raises(BlockingIOError):
        rejected.recv(100)
    assert proxy.sessions == 1
    assert [(line["end"], line["rule"]) for line in access()] == [("rejected", "<test>:2")]


def test_new_rules_give_rejected_sources_a_fresh_decision(h):
    a = h.echo("a")
    backend = f"backend a {a.address}\n"
    proxy = h.proxy(backend + "default -> reject\n")
    client = h.client()
    client.sendto(b"no", ("127.0.0.1", proxy.port))
    assert wait_until(lambda: sample(proxy, "proxy_errors_total", reason="udp_rejected") == 1)
    proxy.serving.swap(snapshot(backend + "default -> forward(a)\n", 2,
                                proxy.serving.current))
    assert ask(client, proxy, b"now") == [b"a:now"]


def test_unreachable_backend_counts_passive_failures_without_crashing(h, access):
    closed = gsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the kernel answers ICMP port unreachable
    proxy = h.proxy(f"backend dead 127.0.0.1:{port}\ndefault -> forward(dead)\n")
    dead = member(proxy, "dead")
    client = h.client()
    for failures in (1, 2, 3):  # fall 3: the third failure marks it down
        client.sendto(b"anyone?", ("127.0.0.1", proxy.port))
        assert wait_until(lambda n=failures: sample(proxy, "proxy_errors_total",
                                                    reason="udp_refused") == n)
        assert wait_until(lambda: proxy.sessions == 0)
        assert dead.active == 0
    assert not dead.health.up
    assert sample(proxy, "proxy_backend_health", pool="-", backend="dead") == 0
    assert sample(proxy, "proxy_requests_total", proto="udp", result="connect_failed") == 3
    client.sendto(b"still?", ("127.0.0.1", proxy.port))  # now nobody is available
    assert wait_until(lambda: sample(proxy, "proxy_requests_total", proto="udp",
                                     result="no_backend") == 1)
    assert [line["end"] for line in access()] == ["connect_failed"] * 3 + ["no_backend"]


# reload ------------------------------------------------------------------------------------
def test_swap_keeps_sessions_on_their_upstream_and_new_clients_follow_new_rules(h):
    declared = two_backends(h, "forward(a)").rsplit("default", 1)[0]
    proxy = h.proxy(declared + "default -> forward(a)\n")
    old = h.client()
    assert ask(old, proxy, b"1") == [b"a:1"]
    proxy.serving.swap(snapshot(declared + "default -> forward(b)\n", 2,
                                proxy.serving.current))
    new = h.client()
    assert ask(new, proxy, b"2") == [b"b:2"]
    assert ask(old, proxy, b"3") == [b"a:3"]
    assert member(proxy, "a").active == 1 and member(proxy, "b").active == 1


def test_port_in_use_is_a_bind_error_naming_the_address():
    taken = open_udp_socket("127.0.0.1", 0, False)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(BindError, match=rf"udp 127\.0\.0\.1:{port}: the port is already"):
            open_udp_socket("127.0.0.1", port, False)
    finally:
        taken.close()
