"""Helpers for the master/worker tests (test_workers*.py, test_signals*.py).

Imported as `import proc_support as s` (pytest `pythonpath = ["tests"]`); everything
that starts something is stopped by the fixtures of tests/conftest.py or by the tests
themselves, by PID. Socket reads come from sockio (`s.recv_line` and so on).
"""

from __future__ import annotations

import json
import socket
import threading
import time

from sockio import recv_exact, recv_line, recv_to_eof  # noqa: F401 - s.recv_*

WORKERS_2 = ("--workers", "2")
WAIT = 20.0  # seconds any "until" below may take before the test fails with the log


def config(drain: str = "10s", extra: str = "") -> str:
    return f"shutdown:\n  drain_timeout: {drain}\n{extra}"


def records(proxy) -> list[dict]:
    """The proxy's JSON log lines other than access lines."""
    out = []
    for line in proxy.logs().splitlines():
        if line.startswith("{") and '"dynproxy.access"' not in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_for(proxy, condition, what: str, timeout: float = WAIT):
    """Poll `condition()` until it returns something truthy; fail with the log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"waited {timeout}s for {what}; log:\n{proxy.logs()[-6000:]}")


def wait_log(proxy, what: str, **fields) -> dict:
    """The first log record with all of `fields` (msg matched by substring)."""
    msg = fields.pop("msg", None)

    def match():
        for rec in records(proxy):
            if msg is not None and msg not in rec.get("msg", ""):
                continue
            if all(rec.get(k) == v for k, v in fields.items()):
                return rec
        return None

    return wait_for(proxy, match, what)


def count_log(proxy, msg: str) -> int:
    return sum(msg in rec.get("msg", "") for rec in records(proxy))


def worker_pids(proxy) -> dict[int, int]:
    """slot -> pid of the latest worker started in that slot (from the master's log)."""
    pids = {}
    for rec in records(proxy):
        if rec.get("logger") == "dynproxy.master" and "started: pid" in rec.get("msg", ""):
            pids[rec["worker"]] = rec["pid"]
    return pids


def wait_ready(proxy, slot: int, pid: int) -> dict:
    """Until the worker in `slot` with `pid` says it serves."""
    return wait_log(proxy, f"worker {slot} (pid {pid}) serving", event="worker_ready",
                    worker=slot, pid=pid)


def wait_reloaded(proxy, generation: int) -> dict:
    return wait_log(proxy, f"reload to generation {generation}", event="reloaded",
                    generation=generation)


def greeting(port: int) -> bytes:
    """Connect, return the backend's greeting line (NamedBackend: b"backend=NAME\\n")."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return recv_line(sock)


def pattern(size: int, seed: int) -> bytes:
    """Deterministic bytes that differ per seed (a lost or repeated chunk shows)."""
    block = bytes((seed * 31 + i * 7) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


class UdpBackend:
    """Answers each datagram with NAME:DATA."""

    def __init__(self, name: str):
        self.name = name.encode()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
                self.sock.sendto(self.name + b":" + data, peer)
            except OSError:
                return

    def stop(self):
        self.sock.close()


def udp_ask(sock: socket.socket, port: int, data: bytes) -> bytes:
    sock.sendto(data, ("127.0.0.1", port))
    return sock.recvfrom(65535)[0]


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def free_port(kind=socket.SOCK_STREAM) -> int:
    return free_ports(1, kind)[0]


def free_ports(count: int, kind=socket.SOCK_STREAM) -> list[int]:
    """`count` distinct free ports (all held open while choosing)."""
    socks = [socket.socket(socket.AF_INET, kind) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
