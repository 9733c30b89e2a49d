"""Shared fixtures: free ports, named backends on 127.0.0.1, and a real dynproxy
subprocess. Everything started here is stopped here, by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NamedBackend:
    """A TCP server that answers every connection with `backend=NAME\\n`, then echoes.

    It records what it received and the peer addresses; `stop()` closes it.
    """

    def __init__(self, name: str, host: str = "127.0.0.1", greet: bool = True):
        self.name, self.greet = name, greet
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.accepted = 0
        self.received: list[bytes] = []
        self._stop = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            try:
                if self.greet:
                    conn.sendall(f"backend={self.name}\n".encode())
                first = True
                while True:
                    data = conn.recv(65536)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    if first:
                        self.received.append(data)
                        first = False
                    conn.sendall(data)
            except OSError:
                return

    def stop(self):
        self._stop = True
        self.sock.close()


@pytest.fixture
def backends():
    started: list[NamedBackend] = []

    def make(name: str, **kw) -> NamedBackend:
        b = NamedBackend(name, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


class Proxy:
    """`python -m dynproxy` in a subprocess on free ports; logs captured to a file."""

    def __init__(self, tmp_path: Path, rules: str, config: str | None = None,
                 extra_args: tuple = (), udp: bool = True):
        self.rules_path = tmp_path / "main.rules"
        self.rules_path.write_text(rules)
        self.tcp_port = free_port()
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.metrics_port = free_port()
        args = [sys.executable, "-m", "dynproxy", "--rules", str(self.rules_path),
                "--tcp-bind", f"127.0.0.1:{self.tcp_port}",
                "--metrics-bind", f"127.0.0.1:{self.metrics_port}"]
        if udp:
            args += ["--udp-bind", f"127.0.0.1:{self.udp_port}"]
        if config is not None:
            cfg = tmp_path / "dynproxy.yaml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        self.log_path = tmp_path / "proxy.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*args, *extra_args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.http("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"proxy not ready in {timeout}s:\n{self.logs()}")

    def http(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}",
                                        timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> str:
        return self.http("/metrics")[1].decode()

    def metric(self, name: str, **labels) -> float:
        """Sum of samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def access_lines(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            if '"dynproxy.access"' in line:
                out.append(json.loads(line))
        return out

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def proxy(tmp_path):
    started: list[Proxy] = []

    def start(rules: str, **kw) -> Proxy:
        p = Proxy(tmp_path, rules, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def connect(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    return s


def read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.fixture
def env_pythonpath():
    return {**os.environ, "PYTHONPATH": str(ROOT)}
