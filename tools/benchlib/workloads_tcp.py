"""The TCP workloads: (a) bulk throughput with iperf3, (b) short connections and (c)
keep-alive requests with wrk against nginx's 100-byte body, with the unloaded latency
of one connection, and (f) the proxies' CPU time per GB / connection / request drawn
from the same runs.

Each workload returns a report Section and keeps its Results in ctx.results.
"""

from __future__ import annotations

import os

from benchlib import loads
from benchlib.proxies import Target, Upstream
from benchlib.report import Bar, Section, Table, num, ratio, span, workers_cell
from benchlib.runner import (
    Context,
    Results,
    measured,
    measured_cpu,
    plain_starters,
    rounds,
    start_all,
    stop_all,
)

PROXIES = ["haproxy", "nginx", "dynproxy"]
# The load generator shares the machine's cores with the proxy (as the targets
# assume); one wrk thread per core, 64 connections: enough to saturate one proxy core.
WRK_THREADS = min(2, os.cpu_count() or 1)
WRK_CONNECTIONS = 64


def _run_targets(ctx: Context, names: list[str], upstream: Upstream, variants: list[str],
                 measure, describe, warmup=None) -> Results:
    results = Results()
    for workers in ctx.workers:
        print(f"-- {workers} worker(s)/thread(s)", flush=True)
        targets = start_all(ctx, plain_starters(ctx, names, workers, upstream))
        try:
            rounds(ctx, targets, variants, measure, results, describe, warmup)
        finally:
            stop_all(targets)
    return results


# --- (a) bulk ------------------------------------------------------------------------

BULK = ["direct", "haproxy", "haproxy-splice", "nginx", "dynproxy"]
STREAMS = {"1 stream": 1, "4 streams": 4}


def bulk(ctx: Context) -> Section:
    upstream = Upstream(ctx.backends.port("iperf3"))

    def measure(target: Target, variant: str) -> dict:
        (bps, nbytes), cpu = measured_cpu(target, lambda: loads.iperf3(
            target.tcp_port, ctx.seconds, STREAMS[variant]))
        per_gb = cpu / (nbytes / 1e9) if target.proc and nbytes else None
        return {"gbps": bps / 1e9, "cpu_per_gb": per_gb}

    def warmup(target: Target, variant: str) -> None:
        if variant == "1 stream":
            loads.iperf3(target.tcp_port, 1, 1)

    def describe(s: dict) -> str:
        return f"{s['gbps']:6.2f} Gbit/s  CPU {num(s['cpu_per_gb'], 2)} s/GB"

    results = _run_targets(ctx, BULK, upstream, list(STREAMS), measure, describe, warmup)
    ctx.results["a"] = results
    return _bulk_section(ctx, results)


def _bulk_section(ctx: Context, results: Results) -> Section:
    table = Table("Bulk throughput (iperf3, client to server)",
                  ["target", "workers", "streams", "Gbit/s", "min-max", "proxy CPU s/GB",
                   "x HAProxy", "x HAProxy-splice", "x direct"])
    section = Section("a", "Bulk throughput", [table])
    for workers in ctx.workers:
        for variant in STREAMS:
            names = BULK if workers == ctx.workers[0] else BULK[1:]  # direct: one block
            for name in names:
                _bulk_row(table, section, results, name, workers, variant)
    table.notes.append(f"iperf3 -t {ctx.seconds:g}, -P 1 and -P 4; HAProxy-splice has "
                       "`option splice-request` and `option splice-response`.")
    return section


def _bulk_row(table: Table, section: Section, results: Results, name: str, workers: int,
              variant: str) -> None:
    shown = None if name == "direct" else workers
    series = results.series(name, shown, variant)
    vs = {ref: results.ratio(name, ref, workers, "gbps", variant)
          for ref in ("haproxy", "haproxy-splice", "direct")}
    table.rows.append([name, workers_cell(shown), variant, num(series.median("gbps"), 2),
                       span(series.span("gbps"), 2), num(series.median("cpu_per_gb"), 2),
                       ratio(vs["haproxy"]), ratio(vs["haproxy-splice"]),
                       ratio(vs["direct"])])
    if name not in ("direct", "haproxy") and vs["haproxy"] is not None:
        section.bars.append(Bar(f"bulk {variant}", f"{name} x{workers}", vs["haproxy"]))
    if name == "dynproxy":
        section.summary[f"bulk {variant}, dynproxy x{workers}: x HAProxy-splice / x direct"] = (
            f"{ratio(vs['haproxy-splice'])} / {ratio(vs['direct'])}")


# --- (b) short connections and (c) keep-alive ------------------------------------------


def _wrk_measure(close: bool, seconds: float):
    def measure(target: Target, variant: str) -> dict:
        single = variant == "1 connection"
        run, cpu, busy = measured(target, lambda: loads.wrk(
            target.tcp_port, seconds, threads=1 if single else WRK_THREADS,
            connections=1 if single else WRK_CONNECTIONS, close=close))
        per = cpu * 1e6 / run.requests if target.proc and run.requests else None
        return {"rate": run.rate, "p50": run.p50_us, "p99": run.p99_us,
                "errors": run.errors, "cpu_us": per, "busy": busy}
    return measure


def _wrk_describe(s: dict) -> str:
    return (f"{s['rate']:9,.0f}/s  p50 {s['p50']:8,.0f} us  p99 {s['p99']:8,.0f} us  "
            f"errors {s['errors']:.0f}  CPU {num(s['cpu_us'], 1)} us each")


def _wrk_warmup(target: Target, variant: str) -> None:
    loads.wrk(target.tcp_port, 1, threads=1, connections=8)


def short(ctx: Context) -> Section:
    upstream = Upstream(ctx.backends.port("http"))
    results = _run_targets(ctx, ["direct", *PROXIES], upstream, ["close"],
                           _wrk_measure(True, ctx.seconds), _wrk_describe, _wrk_warmup)
    ctx.results["b"] = results
    table = _rate_table(ctx, results, "close", "Short connections (wrk, Connection: close)",
                        "conn/s", "CPU us/conn")
    section = Section("b", "Short connections", [table])
    table.notes.append(f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{ctx.seconds:g}s "
                       "--latency -H 'Connection: close': one TCP connection per request.")
    _rate_extras(ctx, results, section, "close", "short conn/s", "short connections")
    return section


def keepalive(ctx: Context) -> Section:
    upstream = Upstream(ctx.backends.port("http"))
    results = _run_targets(ctx, ["direct", *PROXIES], upstream, ["loaded", "1 connection"],
                           _wrk_measure(False, ctx.seconds), _wrk_describe, _wrk_warmup)
    ctx.results["c"] = results
    table = _rate_table(ctx, results, "loaded", "Keep-alive requests (wrk)", "req/s",
                        "CPU us/req")
    table.notes.append(f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{ctx.seconds:g}s "
                       "--latency, HTTP/1.1 keep-alive, 100-byte body.")
    section = Section("c", "Keep-alive requests and unloaded latency",
                      [table, _latency_table(ctx, results)])
    _rate_extras(ctx, results, section, "loaded", "keep-alive req/s", "keep-alive")
    return section


def _rate_table(ctx: Context, results: Results, variant: str, title: str, unit: str,
                cpu_label: str) -> Table:
    table = Table(title, ["target", "workers", unit, "min-max", "p50 ms", "p99 ms",
                          "errors", cpu_label, "machine busy", "x HAProxy", "x direct"])
    for workers in ctx.workers:
        for name in ["direct", *PROXIES] if workers == ctx.workers[0] else PROXIES:
            shown = None if name == "direct" else workers
            s = results.series(name, shown, variant)
            p50, p99 = s.median("p50"), s.median("p99")
            table.rows.append([
                name, workers_cell(shown), num(s.median("rate")), span(s.span("rate")),
                num(p50 / 1e3 if p50 else None, 2), num(p99 / 1e3 if p99 else None, 2),
                num(sum(s.values("errors"))), num(s.median("cpu_us"), 1),
                _percent(s.median("busy")),
                ratio(results.ratio(name, "haproxy", workers, "rate", variant)),
                ratio(results.ratio(name, "direct", workers, "rate", variant))])
    table.notes.append("machine busy: the share of all the machine's CPUs in use during "
                       "the run (proxy, wrk, backend, anything else), from /proc/stat; "
                       "near 100% the machine, not the proxy, sets the rate.")
    return table


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _rate_extras(ctx: Context, results: Results, section: Section, variant: str,
                 group: str, what: str) -> None:
    """Chart bars, and the key figures: ratio to HAProxy, CPU each, scaling."""
    for workers in ctx.workers:
        for name in ("nginx", "dynproxy"):
            vs = results.ratio(name, "haproxy", workers, "rate", variant)
            if vs is not None:
                section.bars.append(Bar(group, f"{name} x{workers}", vs))
        vs = results.ratio("dynproxy", "haproxy", workers, "rate", variant)
        cpu = [results.median(n, workers, "cpu_us", variant) for n in ("dynproxy", "haproxy")]
        key = f"{what}, dynproxy x{workers}: x HAProxy; CPU us each (dynproxy / HAProxy)"
        section.summary[key] = f"{ratio(vs)}; {num(cpu[0], 1)} / {num(cpu[1], 1)}"
    if len(ctx.workers) > 1:
        lo, hi = ctx.workers[0], ctx.workers[-1]
        for name in ("haproxy", "dynproxy"):
            a, b = (results.median(name, w, "rate", variant) for w in (lo, hi))
            section.summary[f"{what}, {name}: {hi} workers / {lo}"] = ratio(
                b / a if a and b else None)


def _latency_table(ctx: Context, results: Results) -> Table:
    table = Table("Unloaded latency, one connection (wrk -t1 -c1, keep-alive)",
                  ["target", "workers", "p50 us", "p99 us", "added p50 us", "added p99 us",
                   "added p50 x HAProxy's"])
    base = {k: results.median("direct", None, k, "1 connection") for k in ("p50", "p99")}
    for workers in ctx.workers:
        added_ha = _added(results, "haproxy", workers, "p50", base)
        for name in ["direct", *PROXIES] if workers == ctx.workers[0] else PROXIES:
            shown = None if name == "direct" else workers
            s = results.series(name, shown, "1 connection")
            added = {k: _added(results, name, workers, k, base) for k in ("p50", "p99")}
            vs = added["p50"] / added_ha if added["p50"] is not None and added_ha else None
            table.rows.append([name, workers_cell(shown), num(s.median("p50")),
                               num(s.median("p99")), num(added["p50"]), num(added["p99"]),
                               ratio(vs) if name != "direct" else "-"])
    table.notes.append("added = the target's median minus direct's median; wrk reports "
                       "latency in steps of 10 us at this scale.")
    return table


def _added(results: Results, name: str, workers: int, key: str, base: dict) -> float | None:
    shown = None if name == "direct" else workers
    value = results.median(name, shown, key, "1 connection")
    return value - base[key] if value is not None and base[key] is not None else None


# --- (f) CPU per unit of work ----------------------------------------------------------


def cpu(ctx: Context) -> Section:
    """Gathered from (a), (b) and (c): run those first."""
    a, b, c = (ctx.results.get(k, Results()) for k in "abc")
    table = Table("Proxy CPU time (user + system, all the proxy's processes)",
                  ["target", "workers", "us/connection (b)", "us/request (c)",
                   "s/GB 1 stream (a)", "s/GB 4 streams (a)", "us/connection x HAProxy's"])
    for workers in ctx.workers:
        for name in ["haproxy", "haproxy-splice", *PROXIES[1:]]:
            per_conn = b.median(name, workers, "cpu_us", "close")
            ha = b.median("haproxy", workers, "cpu_us", "close")
            table.rows.append([
                name, str(workers), num(per_conn, 1),
                num(c.median(name, workers, "cpu_us", "loaded"), 1),
                num(a.median(name, workers, "cpu_per_gb", "1 stream"), 2),
                num(a.median(name, workers, "cpu_per_gb", "4 streams"), 2),
                ratio(per_conn / ha if per_conn and ha else None)])
    table.notes.append("read from /proc/PID/stat (utime + stime) of the proxy's process "
                       "tree before and after each run; the load generator is not counted.")
    return Section("f", "CPU time per connection, request and GB", [table])
