"""Stopping the master, with real processes: SIGTERM drains (and a second signal
hurries it), the drain timeout cuts, SIGQUIT is fast. Reload: test_signals_reload.py."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

import proc_support as s

TRANSFER = 256 * 1024
CHUNKS = 16


def _streamer(conn: socket.socket) -> None:
    """Backend: reads a seed byte, then streams TRANSFER bytes slowly (about 1.6 s)."""
    seed = conn.recv(1)[0]
    data = s.pattern(TRANSFER, seed)
    step = TRANSFER // CHUNKS
    for i in range(CHUNKS):
        conn.sendall(data[i * step:(i + 1) * step])
        time.sleep(0.1)


# --- SIGTERM, SIGINT, SIGQUIT --------------------------------------------------------------

def test_sigterm_lets_50_transfers_finish_and_refuses_new_connections(proxy, scripted_backend):
    b = scripted_backend(_streamer)
    p = proxy(f"backend b {b.address}\ndefault -> forward(b)\n", config=s.config("20s"),
              extra_args=s.WORKERS_2)
    clients = []
    for seed in range(50):
        c = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10)
        c.sendall(bytes([seed]))
        clients.append((seed, c, s.recv_exact(c, TRANSFER // CHUNKS)))  # in flight now
    p.signal(signal.SIGTERM)
    for worker in (0, 1):
        s.wait_log(p, f"worker {worker} stopped accepting", event="draining", worker=worker)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5)
    assert p.http("/healthz") == (503, b"draining\n")
    for seed, c, first in clients:
        with c:
            assert first + s.recv_to_eof(c) == s.pattern(TRANSFER, seed), f"transfer {seed}"
    assert p.proc.wait(15) == 0
    assert "closing" not in p.logs()  # nothing had to be cut


def test_the_drain_timeout_cuts_what_outlives_it(proxy, backends):
    a = backends("a")
    p = proxy(f"backend a {a.address}\ndefault -> forward(a)\n", config=s.config("0.5s"),
              extra_args=s.WORKERS_2)
    idle = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10)
    assert s.recv_line(idle) == b"backend=a\n"
    p.signal(signal.SIGTERM)
    assert p.proc.wait(10) == 0
    with pytest.raises(ConnectionResetError):  # cut by the proxy: RST, not a clean end
        s.recv_to_eof(idle)
    s.wait_log(p, "the cut logged", msg="closing 1 connection(s)")


def test_a_second_sigint_during_the_drain_stops_at_once(proxy, backends):
    a = backends("a")
    p = proxy(f"backend a {a.address}\ndefault -> forward(a)\n", config=s.config("60s"),
              extra_args=s.WORKERS_2)
    idle = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10)
    assert s.recv_line(idle) == b"backend=a\n"
    p.signal(signal.SIGINT)
    s.wait_log(p, "the master draining", msg="SIGINT: stopping gracefully")
    p.signal(signal.SIGINT)
    assert p.proc.wait(10) == 0
    with pytest.raises(ConnectionResetError):  # a fast stop cuts with RST too
        s.recv_to_eof(idle)
    s.wait_log(p, "the switch to fast logged", msg="SIGINT during the drain")


def test_sigquit_exits_within_a_second(proxy, backends):
    a = backends("a")
    p = proxy(f"backend a {a.address}\ndefault -> forward(a)\n", config=s.config("60s"),
              extra_args=s.WORKERS_2)
    conns = [socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10) for _ in range(10)]
    for c in conns:
        assert s.recv_line(c) == b"backend=a\n"
    workers = s.worker_pids(p)
    began = time.monotonic()
    p.signal(signal.SIGQUIT)
    code = p.proc.wait(10)
    took = time.monotonic() - began
    assert code == 0
    assert took < 1.0, f"SIGQUIT took {took:.2f}s"
    for pid in workers.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text().lower()
