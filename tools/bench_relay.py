#!/usr/bin/env python3
"""Micro benchmark of dynproxy.net.relay: relayed pairs against direct connections.

    python tools/bench_relay.py [--seconds 2] [--streams 1,4] [--clients 32]
                                [--idle 2000] [--paths splice,copy] [--buffer-size 65536]
                                [--profile]

Two processes, so the relay's CPU is measured alone: this one is a minimal proxy (an
accept loop; per connection one greenlet that connects upstream and calls relay()),
and a child process (this file with --role load) holds the backends and the clients.
Each workload runs direct (clients to backends) and then through the proxy:

  bulk    N streams uploading as fast as they can: MB/s, proxy CPU seconds per GB
  short   C client loops of connect, 100-byte request, 100-byte reply, close:
          connections/s, proxy CPU microseconds per connection (accept + connect +
          relay + close: what a proxy pays per connection, load generator excluded)
  idle    K proxied connections opened then left silent: RSS growth per connection of a
          fresh proxy process; "hold" is the same proxy whose greenlets only hold the two
          sockets (the floor: greenlet, sockets, accept), so relay's own share is the rest

The load generator is Python too, so rates are bounded by it (compare with direct);
the proxy CPU figures are the ones that compare with HAProxy (~90 us per short
connection). Every phase is bounded in time; the child is stopped at the end.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynproxy.net.relay import relay  # noqa: E402

REQUEST = b"Q" * 100
REPLY = b"R" * 100
CHUNK = memoryview(os.urandom(1 << 20))


# --- load process: backends and clients ----------------------------------------------


def listen(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


def serve(listener: socket.socket, handler) -> None:
    while True:
        conn, _ = listener.accept()
        gevent.spawn(handler, conn)


def backend(conn: socket.socket) -> None:
    """Sink what comes; answer a 100-byte request with a 100-byte reply and close."""
    buf = bytearray(1 << 20)
    got = 0
    try:
        while n := conn.recv_into(buf):
            got += n
            if got == len(REQUEST):
                conn.sendall(REPLY)
                break
    except OSError:
        pass
    conn.close()


def bulk_clients(target: int, streams: int, seconds: float) -> dict:
    socks = [socket.create_connection(("127.0.0.1", target)) for _ in range(streams)]
    deadline = time.monotonic() + seconds
    sent = [0] * streams

    def push(i: int) -> None:
        while time.monotonic() < deadline:
            socks[i].sendall(CHUNK)
            sent[i] += len(CHUNK)

    started = time.monotonic()
    gevent.joinall([gevent.spawn(push, i) for i in range(streams)])
    elapsed = time.monotonic() - started
    for sock in socks:
        sock.close()
    return {"bytes": sum(sent), "elapsed": elapsed}


def short_clients(target: int, clients: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    done = [0]

    def loop() -> None:
        while time.monotonic() < deadline:
            sock = socket.socket()
            sock.connect(("127.0.0.1", target))
            sock.sendall(REQUEST)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            sock.close()
            assert reply == REPLY, reply
            done[0] += 1

    started = time.monotonic()
    gevent.joinall([gevent.spawn(loop) for _ in range(clients)], raise_error=True)
    return {"conns": done[0], "elapsed": time.monotonic() - started}


def idle_clients(target: int, count: int, held: list) -> dict:
    for _ in range(count):
        held.append(socket.create_connection(("127.0.0.1", target)))
    return {"open": len(held)}


def run_load() -> None:
    """Child process: start the backend, then obey one JSON command per stdin line."""
    listener = listen()
    gevent.spawn(serve, listener, backend)
    print(json.dumps({"backend": listener.getsockname()[1]}), flush=True)
    held: list[socket.socket] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["workload"] == "bulk":
            out = bulk_clients(cmd["target"], cmd["streams"], cmd["seconds"])
        elif cmd["workload"] == "short":
            out = short_clients(cmd["target"], cmd["clients"], cmd["seconds"])
        elif cmd["workload"] == "idle":
            out = idle_clients(cmd["target"], cmd["count"], held)
        else:  # "drop": close the idle connections
            for sock in held:
                sock.close()
            out = {"closed": len(held)}
            held.clear()
        print(json.dumps(out), flush=True)


# --- proxy process ---------------------------------------------------------------------


class Proxy:
    """A minimal proxy around relay(): accept, connect upstream, relay, in one greenlet."""

    def __init__(self, backend_port: int, path: str, buffer_size: int = 65536) -> None:
        self.listener = listen()
        self.port = self.listener.getsockname()[1]
        self.upstream = ("127.0.0.1", backend_port)
        self.path = path
        self.buffer_size = buffer_size
        self.open = 0
        self.acceptor = gevent.spawn(serve, self.listener, self.handle)

    def handle(self, client: socket.socket) -> None:
        self.open += 1
        upstream = socket.socket()
        try:
            upstream.connect(self.upstream)
            if self.path == "hold":
                gevent.sleep(3600)
            else:
                relay(client, upstream, use_splice=self.path == "splice",
                      buffer_size=self.buffer_size)
        finally:
            self.open -= 1

    def stop(self) -> None:
        self.acceptor.kill()
        self.listener.close()


class Load:
    """The child process, driven one command at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "load"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.backend = json.loads(self.proc.stdout.readline())["backend"]

    def run(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        stop_child(self.proc)


def stop_child(proc: subprocess.Popen) -> None:
    """Close its stdin (it exits at EOF); kill it by its pid if it has not within 10 s."""
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(load: Load, **cmd) -> tuple[dict, float]:
    before = cpu_seconds()
    out = load.run(**cmd)
    return out, cpu_seconds() - before


def bench_bulk(load: Load, target: int, streams: int, seconds: float) -> tuple[float, float]:
    out, cpu = measured(load, workload="bulk", target=target, streams=streams, seconds=seconds)
    return out["bytes"] / out["elapsed"] / 1e6, cpu / (out["bytes"] / 1e9)


def bench_short(load: Load, target: int, clients: int, seconds: float) -> tuple[float, float]:
    out, cpu = measured(load, workload="short", target=target, clients=clients, seconds=seconds)
    return out["conns"] / out["elapsed"], cpu / out["conns"] * 1e6


def bench_idle(load: Load, path: str, count: int) -> float:
    """RSS growth per idle connection of a fresh proxy process (--role idle)."""
    proxy = subprocess.Popen([sys.executable, __file__, "--role", "idle", "--paths", path,
                              "--backend", str(load.backend)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(proxy.stdout.readline())

    def rss_when_open(n: int) -> int:
        proxy.stdin.write(f"{n}\n")
        proxy.stdin.flush()
        return int(proxy.stdout.readline())

    load.run(workload="idle", target=port, count=10)  # warm the free lists and caches
    before = rss_when_open(10)
    load.run(workload="idle", target=port, count=count)
    grown = rss_when_open(count + 10) - before
    load.run(workload="drop")
    stop_child(proxy)
    return grown / count


def run_idle_proxy(args) -> None:
    """Child process: a fresh proxy that reports its RSS once N connections are open."""
    proxy = Proxy(args.backend, args.paths[0])
    print(proxy.port, flush=True)
    for line in sys.stdin:
        while proxy.open < int(line):
            gevent.sleep(0.01)
        gevent.sleep(0.05)
        print(rss_bytes(), flush=True)


def run_proxy(args) -> None:
    load = Load()
    rows: list[tuple[str, str, str, str]] = []
    for streams in args.streams:
        rate, _ = bench_bulk(load, load.backend, streams, args.seconds)
        rows.append((f"bulk {streams} stream(s)", "direct", f"{rate:,.0f} MB/s", "-"))
    rate, _ = bench_short(load, load.backend, args.clients, args.seconds)
    rows.append((f"short, {args.clients} clients", "direct", f"{rate:,.0f} conn/s", "-"))
    profiler = start_profile() if args.profile else None
    for path in args.paths:
        proxy = Proxy(load.backend, path, args.buffer_size)
        for streams in args.streams:
            rate, cpu = bench_bulk(load, proxy.port, streams, args.seconds)
            rows.append((f"bulk {streams} stream(s)", path, f"{rate:,.0f} MB/s",
                         f"{cpu:.3f} CPU s/GB"))
        rate, cpu = bench_short(load, proxy.port, args.clients, args.seconds)
        rows.append((f"short, {args.clients} clients", path, f"{rate:,.0f} conn/s",
                     f"{cpu:.1f} CPU us/conn"))
        proxy.stop()
    if profiler is not None:
        stop_profile(profiler)
    for path in ["hold", *args.paths] if args.idle else []:
        per_conn = bench_idle(load, path, args.idle)
        rows.append((f"idle x{args.idle}", path, f"{per_conn / 1024:.2f} KB/conn RSS", "-"))
    load.stop()
    print_table(rows)


def print_table(rows) -> None:
    header = ("workload", "path", "rate", "proxy process cost")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def start_profile():
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def stop_profile(profiler) -> None:
    import pstats

    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["proxy", "load", "idle"], default="proxy")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 4])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--paths", type=lambda s: s.split(","), default=["splice", "copy"])
    parser.add_argument("--buffer-size", type=int, default=65536,
                        help="relay() buffer_size: bytes in flight per direction")
    parser.add_argument("--profile", action="store_true", help="cProfile the proxy process")
    args = parser.parse_args()
    if args.role == "load":
        run_load()
    elif args.role == "idle":
        run_idle_proxy(args)
    else:
        run_proxy(args)


if __name__ == "__main__":
    main()
