"""TLS termination through a real `python -m dynproxy`: certificates chosen by SNI
(Python's ssl and `openssl s_client`), strict SNI, refused handshakes counted by reason,
ALPN, the plaintext relay, and re-encryption towards TLS backends.

Real sockets on 127.0.0.1; backends are threads (greenlets) of this process.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import gevent
import pytest

from dynproxy.net.tls_stream import TlsStream

from sockio import recv_exact, recv_line

PAYLOAD = bytes(range(256)) * 200  # 50 KiB: several TLS records each way


def tls_yaml(certs, *extra: str, strict: bool = False) -> str:
    lines = ["tls:",
             f"  cert_path: {certs['default'].cert_path}",
             f"  key_path: {certs['default'].key_path}",
             f"  strict_sni: {'true' if strict else 'false'}",
             *(f"  {line}" for line in extra),
             "  certificates:",
             "    - hostname: api.example.com",
             f"      cert_path: {certs['exact'].cert_path}",
             f"      key_path: {certs['exact'].key_path}",
             '    - hostname: "*.example.com"',
             f"      cert_path: {certs['wildcard'].cert_path}",
             f"      key_path: {certs['wildcard'].key_path}"]
    return "\n".join(lines) + "\n"


def client_context(certs, alpn=None, **attrs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"].cert_path))
    ctx.check_hostname = False  # the names served are asserted one by one
    if alpn:
        ctx.set_alpn_protocols(alpn)
    for key, value in attrs.items():
        setattr(ctx, key, value)
    return ctx


def wait_metric(p, name: str, value: float, **labels) -> float:
    """The metric once it reaches `value` (counted after the client saw the outcome)."""
    deadline = time.monotonic() + 10
    while (got := p.metric(name, **labels)) < value and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def dns_names(cert: dict) -> list[str]:
    return [v for k, v in cert["subjectAltName"] if k == "DNS"]


@pytest.fixture
def terminating(proxy, proxy_config, backends, tls_certs):
    """A proxy terminating every connection with the standard certificates -> web."""
    def start(*tls_extra: str, strict: bool = False, rule: str = "terminate tls",
              timeouts: dict | None = None):
        web = backends("web")
        p = proxy(f"backend web {web.address}\ndefault -> {rule} then forward(web)\n",
                  config=proxy_config(**(timeouts or {}))
                  + tls_yaml(tls_certs, *tls_extra, strict=strict), udp=False)
        return p, web
    return start


# --- choosing the certificate ------------------------------------------------------------


def test_python_clients_get_the_certificate_their_sni_selects(terminating, tls_certs):
    p, web = terminating()
    cases = [("api.example.com", ["api.example.com"]), ("shop.example.com", ["*.example.com"]),
             ("a.b.example.com", ["localhost"]), ("example.com", ["localhost"]),
             (None, ["localhost"])]
    for sni, names in cases:
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
            with client_context(tls_certs).wrap_socket(raw, server_hostname=sni) as tls:
                assert dns_names(tls.getpeercert()) == names, sni
                assert recv_line(tls) == b"backend=web\n"
                tls.sendall(PAYLOAD)
                assert recv_exact(tls, len(PAYLOAD)) == PAYLOAD
    assert web.received[0] == PAYLOAD[:len(web.received[0])]  # plaintext reached it
    assert wait_metric(p, "proxy_tls_handshakes_total", 5, result="ok") == 5
    assert p.metric("proxy_tls_sni_fallback_total", reason="unknown_name") == 2
    assert p.metric("proxy_tls_sni_fallback_total", reason="no_sni") == 1
    lines = p.wait_access_lines(5)
    assert [x["end"] for x in lines] == ["closed"] * 5
    assert all(x["bytes_up"] == len(PAYLOAD) for x in lines)  # plaintext bytes counted
    assert all(x["bytes_down"] == len(PAYLOAD) + len(b"backend=web\n") for x in lines)


@pytest.mark.parametrize("sni, subject", [("api.example.com", "CN = api.example.com"),
                                          ("www.example.com", "CN = *.example.com"),
                                          ("deep.www.example.com", "CN = localhost")])
def test_openssl_s_client_verifies_the_selected_certificate(terminating, tls_certs, sni,
                                                            subject):
    p, _ = terminating()
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{p.tcp_port}", "-servername", sni,
         "-CAfile", str(tls_certs["ca"].cert_path), "-verify_return_error", "-brief"],
        input=b"", capture_output=True, timeout=20)
    report = out.stderr.decode()
    assert "Verification: OK" in report, report
    assert f"Peer certificate: {subject}" in report, report
    assert "Protocol version: TLSv1.3" in report


def test_strict_sni_refuses_names_no_certificate_covers(terminating, tls_certs):
    p, web = terminating(strict=True)
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            client_context(tls_certs).wrap_socket(raw, server_hostname="nobody.test")
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{p.tcp_port}", "-servername",
         "nobody.test", "-brief"], input=b"", capture_output=True, timeout=20)
    assert out.returncode != 0 and b"unrecognized name" in out.stderr
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        with client_context(tls_certs).wrap_socket(raw, server_hostname="x.example.com") as tls:
            assert recv_line(tls) == b"backend=web\n"
    assert wait_metric(p, "proxy_tls_handshakes_total", 2, reason="unknown_sni") == 2
    assert p.metric("proxy_tls_sni_fallback_total", reason="strict_refused") == 2
    assert web.accepted == 1  # refused handshakes never reach a backend
    assert [x["end"] for x in p.wait_access_lines(3)].count("tls_failed") == 2


# --- failed handshakes: counted by reason, never disturbing others ------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_failed_handshakes_are_counted_by_reason(terminating, tls_certs):
    p, web = terminating("handshake_timeout: 300ms", timeouts={"client_hello": "200ms"})
    stalled = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5)  # says nothing
    old = client_context(tls_certs, minimum_version=ssl.TLSVersion.MINIMUM_SUPPORTED,
                         maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    rsa_only = client_context(tls_certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    rsa_only.set_ciphers("AES128-SHA")
    for ctx in (old, rsa_only):
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                ctx.wrap_socket(raw, server_hostname="api.example.com")
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{p.tcp_port}",
                          "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-brief"],
                         input=b"", capture_output=True, timeout=20)
    assert out.returncode != 0
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = raw.recv(100)
        assert answer == b"" or answer.startswith(b"\x15")  # closed, maybe after an alert
    # meanwhile a good client is served
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        with client_context(tls_certs).wrap_socket(raw, server_hostname="api.example.com") as tls:
            assert recv_line(tls) == b"backend=web\n"
    assert stalled.recv(10) == b""  # closed by the handshake timeout
    stalled.close()
    for reason, count in (("wrong_version", 2), ("no_shared_cipher", 1), ("garbage", 1),
                          ("timeout", 1)):
        assert wait_metric(p, "proxy_tls_handshakes_total", count, result="failed",
                           reason=reason) == count, (reason, p.metrics())
    assert p.metric("proxy_tls_handshakes_total", result="ok") == 1
    assert web.accepted == 1
    assert "TLS handshake from 127.0.0.1 failed (wrong_version)" in p.logs()
    assert p.logs().count("failed (wrong_version)") == 1  # logged once per interval


def test_alpn_is_negotiated_against_what_the_rule_allows(terminating, tls_certs):
    p, _ = terminating('alpn: ["http/1.1"]', rule='terminate tls alpn ["h2"]')
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        ctx = client_context(tls_certs, alpn=["h2", "http/1.1"])
        with ctx.wrap_socket(raw, server_hostname="api.example.com") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            assert recv_line(tls) == b"backend=web\n"
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{p.tcp_port}",
                          "-alpn", "http/1.1,h2"], input=b"", capture_output=True,
                         timeout=20)
    assert b"ALPN protocol: h2" in out.stdout, out.stdout


def test_half_close_passes_through_tls(terminating, tls_certs):
    """The client sends, then close_notify + FIN; the backend's answer still arrives."""
    p, _ = terminating()
    raw = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5)
    client = TlsStream(raw, client_context(tls_certs), server_side=False,
                       server_hostname="api.example.com")
    client.handshake(time.monotonic() + 5)
    client.settimeout(5)
    client.sendall(PAYLOAD)
    client.shutdown(socket.SHUT_WR)
    got = bytearray()
    while data := client.recv(65536):
        got += data
    client.close()
    assert bytes(got) == b"backend=web\n" + PAYLOAD
    [line] = p.wait_access_lines(1)
    assert (line["end"], line["bytes_up"], line["bytes_down"]) == (
        "closed", len(PAYLOAD), len(got))


def test_an_idle_terminated_connection_is_closed_after_the_idle_timeout(terminating,
                                                                       tls_certs):
    p, _ = terminating(timeouts={"idle": "300ms"})
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        with client_context(tls_certs).wrap_socket(raw, server_hostname="a.example.com") as tls:
            assert recv_line(tls) == b"backend=web\n"
            tls.sendall(b"one")
            assert recv_exact(tls, 3) == b"one"
            assert tls.recv(10) == b""  # then silence: the proxy ends it
    [line] = p.wait_access_lines(1)
    assert (line["end"], line["bytes_up"], line["bytes_down"]) == ("timeout", 3, 15)


# --- re-encryption towards the backend ----------------------------------------------------


def backend_rules(p_tls, ca, *, sni="api.example.com") -> str:
    return (f'backend secure {p_tls.address} tls ca "{ca}" servername "{sni}"\n'
            "default -> terminate tls then forward(secure)\n")


def test_reencrypts_to_a_backend_and_verifies_its_certificate(proxy, proxy_config, tls_certs,
                                                              tls_backend):
    secure = tls_backend("secure", "exact")  # presents api.example.com
    p = proxy(backend_rules(secure, tls_certs["ca"].cert_path),
              config=proxy_config() + tls_yaml(tls_certs), udp=False)
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        with client_context(tls_certs).wrap_socket(raw, server_hostname="x.example.com") as tls:
            assert recv_line(tls) == b"backend=secure\n"
            tls.sendall(PAYLOAD)
            assert recv_exact(tls, len(PAYLOAD)) == PAYLOAD
    assert secure.handshakes == 1
    assert p.metric("proxy_errors_total", reason="backend_tls") == 0


class TlsEcho:
    """A TLS backend presenting `pair`: `backend=NAME\\n`, then an echo."""

    def __init__(self, name: str, pair):
        self.name = name
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(pair.cert_path, pair.key_path)
        self.handshakes = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        gevent.spawn(self._accept)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            gevent.spawn(self._serve, conn)

    def _serve(self, conn):
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                tls.sendall(f"backend={self.name}\n".encode())
                while data := tls.recv(65536):
                    tls.sendall(data)
        except OSError:
            conn.close()


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory, tls_certs):
    """Certificates for the same names from a CA nobody trusts here."""
    from tools_gen_certs import generate  # loaded by the tls_certs fixture

    return generate(tmp_path_factory.mktemp("foreign"))


@pytest.fixture
def tls_echo():
    started: list[TlsEcho] = []

    def make(name: str, pair) -> TlsEcho:
        started.append(TlsEcho(name, pair))
        return started[-1]

    yield make
    for b in started:
        b.sock.close()


@pytest.mark.parametrize("case", ["wrong_name", "unknown_ca"])
def test_a_backend_with_a_wrong_certificate_is_refused_and_the_next_member_tried(
        proxy, proxy_config, tls_certs, foreign_certs, tls_echo, case):
    wrong_pair = tls_certs["exact"] if case == "wrong_name" else foreign_certs["exact"]
    wrong_sni = "other.internal" if case == "wrong_name" else "api.example.com"
    wrong, good = tls_echo("wrong", wrong_pair), tls_echo("good", tls_certs["exact"])
    ca = tls_certs["ca"].cert_path
    p = proxy(f'backend wrong {wrong.address} tls ca "{ca}" servername "{wrong_sni}"\n'
              f'backend good {good.address} tls ca "{ca}" servername "api.example.com"\n'
              "pool both {\n  member wrong\n  member good\n}\n"
              'rule alone: sni exact "alone.example.com" -> terminate tls then forward(wrong)\n'
              "default -> terminate tls then forward(both)\n",
              config=proxy_config() + tls_yaml(tls_certs), udp=False)
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
        with client_context(tls_certs).wrap_socket(raw, server_hostname="alone.example.com") \
                as tls:
            assert tls.recv(100) == b""  # nothing behind it: closed after the handshake
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as raw:
            with client_context(tls_certs).wrap_socket(raw, server_hostname="x.example.com") \
                    as tls:
                assert recv_line(tls) == b"backend=good\n"
    assert wait_metric(p, "proxy_errors_total", 2, reason="backend_tls") >= 2
    assert "TLS to wrong" in p.logs()
    assert wrong.handshakes == 0  # the proxy gave up before sending a byte of plaintext
    ends = [x["end"] for x in p.wait_access_lines(5)]
    assert ends == ["connect_failed", "closed", "closed", "closed", "closed"]


def test_plain_forward_to_a_tls_backend_is_encrypted_on_the_backend_side(proxy, proxy_config,
                                                                          tls_certs, tls_backend):
    # No `terminate`: the client speaks plaintext to the proxy, the proxy speaks TLS to
    # the backend (verified against the CA), both ways.
    secure = tls_backend("secure", "exact")
    p = proxy(f'backend secure {secure.address} tls ca "{tls_certs["ca"].cert_path}" '
              'servername "api.example.com"\ndefault -> forward(secure)\n',
              config=proxy_config(), udp=False)
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as plain:
        assert recv_line(plain) == b"backend=secure\n"
        plain.sendall(PAYLOAD)
        assert recv_exact(plain, len(PAYLOAD)) == PAYLOAD
    assert secure.handshakes == 1
    [line] = p.wait_access_lines(1)
    assert line["bytes_up"] == len(PAYLOAD) and line["end"] == "closed"
