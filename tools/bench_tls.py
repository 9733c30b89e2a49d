#!/usr/bin/env python3
"""TLS handshakes per second through dynproxy terminating, against HAProxy terminating
the same certificate on this machine, with the same load generator.

    python tools/bench_tls.py [--seconds 5] [--runs 3] [--clients 2] [--threads 4]
                              [--key-type ec|rsa] [--tls12] [--only dynproxy|haproxy]

Each proxy gets one worker (dynproxy `server.workers: 1`, HAProxy `nbthread 1`),
terminates TLS with one certificate (tools/gen_certs.py; HAProxy's `crt` takes cert and
key in one PEM), and forwards the plaintext to one backend process that greets every
connection with one byte. A client does a full handshake (no session resumption, no
certificate verification: the client's CPU is the scarce one), reads that byte, and
closes; `--clients` processes of `--threads` threads each loop on that for `--seconds`.
Every run is bounded in time; medians over `--runs` are printed, with the proxy's CPU
time per handshake (its processes' user+system time: on a small machine the load
generator shares the cores, so CPU per handshake is the fairer figure) and the ratio
dynproxy/HAProxy. dynproxy runs with the access log off (HAProxy logs nothing here).
Needs `haproxy` on PATH (Debian: apt-get install -y haproxy) and `openssl`-backed Python.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gen_certs  # noqa: E402

CIPHERS_TLS12 = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
SNI = "bench.example.com"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the backend: one byte per connection, then wait for EOF ------------------------------


def backend_main(ports) -> None:
    """Listen on a port of its own choosing (told through `ports`) and greet."""
    import asyncio

    async def greet(reader, writer):
        writer.write(b"B")
        try:
            await writer.drain()
            await reader.read()
        except OSError:
            pass
        writer.close()

    async def serve():
        server = await asyncio.start_server(greet, "127.0.0.1", 0, backlog=4096)
        ports.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# --- the load generator --------------------------------------------------------------------


def client_context(tls12: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_process(port: int, seconds: float, threads: int, tls12: bool, out) -> None:
    ctx = client_context(tls12)
    counts = [[0, 0] for _ in range(threads)]
    start_at = time.monotonic()

    def loop(slot: list) -> None:
        end = start_at + seconds
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    with ctx.wrap_socket(raw, server_hostname=SNI) as tls:
                        if tls.recv(1) == b"B":
                            slot[0] += 1
                            continue
            except OSError:
                pass
            slot[1] += 1

    workers = [threading.Thread(target=loop, args=(c,)) for c in counts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((sum(c[0] for c in counts), sum(c[1] for c in counts)))


def load(port: int, seconds: float, clients: int, threads: int, tls12: bool) -> tuple:
    """(handshakes completed, failures, wall seconds) of one bounded run."""
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=client_process,
                                     args=(port, seconds, threads, tls12, queue))
             for _ in range(clients)]
    started = time.monotonic()
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 30) for _ in procs]
    for p in procs:
        p.join(10)
    return sum(r[0] for r in results), sum(r[1] for r in results), \
        time.monotonic() - started


# --- the proxies -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User+system CPU of `pid` and its children that are alive."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_tls: {proc.args[0]} exited with {proc.returncode}:\n"
                             + log.read_text(errors="replace")[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench_tls: nothing listening on {port} after {timeout}s")


def start_dynproxy(work: Path, certs: dict, port: int, backend: int) -> subprocess.Popen:
    rules = work / "bench.rules"
    rules.write_text(f"backend app 127.0.0.1:{backend}\ndefault -> terminate tls then "
                     "forward(app)\n")
    config = work / "dynproxy.yaml"
    config.write_text("\n".join([
        "server:", "  workers: 1", "  udp_bind: []", "  max_connections: 20000",
        "monitoring:", "  access_log: false", "  log_level: warning",
        f"  metrics_bind: 127.0.0.1:{free_port()}",
        "tls:", f"  cert_path: {certs['default'].cert_path}",
        f"  key_path: {certs['default'].key_path}", ""]))
    log = work / "dynproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dynproxy", "--rules", str(rules),
                                 "--config", str(config), "--tcp-bind", f"127.0.0.1:{port}"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, proc, log)
    return proc


def start_haproxy(work: Path, certs: dict, port: int, backend: int) -> subprocess.Popen:
    pem = work / "haproxy.pem"
    pem.write_bytes(certs["default"].cert_path.read_bytes()
                    + certs["default"].key_path.read_bytes())
    config = work / "haproxy.cfg"
    config.write_text("\n".join([
        "global", "  nbthread 1", "  maxconn 8000",
        "  ssl-default-bind-options ssl-min-ver TLSv1.2",
        f"  ssl-default-bind-ciphers {CIPHERS_TLS12}",
        "defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 30s",
        "  timeout server 30s",
        "frontend tls_in", f"  bind 127.0.0.1:{port} ssl crt {pem}",
        "  default_backend app",
        "backend app", f"  server app 127.0.0.1:{backend}", ""]))
    log = work / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    wait_port(port, proc, log)
    return proc


def measure(name: str, start, args, work: Path, certs: dict, backend: int) -> dict:
    port = free_port()
    proc = start(work, certs, port, backend)
    try:
        load(port, 0.5, args.clients, args.threads, args.tls12)  # warm up
        runs = []
        for _ in range(args.runs):
            cpu0 = cpu_seconds(proc.pid)
            done, failed, wall = load(port, args.seconds, args.clients, args.threads,
                                      args.tls12)
            cpu = cpu_seconds(proc.pid) - cpu0
            runs.append({"rate": done / wall, "failed": failed,
                         "cpu_us": cpu / done * 1e6 if done else float("nan")})
            print(f"  {name:9} {done / wall:8.0f} handshakes/s  {runs[-1]['cpu_us']:6.0f} us "
                  f"proxy CPU per handshake  ({failed} failed)", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"rate": statistics.median(r["rate"] for r in runs),
            "cpu_us": statistics.median(r["cpu_us"] for r in runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process")
    parser.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    parser.add_argument("--tls12", action="store_true", help="clients stop at TLS 1.2")
    parser.add_argument("--only", choices=("dynproxy", "haproxy"))
    args = parser.parse_args(argv)
    targets = {"dynproxy": start_dynproxy, "haproxy": start_haproxy}
    if args.only:
        targets = {args.only: targets[args.only]}
    if "haproxy" in targets and shutil.which("haproxy") is None:
        parser.error("haproxy is not installed (apt-get install -y haproxy), or use "
                     "--only dynproxy")
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        work = Path(tmp)
        certs = gen_certs.generate(work, default_name=SNI, key_type=args.key_type)
        ports = multiprocessing.Queue()
        backend = multiprocessing.Process(target=backend_main, args=(ports,), daemon=True)
        backend.start()
        try:
            backend_port = ports.get(timeout=10)
            print(f"TLS {'1.2' if args.tls12 else '1.3'} full handshakes, {args.key_type} key, "
                  f"{args.clients}x{args.threads} clients, {args.runs} runs of "
                  f"{args.seconds:g}s, {os.cpu_count()} CPUs", flush=True)
            results = {name: measure(name, start, args, work, certs, backend_port)
                       for name, start in targets.items()}
        finally:
            backend.terminate()
            backend.join(5)
    report(results)
    return 0


def report(results: dict) -> None:
    for name, r in results.items():
        print(f"median {name:9} {r['rate']:8.0f} handshakes/s  {r['cpu_us']:6.0f} us CPU each")
    if len(results) == 2:
        dyn, ha = results["dynproxy"], results["haproxy"]
        print(f"ratio dynproxy/haproxy: {dyn['rate'] / ha['rate']:.2f} of the rate, "
              f"{dyn['cpu_us'] / ha['cpu_us']:.2f}x the CPU per handshake")
    print(json.dumps({name: {"rate": round(r["rate"]), "cpu_us": round(r["cpu_us"])}
                      for name, r in results.items()}))


if __name__ == "__main__":
    sys.exit(main())
