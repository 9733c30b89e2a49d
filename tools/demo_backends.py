"""Small demo backends for the quick start and for checking rules by hand.

    python tools/demo_backends.py [--tls] [--spec NAME=HOST:PORT[/udp|/tls]]... [--duration S]

By default: TCP `web-a` 127.0.0.1:9001, `web-b` :9002, `api` :9003 and UDP `dns` :9053
(`--tls` adds a TLS backend `api-tls` on :9443 whose certificate, for api.example.com,
is signed by a CA written to --cert-dir). `--spec` replaces that set; port 0 picks a
free port (the `listening` line tells which).

Every TCP connection is answered with ONE plaintext line, then whatever the client
sends later is echoed:

    backend=web-a port=9001 peer=127.0.0.1:51234 got=<first bytes as hex, up to 16>

even when the first bytes are a TLS ClientHello (it is a demo: a client doing SNI
routing through a passthrough proxy sees which backend got it). An HTTP request gets
an HTTP/1.1 200 response whose body is that line, so curl works. A TLS backend does
the same inside TLS. A UDP backend answers each datagram with
`backend=dns port=9053 peer=IP:PORT got=<payload as text, or hex: if binary>`.

Stdout, line-buffered, for people and scripts: one `listening NAME PROTO HOST:PORT`
per backend, then `ready`, then `served <answer line>` per answered connection or
datagram. A connection closed without sending anything (a health check) is not
answered nor printed. Runs until SIGINT/SIGTERM or --duration, then exits 0; exits 1
when a port cannot be bound. Demo only: no limits, never expose it beyond loopback.
"""

from __future__ import annotations

import argparse
import re
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SPECS = ("web-a=127.0.0.1:9001", "web-b=127.0.0.1:9002", "api=127.0.0.1:9003",
                 "dns=127.0.0.1:9053/udp")
TLS_SPEC = "api-tls=127.0.0.1:9443/tls"
FIRST_BYTES_WAIT = 1.0  # a client that sends nothing still gets its line after this
HTTP_HEAD_LIMIT = 64 * 1024
ECHO_IDLE = 300.0  # echo threads end after this long without data
HTTP_METHOD = re.compile(rb"^(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT) ")
SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s]+)"
                  r":(?P<port>\d{1,5})(?:/(?P<kind>tcp|udp|tls))?$")


class DemoError(Exception):
    """A bad --spec or a port that cannot be bound: the message says what to do."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    host: str
    port: int
    kind: str  # "tcp", "udp" or "tls"


def parse_spec(text: str) -> BackendSpec:
    """`NAME=HOST:PORT[/udp|/tls]` (IPv6 as `[::1]:9001`) -> BackendSpec."""
    match = SPEC.match(text.strip())
    if not match or int(match["port"]) > 65535:
        raise DemoError(f"bad --spec {text!r}; expected NAME=HOST:PORT[/udp|/tls], "
                        "e.g. web-a=127.0.0.1:9001 or dns=[::1]:9053/udp")
    host = match["host"].strip("[]")
    return BackendSpec(match["name"], host, int(match["port"]), match["kind"] or "tcp")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def answer_line(name: str, port: int, peer: tuple, got: str) -> str:
    return f"backend={name} port={port} peer={hostport(peer[0], peer[1])} got={got}"


def udp_payload_text(payload: bytes) -> str:
    """Printable text as is (trailing newline dropped), anything else as hex:."""
    try:
        text = payload.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return "hex:" + payload[:16].hex()
    return text[:64] if text.isprintable() else "hex:" + payload[:16].hex()


class Printer:
    """Serialises stdout lines from the connection threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)


class TcpBackend:
    """A listening TCP (or TLS) backend; each accepted connection gets a daemon thread."""

    def __init__(self, spec: BackendSpec, printer: Printer, tls_context=None):
        self.spec, self.printer, self.tls_context = spec, printer, tls_context
        self.sock = _bind(spec, socket.SOCK_STREAM)
        self.port = self.sock.getsockname()[1]

    def on_readable(self) -> None:
        try:
            conn, peer = self.sock.accept()
        except OSError:
            return
        threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        try:
            with self._maybe_wrap(conn) as conn:
                self._answer(conn, peer)
        except OSError:
            conn.close()  # resets, failed handshakes, clients gone: nothing to tell

    def _maybe_wrap(self, conn: socket.socket):
        if self.tls_context is None:
            return conn
        conn.settimeout(5.0)  # wrap_socket hands the fd over to the TLS socket
        return self.tls_context.wrap_socket(conn, server_side=True)

    def _answer(self, conn, peer: tuple) -> None:
        first = _first_bytes(conn)
        if first is None:
            return  # closed without a word: a health check
        line = answer_line(self.spec.name, self.port, peer, first[:16].hex())
        if HTTP_METHOD.match(first):
            _answer_http(conn, first, line)
        else:
            conn.sendall(line.encode() + b"\n")
        self.printer("served " + line)
        _echo(conn)

    def close(self) -> None:
        self.sock.close()


class UdpBackend:
    """A UDP backend: one reply per datagram, served from the selector loop."""

    def __init__(self, spec: BackendSpec, printer: Printer):
        self.spec, self.printer = spec, printer
        self.sock = _bind(spec, socket.SOCK_DGRAM)
        self.port = self.sock.getsockname()[1]

    def on_readable(self) -> None:
        try:
            payload, peer = self.sock.recvfrom(65535)
            line = answer_line(self.spec.name, self.port, peer, udp_payload_text(payload))
            self.sock.sendto(line.encode(), peer)
        except OSError:
            return  # an ICMP error from an earlier reply; the next datagram is unaffected
        self.printer("served " + line)

    def close(self) -> None:
        self.sock.close()


def _bind(spec: BackendSpec, sock_type: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = socket.socket(family, sock_type)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.host, spec.port))
        if sock_type == socket.SOCK_STREAM:
            sock.listen(512)
    except OSError as exc:
        sock.close()
        raise DemoError(
            f"cannot listen for {spec.name!r} on {hostport(spec.host, spec.port)}/{spec.kind}: "
            f"{exc.strerror or exc}; is another demo running? choose ports with --spec"
        ) from None
    sock.setblocking(False)
    return sock


def _first_bytes(conn) -> bytes | None:
    """The first chunk the client sends, b"" if it stays silent, None if it just closes."""
    conn.settimeout(FIRST_BYTES_WAIT)
    try:
        data = conn.recv(65536)
    except TimeoutError:
        return b""
    return data or None


def _answer_http(conn, head: bytes, line: str) -> None:
    conn.settimeout(5.0)
    while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < HTTP_HEAD_LIMIT:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    body = line.encode() + b"\n"
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    conn.shutdown(socket.SHUT_WR)


def _echo(conn) -> None:
    conn.settimeout(ECHO_IDLE)
    while data := conn.recv(65536):
        conn.sendall(data)


def tls_server_context(cert_dir: Path):
    """A server context with an api.example.com certificate signed by a fresh CA."""
    import ssl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gen_certs

    files = gen_certs.generate(cert_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["exact"].cert_path, files["exact"].key_path)
    return context, files["ca"].cert_path


class StopFlag:
    """Set by SIGINT/SIGTERM; the handler only records, the loop acts."""

    def __init__(self) -> None:
        self.stopped = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.stopped = True


def start_backends(specs: list[BackendSpec], printer: Printer, cert_dir: Path | None):
    """Bind every backend (all or none: a failure closes those already bound)."""
    backends, context = [], None
    try:
        for spec in specs:
            if spec.kind == "udp":
                backends.append(UdpBackend(spec, printer))
                continue
            if spec.kind == "tls" and context is None:
                cert_dir = cert_dir or Path(tempfile.mkdtemp(prefix="dynproxy-demo-certs-"))
                context, ca_path = tls_server_context(cert_dir)
                printer(f"tls certificate for api.example.com; clients trust it with --ca {ca_path}")
            backends.append(TcpBackend(spec, printer, context if spec.kind == "tls" else None))
    except DemoError:
        for backend in backends:
            backend.close()
        raise
    return backends


def serve(backends: list, stop: StopFlag, duration: float | None) -> None:
    deadline = None if duration is None else time.monotonic() + duration
    with selectors.DefaultSelector() as selector:
        for backend in backends:
            selector.register(backend.sock, selectors.EVENT_READ, backend)
        while not stop.stopped and (deadline is None or time.monotonic() < deadline):
            for key, _ in selector.select(timeout=0.2):
                key.data.on_readable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", action="append", metavar="NAME=HOST:PORT[/udp|/tls]",
                        help="a backend to start (repeatable; replaces the default set)")
    parser.add_argument("--tls", action="store_true", help=f"also start {TLS_SPEC}")
    parser.add_argument("--cert-dir", type=Path, help="where --tls writes its CA and certificate")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args(argv)
    printer, stop = Printer(), StopFlag()
    stop.install()
    try:
        specs = [parse_spec(s) for s in (args.spec or DEFAULT_SPECS)]
        specs += [parse_spec(TLS_SPEC)] if args.tls else []
        backends = start_backends(specs, printer, args.cert_dir)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    for backend in backends:
        printer(f"listening {backend.spec.name} {backend.spec.kind} "
                f"{hostport(backend.spec.host, backend.port)}")
    printer(f"ready ({len(backends)} backends; Ctrl-C to stop)")
    try:
        serve(backends, stop, args.duration)
    finally:
        for backend in backends:
            backend.close()
    printer("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
