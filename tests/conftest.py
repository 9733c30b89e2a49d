"""Shared fixtures: free ports, named backends on 127.0.0.1, and a real dynproxy
subprocess. Everything started here is stopped here, by PID.

The test process is gevent-patched here, first, before anything imports ssl or
threading: several test directories drive real sockets from many greenlets, and the
whole run must behave the same whichever directories are collected.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import importlib.util
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(host: str) -> tuple[socket.socket, int, str]:
    """A TCP socket listening on a free port of `host`: (socket, port, "host:port")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    return sock, port, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NamedBackend:
    """A TCP server that answers every connection with `backend=NAME\\n`, then echoes.

    It records what it received and the peer addresses; `stop()` closes it.
    """

    def __init__(self, name: str, host: str = "127.0.0.1", greet: bool = True):
        self.name, self.greet = name, greet
        self.sock, self.port, self.address = listening(host)
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
                 extra_args: tuple = (), udp: bool = True, preexec_fn=None):
        self.rules_path = tmp_path / "main.rules"
        self.rules_path.write_text(rules)
        self.tcp_port = free_port()
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.metrics_port = free_port()
        args = [sys.executable, "-m", "dynproxy", "--rules", str(self.rules_path),
                "--tcp-bind", f"127.0.0.1:{self.tcp_port}",
                "--metrics-bind", f"127.0.0.1:{self.metrics_port}"]
        args += ["--udp-bind", f"127.0.0.1:{self.udp_port}" if udp else "none"]
        if config is not None:
            cfg = tmp_path / "dynproxy.yaml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        self.log_path = tmp_path / "proxy.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*args, *extra_args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
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
        text = self.logs()
        for line in text[:text.rfind("\n") + 1].splitlines():  # not a line still being written
            if '"dynproxy.access"' in line:
                out.append(json.loads(line))
        return out

    def wait_access_lines(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The access-log lines once at least `count` are written (they come at close)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.access_lines()
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

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


@pytest.fixture
def env_pythonpath():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --- for the real-socket TCP tests (tests/proc/test_tcp_*.py, test_bad_input.py) -------

def fast_config(server: dict | None = None, **timeouts: str) -> str:
    """A config for proxy tests: one worker, no UDP, short timeouts, no drain at stop.

    `timeouts` override server.timeouts (connect, idle, client_hello), e.g. idle="1s";
    `server` adds other server settings, e.g. {"max_connections": 5}.
    """
    chosen = {"connect": "1s", "idle": "5s", "client_hello": "1s", **timeouts}
    # No UDP listener unless the test asks for one (Proxy(udp=True) passes --udp-bind).
    lines = ["server:", "  workers: 1", "  udp_bind: []",
             *(f"  {k}: {v}" for k, v in (server or {}).items()), "  timeouts:"]
    lines += [f"    {key}: {value}" for key, value in chosen.items()]
    return "\n".join([*lines, "shutdown:", "  drain_timeout: 0s", ""])


@pytest.fixture
def proxy_config():
    """`fast_config` as a fixture: proxy_config(idle="1s") -> YAML text."""
    return fast_config


class ScriptedBackend:
    """A TCP server that runs `script(conn)` in a thread for every connection it accepts.

    The connection is closed when the script returns (scripts may close it earlier, or
    reset it with `reset()`). `accepted` counts connections; `peers` holds their addresses.
    """

    def __init__(self, script, host: str = "127.0.0.1"):
        self.script = script
        self.sock, self.port, self.address = listening(host)
        self.accepted = 0
        self.peers: list[tuple] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.peers.append(peer)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            try:
                self.script(conn)
            except OSError:
                pass

    @staticmethod
    def reset(conn: socket.socket) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def stop(self):
        """Stop listening: new connects are refused (shutdown wakes the blocked accept)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def scripted_backend():
    started: list[ScriptedBackend] = []

    def make(script, **kw) -> ScriptedBackend:
        b = ScriptedBackend(script, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """tools/gen_certs.py's set: {"ca", "default", "exact" (api.example.com),
    "wildcard" (*.example.com)} -> PemFiles(cert_path, key_path)."""
    return _load_tool("gen_certs").generate(tmp_path_factory.mktemp("certs"))


class TlsBackend:
    """A TLS server: after the handshake it sends `backend=NAME\\n`, then echoes; on the
    client's close_notify it answers with its own (a clean TLS close both ways)."""

    def __init__(self, name: str, cert_path, key_path):
        self.name = name
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert_path, key_path)
        self.handshakes = 0
        self.server = ScriptedBackend(self._script)
        self.port, self.address = self.server.port, self.server.address

    def _script(self, conn: socket.socket):
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.handshakes += 1
        with tls:
            tls.sendall(f"backend={self.name}\n".encode())
            while data := tls.recv(65536):
                tls.sendall(data)
            tls.unwrap()

    def stop(self):
        self.server.stop()


@pytest.fixture
def tls_backend(tls_certs):
    started: list[TlsBackend] = []

    def make(name: str, role: str) -> TlsBackend:
        """A TLS backend serving the certificate of `role` ("exact", "wildcard", ...)."""
        b = TlsBackend(name, tls_certs[role].cert_path, tls_certs[role].key_path)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def build_client_hello(sni: str | None = None, alpn: tuple = (), *,
                       record_sizes: tuple = (), key_share: int = 0) -> bytes:
    """A TLS 1.3-style ClientHello (as in tests/core/test_clienthello.py), hand-built.

    `record_sizes` cuts the handshake message into TLS records of those payload sizes
    (the rest goes in one last record); `key_share` adds a key share of that many bytes
    (1216 is what X25519MLKEM768 clients send).
    """
    def u16(n: int) -> bytes:
        return n.to_bytes(2, "big")

    def ext(kind: int, data: bytes) -> bytes:
        return u16(kind) + u16(len(data)) + data

    exts = ext(43, b"\x04\x03\x04\x03\x03")  # supported_versions: TLS 1.3, 1.2
    if sni is not None:
        name = sni.encode()
        exts = ext(0, u16(len(name) + 3) + b"\x00" + u16(len(name)) + name) + exts
    if alpn:
        names = b"".join(bytes([len(p)]) + p.encode() for p in alpn)
        exts += ext(16, u16(len(names)) + names)
    if key_share:
        entry = u16(0x11EC) + u16(key_share) + bytes(i % 251 for i in range(key_share))
        exts += ext(51, u16(len(entry)) + entry)
    body = (b"\x03\x03" + bytes(range(32)) + b"\x20" + bytes(32) + u16(4) + b"\x13\x01\x13\x02"
            + b"\x01\x00" + u16(len(exts)) + exts)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    out, pos = b"", 0
    for size in (*record_sizes, len(message)):
        fragment = message[pos:pos + size]
        if fragment:
            out += b"\x16\x03\x01" + u16(len(fragment)) + fragment
        pos += len(fragment)
    return out


@pytest.fixture
def client_hello():
    """`build_client_hello` as a fixture."""
    return build_client_hello


def _shown(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_line_of(proxy: Proxy, ends: tuple, timeout: float = 10.0) -> dict:
    """The access-log line of one connection; waits for it, since it is written at close.

    `ends` is (sock.getsockname(), sock.getpeername()) of the client's socket: the
    client port alone is not enough, one port may serve connections to two listeners.
    """
    client, listener = _shown(ends[0]), f"tcp:{_shown(ends[1])}"
    deadline = time.monotonic() + timeout
    while True:
        found = [x for x in proxy.access_lines()
                 if x.get("client") == client and x.get("listener") == listener]
        if found:
            assert len(found) == 1, f"{len(found)} access-log lines for {ends}: {found}"
            return found[0]
        assert time.monotonic() < deadline, f"no access-log line for {ends}:\n{proxy.logs()}"
        time.sleep(0.02)


@pytest.fixture(scope="session")
def testkit():
    """The helpers above for module-scoped fixtures (which cannot use the function-scoped
    ones) and for tests: Proxy, NamedBackend, ScriptedBackend, TlsBackend,
    build_client_hello, fast_config, free_port, access_line_of."""
    return SimpleNamespace(Proxy=Proxy, NamedBackend=NamedBackend,
                           ScriptedBackend=ScriptedBackend, TlsBackend=TlsBackend,
                           build_client_hello=build_client_hello, fast_config=fast_config,
                           free_port=free_port, access_line_of=access_line_of)
