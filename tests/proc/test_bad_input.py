"""Bad input against a real `python -m dynproxy`: broken, truncated, oversized and stalled
ClientHellos, clients that send nothing or reset, backends that never answer or reset.

Each case must be handled as docs/architecture.md says (what looked like TLS but is not
a complete ClientHello is routed without SNI; silence meets the timeouts), counted in
/metrics, never logged as an internal failure, and must not disturb a bystander: a
connection relaying through the same proxy at the same time, checked byte-exact.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from sockio import recv_exact, recv_to_eof

# Short timeouts keep the file fast; the bystander sends every 50 ms, far inside them.
TIMEOUTS = {"client_hello": "1s", "idle": "1s", "connect": "1s"}


@pytest.fixture(scope="module")
def site(testkit, tmp_path_factory):
    k = testkit

    def silent(conn):  # accepts and reads, never answers
        recv_to_eof(conn)

    def resetter(conn):  # takes the first bytes, then resets the connection
        conn.recv(65536)
        k.ScriptedBackend.reset(conn)

    echo = k.NamedBackend("echo")
    quiet, rst = k.ScriptedBackend(silent), k.ScriptedBackend(resetter)
    p = k.Proxy(tmp_path_factory.mktemp("bad"), f"""
backend echo {echo.address}
backend silent {quiet.address}
backend resetter {rst.address}
rule silent: sni exact "silent.test" -> forward(silent)
rule reset: sni exact "reset.test" -> forward(resetter)
rule echo: sni exact "echo.test" -> forward(echo)
default -> forward(echo)
""", udp=False, config=k.fast_config(**TIMEOUTS))
    yield SimpleNamespace(proxy=p, port=p.tcp_port, hello=k.build_client_hello,
                          line_of=lambda client: k.access_line_of(p, client))
    p.stop()
    for b in (echo, quiet, rst):
        b.stop()


class Bystander:
    """A well-behaved TLS-looking connection relaying random bytes through the proxy
    while a test misbehaves next to it; `check()` asserts every byte came back in order."""

    CHUNK = 32 * 1024

    def __init__(self, site):
        self.site = site
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.rounds = 0
        self.sock = socket.create_connection(("127.0.0.1", site.port), timeout=5)
        self.client = self.sock.getsockname(), self.sock.getpeername()
        hello = site.hello("echo.test")
        self.sock.sendall(hello)
        greeting = b"backend=echo\n"
        assert recv_exact(self.sock, len(greeting) + len(hello)) == greeting + hello
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        data = os.urandom(self.CHUNK)
        try:
            while not self.stop.is_set():
                self.sock.sendall(data)
                assert recv_exact(self.sock, len(data)) == data
                self.rounds += 1
                time.sleep(0.05)
            self.sock.shutdown(socket.SHUT_WR)
            assert recv_to_eof(self.sock) == b""
        except BaseException as exc:  # reported by check()
            self.error = exc
        finally:
            self.sock.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        if exc[0] is None:
            self.check()

    def check(self):
        assert not self.thread.is_alive()
        assert self.error is None, f"the bystander was disturbed: {self.error!r}"
        assert self.rounds > 0
        line = self.site.line_of(self.client)
        assert line["end"] == "closed"
        assert line["bytes_down"] == line["bytes_up"] + len(b"backend=echo\n")


def errors(site, reason: str) -> float:
    return site.proxy.metric("proxy_errors_total", reason=reason)


def assert_no_internal_failure(site) -> None:
    logs = site.proxy.logs()
    assert "Traceback" not in logs and "unexpectedly" not in logs, logs
    assert site.proxy.metric("proxy_errors_total", reason="internal") == 0
    assert site.proxy.proc.poll() is None


def default_rule(site) -> str:
    return f"{site.proxy.rules_path}:8"


# ---------------------------------------------------------------- broken ClientHellos

@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\xff\xff" + bytes(range(200)),  # record longer than TLS allows
    b"\x16\x03\x01\x00\x30\x02" + bytes(47),  # a handshake that is not a ClientHello
    b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x03\x16\x03",  # ClientHello body cut short
], ids=["record-too-long", "not-client-hello", "body-too-short"])
def test_garbage_that_starts_like_tls_is_routed_without_sni(site, garbage):
    bad = errors(site, "bad_client_hello")
    logged = site.proxy.logs().count("malformed ClientHello")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            client = sock.getsockname(), sock.getpeername()
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            assert recv_to_eof(sock) == b"backend=echo\n" + garbage
    line = site.line_of(client)
    assert (line["sni"], line["rule"], line["end"]) == (None, default_rule(site), "closed")
    assert errors(site, "bad_client_hello") == bad + 1
    # logged at most once per 10 s, whatever the flood
    assert site.proxy.logs().count("malformed ClientHello") - logged <= 1
    assert "malformed ClientHello" in site.proxy.logs()
    assert_no_internal_failure(site)


def test_truncated_client_hello_then_close(site):
    hello = site.hello("silent.test")[:60]  # would route to `silent`; it cannot: cut short
    bad = errors(site, "bad_client_hello")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            client = sock.getsockname(), sock.getpeername()
            sock.sendall(hello)
            sock.shutdown(socket.SHUT_WR)
            assert recv_to_eof(sock) == b"backend=echo\n" + hello
    line = site.line_of(client)
    assert (line["sni"], line["backend"], line["bytes_up"]) == (None, "echo", 60)
    assert errors(site, "bad_client_hello") == bad + 1
    assert_no_internal_failure(site)


def test_oversized_client_hello_is_routed_without_sni_and_relayed_whole(site):
    # A ClientHello declaring 100,000 bytes (the peek buffer holds 64 KiB), in records
    # of 16 KiB: the proxy stops peeking at once and relays every byte.
    body = bytes(i % 251 for i in range(100_000))
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    stream = b"".join(b"\x16\x03\x01" + struct.pack(">H", len(message[i:i + 16384]))
                      + message[i:i + 16384] for i in range(0, len(message), 16384))
    bad = errors(site, "bad_client_hello")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            client = sock.getsockname(), sock.getpeername()
            sender = threading.Thread(target=lambda: (sock.sendall(stream),
                                                      sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_to_eof(sock)
            sender.join()
    assert got == b"backend=echo\n" + stream
    assert site.line_of(client)["bytes_up"] == len(stream)
    assert errors(site, "bad_client_hello") == bad + 1
    assert_no_internal_failure(site)


def test_client_stalling_mid_client_hello_is_routed_without_sni_after_the_timeout(site):
    hello = site.hello("silent.test")
    timeouts = errors(site, "client_hello_timeout")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            client = sock.getsockname(), sock.getpeername()
            sock.sendall(hello[:50])
            # after client_hello (1 s) the proxy routes what it has, without SNI: the
            # default rule's backend answers, although the full hello says silent.test
            assert recv_exact(sock, 13) == b"backend=echo\n"
            sock.sendall(hello[50:])
            assert recv_exact(sock, len(hello)) == hello
    line = site.line_of(client)
    assert (line["sni"], line["rule"], line["backend"]) == (None, default_rule(site), "echo")
    assert errors(site, "client_hello_timeout") == timeouts + 1
    assert_no_internal_failure(site)


def test_client_that_connects_and_sends_nothing(site):
    timeouts = errors(site, "client_hello_timeout")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
            client = sock.getsockname(), sock.getpeername()
            # routed without SNI after client_hello (1 s), then closed after idle (1 s)
            assert recv_to_eof(sock) == b"backend=echo\n"
    line = site.line_of(client)
    assert (line["sni"], line["bytes_up"], line["end"]) == (None, 0, "timeout")
    assert errors(site, "client_hello_timeout") == timeouts + 1
    assert_no_internal_failure(site)


def test_client_reset_mid_client_hello(site):
    resets = errors(site, "reset")
    with Bystander(site):
        sock = socket.create_connection(("127.0.0.1", site.port), timeout=5)
        client = sock.getsockname(), sock.getpeername()
        sock.sendall(site.hello("echo.test")[:30])
        time.sleep(0.1)  # let the proxy start peeking
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    line = site.line_of(client)
    assert (line["end"], line["backend"]) == ("reset", None)
    assert errors(site, "reset") == resets + 1
    assert_no_internal_failure(site)


# ---------------------------------------------------------------- misbehaving backends

def test_backend_that_accepts_and_never_answers_meets_the_idle_timeout(site):
    before = site.proxy.metric("proxy_requests_total", proto="tcp", result="timeout")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
            client = sock.getsockname(), sock.getpeername()
            sock.sendall(site.hello("silent.test"))
            assert recv_to_eof(sock) == b""  # closed by the proxy after idle (1 s)
    line = site.line_of(client)
    assert (line["backend"], line["end"], line["bytes_down"]) == ("silent", "timeout", 0)
    assert site.proxy.metric("proxy_requests_total", proto="tcp", result="timeout") == \
        before + 1
    assert_no_internal_failure(site)


def test_backend_that_resets_resets_the_client_too(site):
    resets = errors(site, "reset")
    with Bystander(site):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            client = sock.getsockname(), sock.getpeername()
            sock.sendall(site.hello("reset.test"))
            with pytest.raises(ConnectionResetError):
                # the proxy passes the reset on (RST, not a clean EOF): the stream was cut
                while sock.recv(65536):
                    pass
    line = site.line_of(client)
    assert (line["backend"], line["end"]) == ("resetter", "reset")
    assert errors(site, "reset") == resets + 1
    assert_no_internal_failure(site)
