"""Issue 7's targets, checked against the figures of this run: one table row per
target and worker count, with the measured value and whether it is met.

Reads Results only; a figure that was not measured gives "-" (not a verdict).
"""

from __future__ import annotations

from benchlib.report import Table, num, ratio
from benchlib.runner import Context, Results


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def targets_table(ctx: Context) -> Table | None:
    if not ctx.results:
        return None
    table = Table("Issue 7 targets, this run", ["target", "workers", "measured", "verdict"])
    for workers in ctx.workers:
        for row in _rows(ctx.results, workers):
            table.rows.append([row[0], str(workers), row[1], _verdict(row[2])])
    scaling = _scaling(ctx)
    if scaling:
        table.rows.append(scaling)
    table.rows = [r for r in table.rows if r[2] != "-"] or table.rows
    return table


def _rows(results: dict[str, Results], w: int) -> list[tuple[str, str, bool | None]]:
    rows = []
    a = results.get("a")
    for variant in ("1 stream", "4 streams") if a else ():
        splice = a.ratio("dynproxy", "haproxy-splice", w, "gbps", variant)
        direct = a.ratio("dynproxy", "direct", w, "gbps", variant)
        rows.append((f"bulk {variant} >= 1.0x HAProxy-splice and > 0.7x direct",
                     f"{ratio(splice)}, {ratio(direct)}",
                     None if splice is None or direct is None
                     else splice >= 1.0 and direct > 0.7))
    if b := results.get("b"):
        vs = b.ratio("dynproxy", "haproxy", w, "rate", "close")
        rows.append(("short conn/s >= 0.75x HAProxy", ratio(vs), _at_least(vs, 0.75)))
    if c := results.get("c"):
        rows += _keepalive_rows(c, w)
    if d := results.get("d"):
        vs = d.ratio("dynproxy", "nginx", w, "rate")
        loss = [max(d.series(n, w).values("loss"), default=None) for n in ("dynproxy", "nginx")]
        ok = None if vs is None or None in loss else vs >= 1.0 and loss[0] <= loss[1]
        rows.append(("UDP round trips/s >= 1.0x nginx, no more loss",
                     f"{ratio(vs)}, loss {_pct(loss[0])} vs {_pct(loss[1])}", ok))
    if e := results.get("e"):
        kb = e.median("dynproxy", w, "kb")
        rows.append(("<= 9 KB per idle connection", f"{num(kb, 2)} KB",
                     None if kb is None else kb <= 9.0))
    if s := results.get("sni"):
        vs = s.ratio("dynproxy-10000-rules", "dynproxy-10-rules", w, "rate")
        rows.append(("SNI conn/s, 10,000 rules >= 0.9x 10 rules", ratio(vs), _at_least(vs, 0.9)))
    return rows


def _keepalive_rows(c: Results, w: int) -> list[tuple[str, str, bool | None]]:
    vs = c.ratio("dynproxy", "haproxy", w, "rate", "loaded")
    base = c.median("direct", None, "p50", "1 connection")
    added = {n: (c.median(n, w, "p50", "1 connection") or 0) - base if base else None
             for n in ("dynproxy", "haproxy")}
    lat = added["dynproxy"] / added["haproxy"] if added["haproxy"] else None
    return [("keep-alive req/s >= 0.9x HAProxy", ratio(vs), _at_least(vs, 0.9)),
            ("added p50 latency <= 1.5x HAProxy's",
             f"{num(added['dynproxy'])} us vs {num(added['haproxy'])} us ({ratio(lat)})",
             None if lat is None else lat <= 1.5)]


def _scaling(ctx: Context) -> list[str] | None:
    b = ctx.results.get("b")
    if not b or 1 not in ctx.workers or 2 not in ctx.workers:
        return None
    one, two = (b.median("dynproxy", w, "rate", "close") for w in (1, 2))
    vs = two / one if one and two else None
    busy = b.median("dynproxy", 1, "busy", "close")
    shown = ratio(vs) if busy is None else f"{ratio(vs)} (machine {busy:.0%} busy at 1)"
    return ["short conn/s, 2 workers >= 1.3x 1 worker", "2 vs 1", shown,
            _verdict(_at_least(vs, 1.3))]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3%}"
