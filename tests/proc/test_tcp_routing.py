"""Routing through a real `python -m dynproxy`: SNI passthrough with real TLS handshakes,
ClientHellos cut into bytes and records, plain TCP, reject, and IPv6 listeners.

Real sockets on 127.0.0.1 and ::1; every backend is a thread in this process.
"""

from __future__ import annotations

import socket
import ssl
import time
from types import SimpleNamespace

import pytest

from sockio import recv_exact, recv_line

PAYLOAD = bytes(range(256)) * 400  # 100 KiB: several relay chunks each way


def send_in_pieces(sock: socket.socket, data: bytes, cuts) -> None:
    """Send `data` cut at the offsets `cuts`, one segment each (Nagle off, a pause between)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    last = 0
    for cut in [*cuts, len(data)]:
        if cut > last:
            sock.sendall(data[last:cut])
            time.sleep(0.002)
        last = cut


def record_boundaries(hello: bytes) -> list[int]:
    """Offsets where each TLS record of `hello` starts."""
    out, pos = [], 0
    while pos < len(hello):
        out.append(pos)
        pos += 5 + int.from_bytes(hello[pos + 3:pos + 5], "big")
    assert pos == len(hello)
    return out


# ---------------------------------------------------------------- one proxy for the module

RULES = """
backend api {api}
backend www {www}
backend web {web}
backend other {other}
backend v4 {v4}
backend v6 {v6}
rule api: sni exact "api.example.com" -> forward(api)
rule sites: sni suffix ".example.com" -> forward(www)
rule hand: sni suffix ".example.net" -> forward(web)
rule block: sni prefix "blocked." -> reject
rule six: dport {port6} -> forward(v4)
rule to6: dport {port_to6} -> forward(v6)
default -> forward(other)
"""


@pytest.fixture(scope="module")
def site(testkit, tls_certs, tmp_path_factory):
    """TLS backends `api` (certificate api.example.com) and `www` (*.example.com), echo
    backends `web`, `other`, `v4` and `v6` (on ::1), and one proxy listening on
    127.0.0.1 (main), [::1]:port6 and 127.0.0.1:port_to6, with RULES."""
    k = testkit
    tls = {name: k.TlsBackend(name, tls_certs[role].cert_path, tls_certs[role].key_path)
           for name, role in (("api", "exact"), ("www", "wildcard"))}
    plain = {name: k.NamedBackend(name) for name in ("web", "other", "v4")}
    plain["v6"] = k.NamedBackend("v6", host="::1")
    port6, port_to6 = k.free_port(host="::1"), k.free_port()
    rules = RULES.format(**{n: b.address for n, b in {**tls, **plain}.items()},
                         port6=port6, port_to6=port_to6)
    p = k.Proxy(tmp_path_factory.mktemp("routing"), rules, udp=False,
                config=k.fast_config(client_hello="5s"),
                extra_args=("--tcp-bind", f"[::1]:{port6}",
                            "--tcp-bind", f"127.0.0.1:{port_to6}"))
    yield SimpleNamespace(proxy=p, port=p.tcp_port, port6=port6, port_to6=port_to6,
                          line_of=lambda client: k.access_line_of(p, client),
                          ca=str(tls_certs["ca"].cert_path), **tls, **plain)
    p.stop()
    for b in [*tls.values(), *plain.values()]:
        b.stop()


def line_no(site, rule_name: str) -> str:
    """`file:line` of the rule called `rule_name` (or of `default`) in RULES."""
    start = "default ->" if rule_name == "default" else f"rule {rule_name}:"
    index = next(i for i, text in enumerate(RULES.splitlines()) if text.startswith(start))
    return f"{site.proxy.rules_path}:{index + 1}"


# ---------------------------------------------------------------- real TLS, passthrough

@pytest.mark.parametrize("name, expected, rule", [("api.example.com", "api", "api"),
                                                  ("shop.example.com", "www", "sites")])
def test_sni_routes_a_real_tls_handshake_end_to_end(site, name, expected, rule):
    backend = getattr(site, expected)
    before = (backend.handshakes, site.other.accepted)
    ctx = ssl.create_default_context(cafile=site.ca)
    with socket.create_connection(("127.0.0.1", site.port), timeout=5) as raw:
        client = raw.getsockname(), raw.getpeername()
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            # The handshake verified the backend's certificate for `name`: the bytes
            # passed through untouched, end to end.
            assert recv_line(tls) == f"backend={expected}\n".encode()
            tls.sendall(PAYLOAD)
            assert recv_exact(tls, len(PAYLOAD)) == PAYLOAD
            assert tls.version() in ("TLSv1.3", "TLSv1.2")
            tls.unwrap()  # close_notify both ways: a clean end, logged as "closed"
    assert (backend.handshakes, site.other.accepted) == (before[0] + 1, before[1])
    line = site.line_of(client)
    assert (line["sni"], line["rule"], line["backend"], line["end"]) == (
        name, line_no(site, rule), expected, "closed")
    assert line["bytes_up"] > len(PAYLOAD) and line["bytes_down"] > len(PAYLOAD)


# ---------------------------------------------------------------- hand-built ClientHellos

def echo_checked(site, data: bytes, cuts=(), port=None, host="127.0.0.1") -> tuple[bytes, dict]:
    """Send `data` (cut at `cuts`) through the proxy; assert the echo is byte-exact;
    return the greeting line and the connection's access-log line."""
    with socket.create_connection((host, port or site.port), timeout=5) as sock:
        client = sock.getsockname(), sock.getpeername()
        send_in_pieces(sock, data, cuts)
        line = recv_line(sock)
        assert recv_exact(sock, len(data)) == data
    return line, site.line_of(client)


def test_client_hello_fed_one_byte_at_a_time_is_routed_by_its_sni(site, client_hello):
    hello = client_hello("www.example.net", ("h2",))
    greeting, log = echo_checked(site, hello, cuts=range(1, len(hello)))
    assert greeting == b"backend=web\n"
    assert (log["sni"], log["rule"], log["bytes_up"]) == ("www.example.net",
                                                          line_no(site, "hand"), len(hello))


@pytest.mark.parametrize("cut_at", ["record starts", "inside headers and payloads"])
def test_client_hello_split_over_several_tls_records_is_routed_by_its_sni(
        site, client_hello, cut_at):
    # Five records (1, 2 and 40 payload bytes, then 600, then the rest), as a client
    # with a post-quantum key share may send them; one TCP segment per record, or
    # segments cut inside the record headers and payloads.
    hello = client_hello("a.b.example.net", key_share=1216, record_sizes=(1, 2, 40, 600))
    starts = record_boundaries(hello)
    assert len(starts) == 5
    cuts = starts if cut_at == "record starts" else sorted(
        {s + k for s in starts[1:] for k in (2, 7)})
    greeting, log = echo_checked(site, hello, cuts=cuts)
    assert (greeting, log["sni"], log["backend"]) == (b"backend=web\n", "a.b.example.net", "web")


def test_plain_tcp_and_tls_without_sni_are_routed_without_sni(site, client_hello):
    errors = site.proxy.metric("proxy_errors_total")
    request = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
    for data in (request, client_hello(None, ("h2",))):
        greeting, log = echo_checked(site, data)
        assert greeting == b"backend=other\n"
        assert (log["sni"], log["rule"], log["end"]) == (None, line_no(site, "default"),
                                                         "closed")
    # Plain TCP is recognised from its first byte: no ClientHello timeout, no error.
    assert site.proxy.metric("proxy_errors_total") == errors


def test_reject_closes_the_connection_without_reaching_a_backend(site, client_hello):
    p = site.proxy
    accepted = sum(getattr(site, n).accepted for n in ("web", "other", "v4", "v6"))
    decisions = p.metric("proxy_routing_decisions_total", rule="block", action="reject")
    with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
        client = sock.getsockname(), sock.getpeername()
        sock.sendall(client_hello("blocked.example.org"))
        assert sock.recv(100) == b""
    log = site.line_of(client)
    assert (log["end"], log["backend"], log["rule"]) == ("rejected", None, line_no(site, "block"))
    assert accepted == sum(getattr(site, n).accepted for n in ("web", "other", "v4", "v6"))
    assert p.metric("proxy_routing_decisions_total", rule="block", action="reject") == \
        decisions + 1


def test_ipv6_listener_and_ipv6_backend(site):
    data = b"hello over IPv6\n"
    # IPv6 client -> IPv4 backend
    greeting, log = echo_checked(site, data, port=site.port6, host="::1")
    assert greeting == b"backend=v4\n"
    assert log["listener"] == f"tcp:[::1]:{site.port6}"
    assert log["client"].startswith("[::1]:")
    # IPv4 client -> IPv6 backend
    greeting, log = echo_checked(site, data, port=site.port_to6)
    assert greeting == b"backend=v6\n"
    assert log["listener"] == f"tcp:127.0.0.1:{site.port_to6}"
