#!/usr/bin/env python3
"""Decisions per second of the compiled router for a generated rule set of N rules.

    python tools/bench_router.py --rules 10000 [--seconds 2] [--names 100000]

The rule mix is what a hosting platform writes: exact names, suffixes, prefixes,
globs, client CIDRs and port lists, alone and combined, ending with `default`.
Queries draw from a large set of names (most never seen before, so the per-value
caches miss) plus names that hit rules at every depth of the file. Bounded in time;
prints one line per measurement.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynproxy.core.router import ConnInfo  # noqa: E402
from dynproxy.lang import load_text  # noqa: E402


def generate_rules(n: int, rng: random.Random) -> str:
    lines = ["backend a 127.0.0.1:9001", "backend b 127.0.0.1:9002", "backend c 127.0.0.1:9003"]
    for i in range(n - 1):
        lines.append(_rule(i, rng))
    lines.append("default -> forward(c)")
    return "\n".join(lines) + "\n"


def _rule(i: int, rng: random.Random) -> str:
    action = rng.choice(["forward(a)", "forward(b)", "lb(a:3, b:1)", "reject"])
    kind = i % 10
    if kind < 4:
        cond = f'sni exact "host{i}.tenant{i % 97}.example.com"'
    elif kind < 6:
        cond = f'sni suffix ".tenant{i}.example.net"'
    elif kind == 6:
        cond = f'sni prefix "svc{i}-"'
    elif kind == 7:
        cond = f'sni glob "*.zone{i}.example.org"'
    elif kind == 8:
        cond = f"src 10.{i // 256 % 256}.{i % 256}.0/24 and dport [443, 8443]"
    else:
        cond = f'sni exact "api{i}.example.com" and dport {1000 + i % 5000}..{2000 + i % 5000}'
    return f"{cond} -> {action}"


def queries(n_rules: int, n_names: int, rng: random.Random) -> list[ConnInfo]:
    out = []
    for _ in range(n_names):
        i = rng.randrange(max(1, n_rules))
        sni = rng.choice([
            f"host{i}.tenant{i % 97}.example.com",
            f"www.tenant{i}.example.net",
            f"svc{i}-backend.local",
            f"a.zone{i}.example.org",
            f"unknown{rng.randrange(10**9)}.example.io",
        ])
        src = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        out.append(ConnInfo("tcp", src, rng.choice([443, 8443, 1500]), sni, ()))
    return out


def measure(rules, conns, seconds: float) -> float:
    decide, n, done = rules.decide_conn, len(conns), 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        batch = conns[done % n: done % n + 1000]
        for conn in batch:
            decide(conn)
        done += len(batch)
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--names", type=int, default=100_000, help="distinct queries")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    rules = load_text(generate_rules(args.rules, rng), "bench.rules")
    compile_s = time.perf_counter() - t0
    conns = queries(args.rules, args.names, rng)
    rate = measure(rules, conns, args.seconds)
    hot = measure(rules, conns[:200], args.seconds / 2)
    print(f"rules={args.rules:>6}  load+lint+compile={compile_s:6.2f}s  "
          f"decisions/s={rate:>10,.0f} (mostly uncached)  {hot:>10,.0f} (cached values)  "
          f"us/decision={1e6 / rate:.2f}")


if __name__ == "__main__":
    main()
