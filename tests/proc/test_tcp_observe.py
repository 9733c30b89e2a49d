"""/metrics counters and access-log lines of a real `python -m dynproxy` after known
traffic: three relayed connections (one TLS with SNI), one rejected, one whose only
backend refuses. Every figure is exact: the proxy is fresh and nothing else talks to it.
"""

from __future__ import annotations

import json
import re
import socket
from types import SimpleNamespace

import pytest

ACCESS_FIELDS = {"time", "logger", "client", "listener", "proto", "sni", "rule", "backend",
                 "bytes_up", "bytes_down", "duration_ms", "end"}


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def exchange(port: int, data: bytes) -> tuple[tuple, bytes]:
    """Send `data`, half-close, read to EOF: ((client address, proxy address), bytes
    received)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        client = sock.getsockname(), sock.getpeername()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return client, got


@pytest.fixture(scope="module")
def traffic(testkit, tmp_path_factory):
    k = testkit
    web = k.NamedBackend("web")
    ports = {"plain": k.free_port(), "deny": k.free_port(), "dead": k.free_port()}
    p = k.Proxy(tmp_path_factory.mktemp("observe"), f"""backend web {web.address}
backend dead {dead_address()}
rule tls: sni exact "hello.example.com" -> forward(web)
rule deny: dport {ports["deny"]} -> reject
rule down: dport {ports["dead"]} -> forward(dead)
rule plain: dport {ports["plain"]} -> forward(web)
default -> reject
""", udp=False, config=k.fast_config(),
                extra_args=tuple(a for port in ports.values()
                                 for a in ("--tcp-bind", f"127.0.0.1:{port}")))
    hello = k.build_client_hello("hello.example.com", ("h2",))
    data = bytes(range(100))
    out = SimpleNamespace(proxy=p, hello=hello, data=data, ports=ports, web=web)
    out.plain = [exchange(ports["plain"], data) for _ in range(2)]
    out.tls = exchange(ports["plain"], hello)
    out.denied = exchange(ports["deny"], data)
    out.dead = exchange(ports["dead"], data)
    out.lines = p.wait_access_lines(5)
    yield out
    p.stop()
    web.stop()


def test_traffic_went_where_the_rules_say(traffic):
    t = traffic
    greeting = b"backend=web\n"
    assert [got for _, got in t.plain] == [greeting + t.data] * 2
    assert t.tls[1] == greeting + t.hello
    assert t.denied[1] == t.dead[1] == b""


def test_access_log_has_one_line_per_connection_with_every_field(traffic):
    t, p = traffic, traffic.proxy
    assert len(t.lines) == 5
    by_ends = {(x["client"], x["listener"]): x for x in t.lines}
    assert len(by_ends) == 5
    rules = p.rules_path

    def line(conn) -> dict:
        (_, client_port), (_, port) = conn[0]
        found = by_ends[(f"127.0.0.1:{client_port}", f"tcp:127.0.0.1:{port}")]
        assert ACCESS_FIELDS <= set(found), found
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", found["time"])
        assert found["proto"] == "tcp" and found["duration_ms"] >= 0
        return {k: found[k] for k in ("listener", "sni", "rule", "backend", "bytes_up",
                                      "bytes_down", "end")}

    main = f"tcp:127.0.0.1:{t.ports['plain']}"
    for conn in t.plain:
        assert line(conn) == dict(listener=main, sni=None, rule=f"{rules}:6", backend="web",
                                  bytes_up=100, bytes_down=112, end="closed")
    assert line(t.tls) == dict(listener=main, sni="hello.example.com", rule=f"{rules}:3",
                               backend="web", bytes_up=len(t.hello),
                               bytes_down=12 + len(t.hello), end="closed")
    assert line(t.denied) == dict(listener=f"tcp:127.0.0.1:{t.ports['deny']}", sni=None,
                                  rule=f"{rules}:4", backend=None, bytes_up=0, bytes_down=0,
                                  end="rejected")
    assert line(t.dead) == dict(listener=f"tcp:127.0.0.1:{t.ports['dead']}", sni=None,
                                rule=f"{rules}:5", backend="dead", bytes_up=0, bytes_down=0,
                                end="connect_failed")


def test_every_log_line_master_worker_or_access_carries_its_time_as_time(traffic):
    text = traffic.proxy.logs()
    records = [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()
               if x.startswith("{")]
    loggers = {r.get("logger") for r in records}
    assert "dynproxy.access" in loggers and len(loggers) > 1, loggers
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
        assert "ts" not in record, record


def test_metrics_count_the_traffic_exactly(traffic):
    t, p = traffic, traffic.proxy
    hello = len(t.hello)
    expected = {
        ("proxy_connections_total", (("proto", "tcp"),)): 5,
        ("proxy_connections_total", (("listener", f"tcp:127.0.0.1:{t.ports['plain']}"),)): 3,
        ("proxy_requests_total", (("proto", "tcp"), ("result", "closed"))): 3,
        ("proxy_requests_total", (("proto", "tcp"), ("result", "rejected"))): 1,
        ("proxy_requests_total", (("proto", "tcp"), ("result", "connect_failed"))): 1,
        ("proxy_bytes_transferred_total", (("direction", "up"), ("proto", "tcp"))):
            200 + hello,
        ("proxy_bytes_transferred_total", (("direction", "down"), ("proto", "tcp"))):
            224 + 12 + hello,
        ("proxy_routing_decisions_total", (("rule", "plain"), ("action", "forward"))): 2,
        ("proxy_routing_decisions_total", (("rule", "tls"), ("action", "forward"))): 1,
        ("proxy_routing_decisions_total", (("rule", "deny"), ("action", "reject"))): 1,
        ("proxy_routing_decisions_total", (("rule", "down"), ("action", "forward"))): 1,
        ("proxy_errors_total", (("reason", "connect_failed"),)): 1,
        ("proxy_active_connections", (("proto", "tcp"),)): 0,
        ("proxy_request_duration_seconds_count", (("proto", "tcp"),)): 5,
        ("proxy_backend_response_time_seconds_count", (("backend", "web"),)): 3,
    }
    got = {key: p.metric(key[0], **dict(key[1])) for key in expected}
    assert got == expected
    # every other error reason is zero: no timeouts, no bad ClientHellos
    assert p.metric("proxy_errors_total") == 1


def test_metric_labels_never_carry_the_sni_or_a_client_address(traffic):
    text = traffic.proxy.metrics()
    assert "hello.example.com" not in text
    for (client, _), _ in [*traffic.plain, traffic.tls, traffic.denied, traffic.dead]:
        assert f":{client[1]}" not in text
    # Labelled families appear with their first sample (proxy_backend_health: see
    # test_tcp_balance; proxy_tls_handshakes_total: the TLS termination tests).
    for name in ("proxy_connections_total", "proxy_bytes_transferred_total",
                 "proxy_requests_total", "proxy_active_connections", "proxy_errors_total",
                 "proxy_request_duration_seconds", "proxy_backend_response_time_seconds",
                 "proxy_routing_decisions_total"):
        assert re.search(rf"^# TYPE {name} ", text, re.M), name
