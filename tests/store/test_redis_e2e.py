"""Redis backends through a real `python -m dynproxy` process and real redis-server
processes: raw SET/DEL/expiry, `dynproxy backends add`, invalid keys, health, the
redis_sni plugin, and Redis dying under sustained traffic."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import gevent

RAW_RESCAN = 0.5  # rescan_interval of the proxies that must notice plain SET/DEL
MARGIN = 0.7  # connection round trips and scheduling on a busy test machine
POOL_RULES = 'pool web { members from redis "web-*" }\ndefault -> forward(web)\n'


def config(url: str, prefix: str, rescan: float, extra: str = "") -> str:
    return (f"redis:\n  url: {url}\n  key_prefix: '{prefix}'\n"
            f"  rescan_interval: {int(rescan * 1000)}ms\n{extra}")


def stored(backend, weight: int = 100) -> str:
    return json.dumps({"address": backend.address, "weight": weight, "healthy": True,
                       "last_check": 1234567890, "metadata": {}})


def who(port: int, hello: bytes = b"") -> str | None:
    """The backend answering one connection through the proxy (None: none did)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            if hello:
                sock.sendall(hello)
            line = sock.makefile("rb").readline()
    except OSError:
        return None
    return line.decode().strip().removeprefix("backend=") or None


def served_by(port: int, wanted: set, timeout: float, hello: bytes = b"") -> set:
    """Connect until the set of answering backends is `wanted` (or time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {who(port, hello) for _ in range(4)}
        if seen == wanted or time.monotonic() >= deadline:
            return seen
        time.sleep(0.05)


def until(predicate, deadline: float) -> bool:
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def cli(url: str, prefix: str, *args) -> None:
    subprocess.run([sys.executable, "-m", "dynproxy", "backends", "--redis", url,
                    "--prefix", prefix, *args], check=True, capture_output=True)


def test_plain_redis_cli_changes_within_the_rescan_interval(redis_server, prefix, proxy,
                                                            backends):
    r = redis_server.client()
    one, two, three = backends("web-1"), backends("web-2"), backends("web-3")
    r.set(f"{prefix}backends:web-1", stored(one))
    p = proxy(POOL_RULES, config=config(redis_server.url, prefix, RAW_RESCAN))
    assert served_by(p.tcp_port, {"web-1"}, 1) == {"web-1"}  # read at start
    r.set(f"{prefix}backends:web-2", stored(two))
    assert served_by(p.tcp_port, {"web-1", "web-2"}, RAW_RESCAN + MARGIN) == {"web-1", "web-2"}
    r.delete(f"{prefix}backends:web-1")
    assert served_by(p.tcp_port, {"web-2"}, RAW_RESCAN + MARGIN) == {"web-2"}
    r.set(f"{prefix}backends:web-3", stored(three), px=1500)  # expires by itself
    assert served_by(p.tcp_port, {"web-2", "web-3"}, RAW_RESCAN + MARGIN) == {"web-2", "web-3"}
    assert served_by(p.tcp_port, {"web-2"}, 1.5 + RAW_RESCAN + MARGIN) == {"web-2"}
    view = json.loads(p.http("/backends")[1])["pools"]["web"]["members"]
    assert [(m["id"], m["source"], m["healthy"]) for m in view] == [("web-2", "redis", True)]
    assert {"reason", "last_check", "active_connections", "draining"} <= set(view[0])


def test_invalid_keys_are_skipped_once_and_harm_nobody(redis_server, prefix, proxy, backends):
    r = redis_server.client()
    one = backends("web-1")
    r.set(f"{prefix}backends:web-1", stored(one))
    r.set(f"{prefix}backends:web-bad", '{"address": "127.0.0.1:1", "weight": ')
    r.set(f"{prefix}backends:web-neg", stored(one, weight=-1))
    p = proxy(POOL_RULES, config=config(redis_server.url, prefix, 0.1))
    time.sleep(0.5)  # several rescans of the same bad values
    assert served_by(p.tcp_port, {"web-1"}, 1) == {"web-1"}
    assert p.metric("proxy_redis_skipped_keys_total", reason="invalid_json") == 1
    assert p.metric("proxy_redis_skipped_keys_total", reason="bad_weight") == 1
    lines = [line for line in p.logs().splitlines() if "skipping Redis key" in line]
    assert len(lines) == 2 and any(f"{prefix}backends:web-bad" in line for line in lines)


def test_dynproxy_backends_add_is_applied_within_one_second(redis_server, prefix, proxy,
                                                             backends):
    one, two = backends("web-1"), backends("web-2")
    cli(redis_server.url, prefix, "add", "web-1", one.address)
    p = proxy(POOL_RULES, config=config(redis_server.url, prefix, rescan=60))
    assert served_by(p.tcp_port, {"web-1"}, 1) == {"web-1"}
    cli(redis_server.url, prefix, "add", "web-2", two.address)
    assert served_by(p.tcp_port, {"web-1", "web-2"}, 1.0) == {"web-1", "web-2"}
    cli(redis_server.url, prefix, "drain", "web-1")
    assert served_by(p.tcp_port, {"web-2"}, 1.0) == {"web-2"}
    cli(redis_server.url, prefix, "rm", "web-2")
    assert served_by(p.tcp_port, {None}, 1.0) == {None}  # no member left: no_backend


def test_health_marks_a_killed_backend_down_everywhere(redis_server, prefix, proxy, backends):
    r = redis_server.client()
    one, two = backends("web-1"), backends("web-2")
    key = f"{prefix}backends:web-1"
    r.set(key, stored(one))
    r.set(f"{prefix}backends:web-2", stored(two))
    rules = ('pool web { members from redis "web-*"\n'
             "  health tcp every 200ms timeout 100ms rise 2 fall 3 }\n"
             "default -> forward(web)\n")
    p = proxy(rules, config=config(redis_server.url, prefix, RAW_RESCAN))
    one.stop()
    deadline = time.monotonic() + 3 * 0.2 * 1.1 + MARGIN  # fall x interval (+ jitter)
    assert served_by(p.tcp_port, {"web-2"}, deadline - time.monotonic()) == {"web-2"}
    assert until(lambda: json.loads(r.get(key))["healthy"] is False, deadline)
    assert until(lambda: p.metric("proxy_backend_health", pool="web", backend="web-1") == 0,
                 deadline)
    assert p.metric("proxy_backend_health", pool="web", backend="web-2") == 1
    members = json.loads(p.http("/backends")[1])["pools"]["web"]["members"]
    down = next(m for m in members if m["id"] == "web-1")
    assert down["healthy"] is False and "connect failed" in down["reason"]
    assert down["last_check"] > 1.6e9


def client_hello(sni: str) -> bytes:
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_redis_sni_routes_hosts_from_redis(redis_server, prefix, proxy, backends):
    shop = backends("shop")
    rules = ('backend spare 127.0.0.1:1\n'
             'sni suffix ".apps.example.com" -> plugin(redis_sni)\n'
             "default -> reject\n")
    p = proxy(rules, config=config(redis_server.url, prefix, RAW_RESCAN))
    hello = client_hello("shop.apps.example.com")
    assert who(p.tcp_port, hello) is None  # no key yet: the next rule rejects
    cli(redis_server.url, prefix, "add", "shop.apps.example.com", shop.address)
    assert served_by(p.tcp_port, {"shop"}, 1.0, hello) == {"shop"}  # cache dropped at once


def test_redis_killed_under_sustained_traffic(redis_factory, prefix, proxy, backends, tmp_path,
                                             save_rdb):
    server = redis_factory()
    one, two = backends("web-1"), backends("web-2")
    server.client().set(f"{prefix}backends:web-1", stored(one))
    p = proxy(POOL_RULES, config=config(server.url, prefix, RAW_RESCAN))
    answers: list = []

    def traffic():
        while True:
            answers.append(who(p.tcp_port))

    clients = [gevent.spawn(traffic) for _ in range(4)]
    try:
        time.sleep(0.3)
        server.stop()
        time.sleep(0.3)
        assert served_by(p.tcp_port, {"web-1"}, 1) == {"web-1"}
        assert p.metric("proxy_redis_up") == 0
        time.sleep(1.0)  # down for a while: reconnect attempts, routing goes on
        # Redis comes back with its data (as a persistent one does) plus a change made
        # while this proxy could not see it: web-2 added. Loading both at once keeps
        # an empty Redis (which would rightly empty the pool) out of this test.
        save_rdb(tmp_path, {f"{prefix}backends:web-1": stored(one),
                            f"{prefix}backends:web-2": stored(two)})
        server.start(data_dir=str(tmp_path))
        assert served_by(p.tcp_port, {"web-1", "web-2"}, 3.0 + RAW_RESCAN + MARGIN) == \
            {"web-1", "web-2"}
        # served_by's own connections saw web-2; the four clients get their turn too
        # (they share this process's hub, so they may not have connected since)
        assert until(lambda: "web-2" in answers, time.monotonic() + 2.0)
    finally:
        gevent.killall(clients)
    assert len(answers) > 100
    assert None not in answers, f"{answers.count(None)} of {len(answers)} connections failed"
    assert set(answers) == {"web-1", "web-2"}
    assert p.metric("proxy_redis_up") == 1
    transitions = [line for line in p.logs().splitlines()
                   if "is down (" in line or "is up;" in line]
    assert len(transitions) == 3, transitions  # up, down, up: never one per attempt
