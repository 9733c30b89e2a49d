"""The other workloads: (d) UDP round trips, (e) memory per idle proxied connection,
TLS handshakes when terminating, and SNI-routed connections with 10,000 rules vs 10.

Each returns a report Section and keeps its Results in ctx.results.
"""

from __future__ import annotations

import random
import re
import time

import bench_router
import bench_tls
import gen_certs

from benchlib import loads, proxies
from benchlib.proxies import SNI, Target, Upstream
from benchlib.report import Bar, Section, Table, num, ratio, span, workers_cell
from benchlib.runner import (
    Context,
    Results,
    attempt,
    label,
    measured_cpu,
    plain_starters,
    rounds,
    start_all,
    stop_all,
)
from benchlib.workloads_tcp import WRK_CONNECTIONS, WRK_THREADS

UDP_SOURCES = 100  # client source ports, one 64-byte datagram in flight each


def _per_workers(ctx: Context, starters_for, variants: list[str], measure, describe,
                 warmup=None) -> Results:
    results = Results()
    for workers in ctx.workers:
        print(f"-- {workers} worker(s)/thread(s)", flush=True)
        targets = start_all(ctx, starters_for(workers))
        try:
            rounds(ctx, targets, variants, measure, results, describe, warmup)
        finally:
            stop_all(targets)
    return results


# --- (d) UDP -------------------------------------------------------------------------


def udp(ctx: Context) -> Section:
    upstream = Upstream(ctx.backends.port("reply"), ctx.backends.port("udp_echo"))
    c_load = ctx.backends.udp_load

    def measure(target: Target, _variant: str) -> dict:
        (rate, loss), cpu = measured_cpu(target, lambda: loads.udp_closed_loop(
            target.udp_port, UDP_SOURCES, ctx.seconds, c_load))
        per = cpu * 1e6 / (rate * ctx.seconds) if target.proc and rate else None
        return {"rate": rate, "loss": loss, "cpu_us": per}

    def describe(s: dict) -> str:
        return (f"{s['rate']:9,.0f} round trips/s  loss {s['loss']:.4%}  "
                f"CPU {num(s['cpu_us'], 1)} us each")

    def starters(workers: int):
        return plain_starters(ctx, ["direct", "nginx", "dynproxy"], workers, upstream)

    results = _per_workers(ctx, starters, [""], measure, describe,
                           lambda t, _v: loads.udp_closed_loop(t.udp_port, UDP_SOURCES,
                                                               0.5, c_load))
    ctx.results["d"] = results
    return _udp_section(ctx, results)


def _udp_section(ctx: Context, results: Results) -> Section:
    table = Table("UDP round trips (64-byte datagrams, closed loop)",
                  ["target", "workers", "round trips/s", "min-max", "loss (worst run)",
                   "CPU us/round trip", "x nginx", "x direct"])
    section = Section("d", "UDP", [table])
    for workers in ctx.workers:
        for name in ["direct", "nginx", "dynproxy"] if workers == ctx.workers[0] \
                else ["nginx", "dynproxy"]:
            shown = None if name == "direct" else workers
            s = results.series(name, shown)
            losses = s.values("loss")
            table.rows.append([
                name, workers_cell(shown), num(s.median("rate")), span(s.span("rate")),
                f"{max(losses):.3%}" if losses else "-", num(s.median("cpu_us"), 1),
                ratio(results.ratio(name, "nginx", workers, "rate")),
                ratio(results.ratio(name, "direct", workers, "rate"))])
        vs = results.ratio("dynproxy", "nginx", workers, "rate")
        if vs is not None:
            section.bars.append(Bar("UDP rt/s (x nginx)", f"dynproxy x{workers}", vs))
        section.summary[f"UDP round trips/s, dynproxy x{workers}: x nginx"] = ratio(vs)
    table.notes.append(f"{UDP_SOURCES} client source ports, one datagram in flight each, "
                       f"{ctx.seconds:g} s; C client and echo of tools/bench_udp.py; "
                       "HAProxy has no UDP. nginx listens with `reuseport`.")
    return section


# --- (e) memory per idle connection --------------------------------------------------


def memory(ctx: Context) -> Section:
    """A fresh proxy per repetition (a warm allocator would hide the growth)."""
    upstream = Upstream(ctx.backends.port("hold"))
    results = Results()
    for workers in ctx.workers:
        print(f"-- {workers} worker(s)/thread(s)", flush=True)
        for i in range(ctx.repeat):
            for name in ("haproxy", "nginx", "dynproxy"):
                targets = start_all(ctx, plain_starters(ctx, [name], workers, upstream))
                try:
                    for target in targets:
                        _idle_sample(ctx, results, target, i)
                finally:
                    stop_all(targets)
    ctx.results["e"] = results
    return _memory_section(ctx, results)


def _idle_sample(ctx: Context, results: Results, target: Target, i: int) -> None:
    sample = attempt(target, "", lambda t, _v: _idle_growth(t, ctx.idle_conns))
    if sample is not None:
        results.series(target.name, target.workers).samples.append(sample)
        print(f"  run {i + 1} {label(target, '')}: {sample['kb']:6.2f} KB per idle "
              f"connection (RSS {sample['rss0']:,.0f} -> {sample['rss1']:,.0f} KB)", flush=True)


def _idle_growth(target: Target, count: int) -> dict:
    loads.close_all(loads.open_idle(target.tcp_port, 100))  # first-use allocations
    time.sleep(0.5)
    before = target.rss_kb()
    socks = loads.open_idle(target.tcp_port, count)
    try:
        time.sleep(1.0)
        after = target.rss_kb()
    finally:
        loads.close_all(socks)
    return {"kb": (after - before) / count, "rss0": before, "rss1": after}


def _memory_section(ctx: Context, results: Results) -> Section:
    table = Table(f"Memory per idle proxied connection ({ctx.idle_conns:,} connections)",
                  ["target", "workers", "KB/connection", "min-max", "x HAProxy", "x nginx"])
    section = Section("e", "Memory per idle connection", [table])
    for workers in ctx.workers:
        for name in ("haproxy", "nginx", "dynproxy"):
            s = results.series(name, workers)
            table.rows.append([name, str(workers), num(s.median("kb"), 2),
                               span(s.span("kb"), 2),
                               ratio(results.ratio(name, "haproxy", workers, "kb")),
                               ratio(results.ratio(name, "nginx", workers, "kb"))])
        kb = [results.median(n, workers, "kb") for n in ("dynproxy", "haproxy", "nginx")]
        section.summary[f"KB per idle connection, x{workers}: dynproxy / HAProxy / nginx"] = \
            " / ".join(num(v, 2) for v in kb)
    table.notes.append("growth of VmRSS summed over the proxy's processes between before "
                       "and after opening the connections (each proven by a 1-byte echo "
                       "from a backend that holds it), divided by their number; a fresh "
                       "proxy per repetition, warmed with 100 connections first. Kernel "
                       "socket buffers are not in RSS.")
    return section


# --- TLS handshakes when terminating ------------------------------------------------


def tls(ctx: Context) -> Section:
    certs = gen_certs.generate(ctx.work / "certs", default_name=SNI, key_type="ec")
    cert, key = certs["default"].cert_path, certs["default"].key_path
    pem = ctx.work / "certs" / "haproxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    upstream = Upstream(ctx.backends.port("greet"))

    def starters(workers: int):
        return {
            "haproxy": lambda: proxies.start_haproxy(
                ctx.work, workers, upstream, ctx.nofile, pem=pem,
                ciphers=bench_tls.CIPHERS_TLS12),
            "dynproxy": lambda: proxies.start_dynproxy(
                ctx.work, workers, upstream, rules=proxies.terminating_rules(upstream),
                tls=(cert, key))}

    def measure(target: Target, _variant: str) -> dict:
        (done, failed, wall), cpu = measured_cpu(
            target, lambda: loads.tls_handshakes(target.tcp_port, ctx.seconds))
        return {"rate": done / wall, "failed": failed,
                "cpu_us": cpu * 1e6 / done if done else None}

    def describe(s: dict) -> str:
        return (f"{s['rate']:8,.0f} handshakes/s  failed {s['failed']:.0f}  "
                f"CPU {num(s['cpu_us'], 0)} us each")

    results = _per_workers(ctx, starters, [""], measure, describe,
                           lambda t, _v: loads.tls_handshakes(t.tcp_port, 0.5))
    ctx.results["tls"] = results
    return _tls_section(ctx, results)


def _tls_section(ctx: Context, results: Results) -> Section:
    table = Table("TLS handshakes per second, terminating (same certificate, EC P-256)",
                  ["target", "workers", "handshakes/s", "min-max", "failed",
                   "CPU us/handshake", "x HAProxy"])
    section = Section("tls", "TLS termination", [table])
    for workers in ctx.workers:
        for name in ("haproxy", "dynproxy"):
            s = results.series(name, workers)
            table.rows.append([name, str(workers), num(s.median("rate")),
                               span(s.span("rate")), num(sum(s.values("failed"))),
                               num(s.median("cpu_us")),
                               ratio(results.ratio(name, "haproxy", workers, "rate"))])
        vs = results.ratio("dynproxy", "haproxy", workers, "rate")
        if vs is not None:
            section.bars.append(Bar("TLS handshakes/s", f"dynproxy x{workers}", vs))
        section.summary[f"TLS handshakes/s, dynproxy x{workers}: x HAProxy"] = ratio(vs)
    table.notes.append("tools/bench_tls.py's clients (2 processes x 4 threads, full TLS 1.3 "
                       "handshakes, no resumption) read one byte from the backend and close; "
                       "the Python clients share the cores, so CPU per handshake is the "
                       "fairer figure.")
    return section


# --- SNI routing with 10,000 rules ---------------------------------------------------

RULE_COUNTS = (10, 10_000)
UNMATCHED_SNI = "unknown-tenant.example.io"  # falls through every rule to `default`


def sni_rules(count: int, port: int) -> str:
    """tools/bench_router.py's generated rule mix, every backend pointed at `port`."""
    text = bench_router.generate_rules(count, random.Random(1))
    return re.sub(r"127\.0\.0\.1:900[123]", f"127.0.0.1:{port}", text)


def sni(ctx: Context) -> Section:
    upstream = Upstream(ctx.backends.port("reply"))
    script = loads.hello_script(UNMATCHED_SNI, ctx.work / "client_hello.lua")
    names = {n: f"dynproxy-{n}-rules" for n in RULE_COUNTS}

    def starters(workers: int):
        return {names[n]: (lambda n=n: proxies.start_dynproxy(
            ctx.work, workers, upstream, rules=sni_rules(n, upstream.tcp), label=names[n],
            ready_timeout=300)) for n in RULE_COUNTS}

    def measure(target: Target, _variant: str) -> dict:
        run, cpu = measured_cpu(target, lambda: loads.wrk(
            target.tcp_port, ctx.seconds, threads=WRK_THREADS, connections=WRK_CONNECTIONS,
            script=script))
        return {"rate": run.rate, "p50": run.p50_us, "p99": run.p99_us, "errors": run.errors,
                "cpu_us": cpu * 1e6 / run.requests if run.requests else None}

    def describe(s: dict) -> str:
        return (f"{s['rate']:9,.0f} conn/s  p50 {s['p50']:8,.0f} us  errors "
                f"{s['errors']:.0f}  CPU {num(s['cpu_us'], 1)} us each")

    results = _per_workers(ctx, starters, [""], measure, describe, lambda t, _v: loads.wrk(
        t.tcp_port, 1, threads=1, connections=8, script=script))
    ctx.results["sni"] = results
    return _sni_section(ctx, results, names)


def _sni_section(ctx: Context, results: Results, names: dict[int, str]) -> Section:
    table = Table("SNI-routed connections per second (dynproxy), 10 vs 10,000 rules",
                  ["rules", "workers", "conn/s", "min-max", "p50 ms", "p99 ms", "errors",
                   "CPU us/conn", "x 10 rules"])
    section = Section("sni", "SNI routing with many rules", [table])
    small, big = names[RULE_COUNTS[0]], names[RULE_COUNTS[-1]]
    for workers in ctx.workers:
        for count, name in names.items():
            s = results.series(name, workers)
            p50, p99 = s.median("p50"), s.median("p99")
            table.rows.append([f"{count:,}", str(workers), num(s.median("rate")),
                               span(s.span("rate")), num(p50 / 1e3 if p50 else None, 2),
                               num(p99 / 1e3 if p99 else None, 2),
                               num(sum(s.values("errors"))), num(s.median("cpu_us"), 1),
                               ratio(results.ratio(name, small, workers, "rate"))])
        section.summary[f"SNI-routed conn/s, x{workers}: 10,000 rules / 10 rules"] = \
            ratio(results.ratio(big, small, workers, "rate"))
    table.notes.append(f"each connection sends a real TLS ClientHello for "
                       f"{UNMATCHED_SNI!r}, which no rule but `default` matches (the worst "
                       "case for a router that scans), through wrk with a Lua script; "
                       "the backend answers and closes. Rules: tools/bench_router.py's mix.")
    return section
