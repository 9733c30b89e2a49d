"""The drain timeout cuts with RST, not FIN: a real `python -m dynproxy`, SIGTERM, and a
connection still open when `shutdown.drain_timeout` passes. Its client must see the
stream cut (ECONNRESET), never a clean EOF it could take for a complete response; the
backend sees the cut too; the log says how many were cut. A connection that ends
within the drain still ends cleanly (tests/proc/test_signals.py)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest


class Holder:
    """A backend that greets, then sends a partial "response" and holds the stream
    open; it records how its side ended (b"" for EOF, or the exception's name)."""

    def __init__(self, scripted_backend):
        self.ended: list = []
        self.done = threading.Event()
        self.server = scripted_backend(self._script)
        self.address = self.server.address

    def _script(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            self.ended.append(b"")
        except OSError as exc:
            self.ended.append(type(exc).__name__)
        finally:
            self.done.set()


def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything received, and how the stream ended: "eof" or "reset"."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "eof"


def cut_records(p) -> list[dict]:
    out = []
    for line in p.logs().splitlines():
        if line.startswith("{") and '"connections_cut"' in line:
            out.append(json.loads(line))
    return out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_connection_open_past_the_drain_timeout_is_reset(proxy, scripted_backend, workers):
    b = Holder(scripted_backend)
    p = proxy(f"backend b {b.address}\ndefault -> forward(b)\n",
              config="shutdown:\n  drain_timeout: 0.5s\n", udp=False,
              extra_args=("--workers", workers))
    held = [socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10) for _ in range(3)]
    for sock in held:
        sock.sendall(b"ping")
        expected = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartialping"
        got = b""
        while len(got) < len(expected):
            got += sock.recv(65536)
        assert got == expected  # in flight: everything sent so far was read
    began = time.monotonic()
    p.signal(signal.SIGTERM)
    for sock in held:
        with sock:
            assert read_until_end(sock) == (b"", "reset")
    assert time.monotonic() - began >= 0.4  # cut by the drain timeout, not at once
    assert p.proc.wait(10) == 0
    assert b.done.wait(5)
    assert b.ended == ["ConnectionResetError"] * 3  # the backend sees the cut as well
    records = cut_records(p)
    assert sum(r["connections"] for r in records) == 3
    assert all("the drain timeout (0.5s) passed: closing" in r["msg"] for r in records)
    assert all("reset (RST)" in r["msg"] for r in records)


def test_a_reencrypted_connection_open_past_the_drain_timeout_is_reset_too(
        proxy, tls_backend, tls_certs, testkit):
    # relayed in a worker greenlet (TLS towards the backend), not in the hub
    secure = tls_backend("secure", "exact")  # presents api.example.com
    ca = tls_certs["ca"].cert_path
    p = proxy(f'backend secure {secure.address} tls ca "{ca}" servername "api.example.com"\n'
              "default -> forward(secure)\n",
              config="shutdown:\n  drain_timeout: 0.5s\n", udp=False)
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10) as sock:
        ends = sock.getsockname(), sock.getpeername()
        got = b""
        while not got.endswith(b"\n"):
            got += sock.recv(100)
        assert got == b"backend=secure\n"
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"  # in flight: the backend echoes
        began = time.monotonic()
        p.signal(signal.SIGTERM)
        assert read_until_end(sock) == (b"", "reset")
    assert time.monotonic() - began >= 0.4  # cut by the drain timeout, not at once
    assert p.proc.wait(10) == 0
    assert sum(r["connections"] for r in cut_records(p)) == 1
    assert testkit.access_line_of(p, ends)["end"] == "shutdown"  # not "closed"
