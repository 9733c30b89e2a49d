"""Balancing through a real `python -m dynproxy`: exact weighted round robin ratios,
least connections, consistent hashing on source address and SNI, and a dead member
falling through to the next one (passive health, seen in /metrics).

One proxy serves the whole module: each test has its own listener port and a rule
`dport PORT -> ...`, so their balancers and members do not share state. Backends greet
`backend=NAME` on accept, so the first line a client reads names the member picked.
"""

from __future__ import annotations

import socket
from collections import Counter
from types import SimpleNamespace

import pytest

LISTENERS = ("w_lb", "w_pool", "lc_pool", "lc_lb", "h_src", "h_sni", "h_pool", "fall",
             "all_dead")
RULES = """
backend dead {dead}
backend dead2 {dead2}
pool web {{
  member a weight 3
  member b weight 1
}}
pool lc {{
  member c
  member d
  balance least_conn
}}
pool sticky {{
  member t1
  member t2
  member t3
  balance hash(src)
}}
pool failing {{
  member dead
  member live
}}
rule w_lb: dport {w_lb} -> lb(a:3, b:1)
rule w_pool: dport {w_pool} -> forward(web)
rule lc_pool: dport {lc_pool} -> forward(lc)
rule lc_lb: dport {lc_lb} -> lb(c, d, algo=least_conn)
rule h_src: dport {h_src} -> lb(s1, s2, s3, s4, algo=hash(src))
rule h_sni: dport {h_sni} and sni suffix ".hash.test" -> lb(n1, n2, n3, n4, algo=hash(sni))
rule h_pool: dport {h_pool} -> lb(sticky, algo=least_conn)
rule fall: dport {fall} -> forward(failing)
rule all_dead: dport {all_dead} -> forward(dead2)
default -> reject
"""
NAMES = ("a", "b", "c", "d", "s1", "s2", "s3", "s4", "n1", "n2", "n3", "n4", "t1", "t2", "t3",
         "live")


@pytest.fixture(scope="module")
def site(testkit, tmp_path_factory):
    k = testkit
    members = {name: k.NamedBackend(name) for name in NAMES}
    ports = {name: k.free_port() for name in LISTENERS}
    decls = "".join(f"backend {n} {b.address}\n" for n, b in members.items())
    rules = decls + RULES.format(dead=dead_address(), dead2=dead_address(),
                                 **ports)
    binds = [arg for port in ports.values() for arg in ("--tcp-bind", f"127.0.0.1:{port}")]
    p = k.Proxy(tmp_path_factory.mktemp("balance"), rules, udp=False,
                config=k.fast_config(), extra_args=tuple(binds))
    yield SimpleNamespace(proxy=p, ports=ports, members=members,
                          line_of=lambda client: k.access_line_of(p, client))
    p.stop()
    for b in members.values():
        b.stop()


def pick(port: int, first: bytes = b"hi\n", source: str | None = None) -> str:
    """Connect (from `source`), send `first`, return the name of the backend that answered."""
    held = Held(port, first, source)
    held.close()
    return held.name


class Held:
    """A connection through the proxy, open until `close()`; `name` is its backend.

    It sends `first` at once (plain bytes are routed without waiting for a
    ClientHello) and reads the greeting and the echo, so nothing is left unread.
    """

    def __init__(self, port: int, first: bytes = b"hi\n", source: str | None = None):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=5,
            source_address=(source, 0) if source else None)
        self.client = self.sock.getsockname(), self.sock.getpeername()
        self.sock.sendall(first)
        expected = len(first)
        data = b""
        while b"\n" not in data or len(data) < data.index(b"\n") + 1 + expected:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before a backend answered; got {data!r}"
            data += chunk
        line, echoed = data.split(b"\n", 1)
        assert line.startswith(b"backend=") and echoed == first, data
        self.name = line[len(b"backend="):].decode()

    def close(self) -> None:
        self.sock.close()


def dead_address() -> str:
    """An address where nothing listens (connect is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def health_of(proxy, **labels) -> list[float]:
    """Values of the proxy_backend_health samples carrying all `labels` (any order)."""
    out = []
    for line in proxy.metrics().splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith("proxy_backend_health{") and all(
                f'{k}="{v}"' in head for k, v in labels.items()):
            out.append(float(value))
    return out


# ---------------------------------------------------------------- weighted round robin

@pytest.mark.parametrize("listener", ["w_lb", "w_pool"])
def test_weights_3_to_1_give_exact_counts(site, listener):
    """lb(a:3, b:1) and a pool with `member a weight 3` / `member b weight 1`."""
    a, b = site.members["a"], site.members["b"]
    before = (a.accepted, b.accepted)
    picks = [pick(site.ports[listener]) for _ in range(12)]
    # smooth weighted round robin (nginx): a a b a, so exactly 3:1 over any 4 in a row
    assert picks == ["a", "a", "b", "a"] * 3
    assert (a.accepted - before[0], b.accepted - before[1]) == (9, 3)


# ---------------------------------------------------------------- least connections

@pytest.mark.parametrize("listener", ["lc_pool", "lc_lb"])
def test_least_conn_sends_new_connections_to_the_less_busy_member(site, listener):
    port = site.ports[listener]
    held = [Held(port) for _ in range(4)]
    assert Counter(h.name for h in held) == {"c": 2, "d": 2}  # equal load takes turns
    on_d = [h for h in held if h.name == "d"]
    for h in on_d:
        h.close()
    for h in on_d:
        site.line_of(h.client)  # logged at close: the proxy no longer counts it on d
    more = [Held(port) for _ in range(2)]
    assert [h.name for h in more] == ["d", "d"]  # c still holds 2
    for h in held + more:
        h.close()
    for h in held + more:
        site.line_of(h.client)


# ---------------------------------------------------------------- consistent hashing

def test_hash_src_keeps_each_client_address_on_one_member_and_moves_only_a_dead_ones(site):
    port = site.ports["h_src"]
    sources = [f"127.0.0.{i}" for i in range(2, 18)]
    placed = {src: pick(port, source=src) for src in sources}
    for src in sources:  # sticky
        assert pick(port, source=src) == placed[src]
    assert len(set(placed.values())) >= 3  # spread over the members
    # one member dies: only its clients move (to the next live member); the rest stay
    gone = placed[sources[0]]
    site.members[gone].sock.shutdown(socket.SHUT_RDWR)  # stop listening: refused
    after = {src: pick(port, source=src) for src in sources}
    for src in sources:
        if placed[src] == gone:
            assert after[src] != gone
        else:
            assert after[src] == placed[src], src


def test_hash_sni_keeps_each_name_on_one_member(site, client_hello):
    port = site.ports["h_sni"]
    names = [f"tenant{i}.hash.test" for i in range(16)]
    placed = {n: pick(port, client_hello(n)) for n in names}
    for n in names:
        # the SNI decides, not its case or a trailing dot (both are normalised)
        assert pick(port, client_hello(n.upper() + ".")) == placed[n]
    assert len(set(placed.values())) >= 3


def test_a_pool_hashing_on_src_stays_sticky_inside_an_lb(site):
    """lb(sticky, algo=least_conn): the lb's own algorithm picks the pool, the pool's
    `balance hash(src)` still picks the member by client address."""
    port = site.ports["h_pool"]
    sources = [f"127.0.1.{i}" for i in range(2, 10)]
    placed = {src: pick(port, source=src) for src in sources}
    for src in sources:
        assert [pick(port, source=src) for _ in range(2)] == [placed[src]] * 2
    assert len(set(placed.values())) >= 2


# ---------------------------------------------------------------- connect failures

def test_connect_failure_falls_through_and_marks_the_member_down_after_fall_failures(site):
    p = site.proxy
    failed = p.metric("proxy_errors_total", reason="connect_failed")
    clients = [Held(site.ports["fall"]) for _ in range(12)]
    for h in clients:
        h.close()
    # Every client is served: a refused connect moves on to the next member at once.
    assert [h.name for h in clients] == ["live"] * 12
    # Passive health: `fall` (3) refused connects mark `dead` down; while it rests, no
    # connection is tried on it again (so exactly 3 failures, not one per client).
    assert p.metric("proxy_errors_total", reason="connect_failed") == failed + 3
    assert health_of(p, pool="failing", backend="dead") == [0.0]
    assert "backend dead (127.0.0.1:" in p.logs()
    for h in clients:
        assert (site.line_of(h.client)["backend"], site.line_of(h.client)["end"]) == \
            ("live", "closed")


def test_all_members_dead_ends_connect_failed_and_the_client_is_closed(site):
    p = site.proxy
    before = p.metric("proxy_requests_total", proto="tcp", result="connect_failed")
    with socket.create_connection(("127.0.0.1", site.ports["all_dead"]), timeout=5) as sock:
        client = sock.getsockname(), sock.getpeername()
        sock.sendall(b"hi\n")  # plain bytes: routed at once (this proxy peeks for SNI)
        assert sock.recv(100) == b""
    line = site.line_of(client)
    assert (line["backend"], line["end"], line["bytes_up"]) == ("dead2", "connect_failed", 0)
    assert p.metric("proxy_requests_total", proto="tcp", result="connect_failed") == before + 1


def test_a_blackholed_member_times_out_and_the_next_member_serves(proxy, backends,
                                                                    proxy_config):
    # A member that never completes the handshake (a full backlog) gets the connect
    # timeout, then the next member is tried: the client is served, not failed.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue so further SYNs go unanswered
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    a = backends("a")
    p = proxy(f"backend hole 127.0.0.1:{port}\nbackend a {a.address}\n"
              "pool p { member hole weight 5\n member a weight 1 }\ndefault -> forward(p)\n",
              config=proxy_config(connect="300ms"))
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as c:
                assert c.makefile("rb").readline() == b"backend=a\n"
    finally:
        for s in fillers:
            s.close()
        hole.close()
