"""The load generators, each bounded in time: iperf3 (bulk), wrk (HTTP requests, short
connections, and raw TLS ClientHellos through a Lua script), bench_udp's C closed-loop
UDP client, idle connections opened from this process, and bench_tls's TLS clients.

Each returns plain numbers; none starts a process that outlives the call (subprocess.run
kills its child on timeout or Ctrl-C).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import bench_tls
import bench_udp

from benchlib.procs import BenchError

UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


@dataclass(frozen=True, slots=True)
class WrkResult:
    rate: float  # requests (or connections, with Connection: close) per second
    requests: int
    p50_us: float
    p99_us: float
    errors: int  # socket errors plus non-2xx/3xx answers


def wrk(port: int, seconds: float, *, threads: int, connections: int, close: bool = False,
        script: Path | None = None) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    if script:
        argv += ["-s", str(script)]
    out = _run(argv + [f"http://127.0.0.1:{port}/"], seconds + 30)
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise BenchError(f"wrk printed no result:\n{out[-1500:]}")
    errors = sum(int(n) for n in re.findall(
        r"(?:connect|read|write|timeout) (\d+)", _line(out, "Socket errors")))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(float(rate.group(1)), int(total.group(1)), _percentile(out, "50"),
                     _percentile(out, "99"), errors)


def _line(out: str, prefix: str) -> str:
    found = re.search(rf"{prefix}.*", out)
    return found.group(0) if found else ""


def _percentile(out: str, pct: str) -> float:
    found = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.MULTILINE)
    if not found:
        raise BenchError(f"wrk printed no {pct}% latency:\n{out[-1500:]}")
    return float(found.group(1)) * UNITS_US[found.group(2)]


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout:g} s") from exc
    return done.stdout + done.stderr


def iperf3(port: int, seconds: float, streams: int) -> tuple[float, int]:
    """(bits per second, bytes) received by the iperf3 server (client to server).
    Tried twice: the single-client iperf3 server refuses a test while it is still
    tearing down the previous one."""
    try:
        return _iperf3_once(port, seconds, streams)
    except BenchError:
        time.sleep(1.0)
        return _iperf3_once(port, seconds, streams)


def _iperf3_once(port: int, seconds: float, streams: int) -> tuple[float, int]:
    out = _run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}",
                "-P", str(streams), "-J", "--connect-timeout", "3000"], seconds + 30)
    try:
        result = json.loads(out[out.index("{"):])
    except ValueError as exc:
        raise BenchError(f"iperf3 printed no JSON:\n{out[-1500:]}") from exc
    if "error" in result:
        raise BenchError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    return float(received["bits_per_second"]), int(received["bytes"])


def udp_closed_loop(port: int, sources: int, seconds: float, c_load: str) -> tuple[float, float]:
    """(round trips per second, fraction lost): tools/bench_udp.py's C client."""
    return bench_udp.closed_loop(port, sources, seconds, c_load)


def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` connections through `port`, each proven end to end (one byte echoed by
    the holding backend), then left idle. The caller closes them."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise BenchError(f"idle connection {len(socks)} through port {port} got "
                                 "no echo")
    except (OSError, BenchError):
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
    socks.clear()


def tls_handshakes(port: int, seconds: float, clients: int = 2,
                   threads: int = 4) -> tuple[int, int, float]:
    """(handshakes completed, failed, wall seconds): tools/bench_tls.py's clients."""
    return bench_tls.load(port, seconds, clients, threads, False)


def client_hello(sni: str) -> bytes:
    """The bytes of a real TLS ClientHello for `sni`, as Python's ssl sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def hello_script(sni: str, path: Path) -> Path:
    """A wrk Lua script whose every request is a ClientHello for `sni` (answered by the
    `reply` backend with a Connection: close response, so one request = one connection).

    wrk parses thread 0's first request at startup and refuses anything but HTTP, so
    that one call (never sent) returns a plain request; `setup` numbers the threads.
    """
    escaped = "".join(f"\\{byte}" for byte in client_hello(sni))
    path.write_text(
        f'local hello = "{escaped}"\n'
        "local threads = 0\n"
        'function setup(thread) thread:set("id", threads); threads = threads + 1 end\n'
        "function init(args) verifying = (id == 0) end\n"
        "function request()\n"
        "    if verifying then verifying = false; return wrk.format() end\n"
        "    return hello\n"
        "end\n")
    return path
