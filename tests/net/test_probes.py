"""Active health probes against real sockets: tcp, tls, send/expect, timeouts, and the
jittered loop."""

from __future__ import annotations

import datetime
import random
import ssl

import gevent
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gevent.server import StreamServer

from dynproxy.core.decision import BackendSpec, BackendTlsSpec, HealthSpec
from dynproxy.net.probes import ProbeLoop, check_once


def health(kind="tcp", send=None, expect=None, timeout=0.3, interval=1.0):
    return HealthSpec(kind, interval, timeout, 2, 3, send, expect)


def spec_for(server, tls=None) -> BackendSpec:
    return BackendSpec("b", "127.0.0.1", server.server_port, tls=tls)


@pytest.fixture
def serve():
    servers = []

    def start(handler, **ssl_args):
        server = StreamServer(("127.0.0.1", 0), handler, **ssl_args)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def hold_open(sock, addr):
    gevent.sleep(5)


def ping_pong(sock, addr):
    if sock.recv(100) == b"PING\r\n":
        sock.sendall(b"+PO")
        gevent.sleep(0.01)
        sock.sendall(b"NG\r\n")
    gevent.sleep(1)


def test_tcp_check_passes_on_a_listening_port(serve):
    result = check_once(spec_for(serve(hold_open)), health())
    assert result.ok and result.reason == "connected" and result.at > 1.6e9


def test_tcp_check_fails_on_a_refused_port(serve):
    server = serve(hold_open)
    spec = spec_for(server)
    server.stop()
    result = check_once(spec, health())
    assert not result.ok and result.reason == "connect failed: Connection refused"


def test_send_expect_matches_across_segments(serve):
    result = check_once(spec_for(serve(ping_pong)), health(send=b"PING\r\n",
                                                           expect=b"+PONG"))
    assert result.ok and result.reason == "expect matched"


def test_send_expect_mismatch_and_silence(serve):
    def wrong(sock, addr):
        sock.recv(100)
        sock.sendall(b"-ERR")

    result = check_once(spec_for(serve(wrong)), health(send=b"PING\r\n", expect=b"+PONG"))
    assert not result.ok and result.reason == "expect mismatch: connection closed after 4 bytes"
    result = check_once(spec_for(serve(hold_open)), health(send=b"PING\r\n", expect=b"+PONG",
                                                           timeout=0.2))
    assert not result.ok and result.reason == "timeout after 0.2s"


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe-certs")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backend.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("backend.test")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "b.crt", tmp / "b.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def server_context(cert, key) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_tls_check_needs_a_handshake(serve, cert_files):
    cert, key = cert_files
    tls_server = serve(hold_open, ssl_context=server_context(cert, key))
    result = check_once(spec_for(tls_server), health("tls"))
    assert result.ok and result.reason == "tls handshake ok"
    plain = serve(lambda s, a: s.sendall(b"220 smtp ready\r\n"))
    result = check_once(spec_for(plain), health("tls"))
    assert not result.ok and result.reason.startswith(("tls handshake failed", "connect failed"))


def test_tls_check_verifies_only_when_asked(serve, cert_files):
    cert, key = cert_files
    tls_server = serve(hold_open, ssl_context=server_context(cert, key))
    good = BackendTlsSpec(ca=cert, sni="backend.test", verify=True)
    assert check_once(spec_for(tls_server, good), health("tls")).reason == "tls handshake ok"
    wrong_name = BackendTlsSpec(ca=cert, sni="other.test", verify=True)
    result = check_once(spec_for(tls_server, wrong_name), health("tls"))
    assert not result.ok and "tls handshake failed" in result.reason


class FixedRandom(random.Random):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def random(self):
        return self.value


def test_loop_starts_at_a_random_point_of_the_first_interval(serve):
    spec, results = spec_for(serve(hold_open)), []
    early = gevent.spawn(ProbeLoop(spec, health(interval=0.2), results.append,
                                   FixedRandom(0.0)).run)
    late = gevent.spawn(ProbeLoop(spec, health(interval=10), results.append,
                                  FixedRandom(0.99)).run)
    gevent.sleep(0.5)
    early.kill()
    late.kill()
    assert len(results) >= 2 and all(r.ok for r in results)  # only the early loop ran
    assert len(results) <= 4
