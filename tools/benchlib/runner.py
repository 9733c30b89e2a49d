"""How figures are taken: targets started per worker count, measured in rounds (every
target once per round, so load from elsewhere on the machine falls on all alike), and
the samples kept per (target, workers, variant) for medians and min-max.

A target that fails to start or to be measured is reported and left out of that
figure; the rest of the run goes on. Targets started here are stopped here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchlib import proxies
from benchlib.backends import Backends
from benchlib.procs import BenchError
from benchlib.proxies import Target, Upstream

FAILURES = (BenchError, RuntimeError, OSError)


@dataclass
class Context:
    """What every workload needs: settings, the work directory, the backends."""

    work: Path
    backends: Backends
    nofile: int
    workers: list[int]
    repeat: int
    seconds: float
    idle_conns: int
    notes: dict[str, str] = field(default_factory=dict)  # "dynproxy N=2" -> processes seen
    results: dict[str, Results] = field(default_factory=dict)  # workload key -> figures


@dataclass
class Series:
    """The samples of one figure: one target, one worker count, one variant."""

    samples: list[dict[str, float]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [s[key] for s in self.samples if s.get(key) is not None]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None

    def span(self, key: str) -> tuple[float, float] | None:
        values = self.values(key)
        return (min(values), max(values)) if values else None


class Results:
    """Series by (target, workers, variant); a missing one is an empty Series."""

    def __init__(self) -> None:
        self._series: dict[tuple, Series] = {}

    def series(self, target: str, workers: int | None, variant: str = "") -> Series:
        return self._series.setdefault((target, workers, variant), Series())

    def median(self, target: str, workers: int | None, key: str,
               variant: str = "") -> float | None:
        return self.series(target, workers, variant).median(key)

    def ratio(self, target: str, ref: str, workers: int | None, key: str,
              variant: str = "") -> float | None:
        """median(target) / median(ref), both at `workers` (direct has no workers)."""
        top = self.median(target, None if target == "direct" else workers, key, variant)
        bottom = self.median(ref, None if ref == "direct" else workers, key, variant)
        return top / bottom if top is not None and bottom else None


# --- starting targets ----------------------------------------------------------------


def start(ctx: Context, name: str, workers: int, upstream: Upstream) -> Target:
    """Start target `name` ('direct', 'haproxy', 'haproxy-splice', 'nginx', 'dynproxy')."""
    if name == "direct":
        return proxies.direct(upstream)
    if name in ("haproxy", "haproxy-splice"):
        return proxies.start_haproxy(ctx.work, workers, upstream, ctx.nofile,
                                     splice=name == "haproxy-splice")
    if name == "nginx":
        return proxies.start_nginx(ctx.work, workers, upstream, ctx.nofile)
    if name == "dynproxy":
        return proxies.start_dynproxy(ctx.work, workers, upstream)
    raise ValueError(f"unknown target {name!r}")


def start_all(ctx: Context, starters: dict[str, Callable[[], Target]]) -> list[Target]:
    """Call each starter; a failure is printed and that target left out."""
    targets = []
    for name, starter in starters.items():
        target = _start_with_retry(name, starter)
        if target is None:
            continue
        targets.append(target)
        if target.note and target.name.startswith("dynproxy"):
            ctx.notes[f"{target.name} --workers {target.workers}"] = target.note
    return targets


def _start_with_retry(name: str, starter: Callable[[], Target]) -> Target | None:
    """Start, trying once more on failure: a free port picked for a config can be
    taken by another program on the machine before the proxy binds it."""
    for tries_left in (1, 0):
        try:
            return starter()
        except FAILURES as exc:
            print(f"  {name}: could not start{', trying again' if tries_left else ''}: "
                  f"{exc}", flush=True)
    return None


def stop_all(targets: list[Target]) -> None:
    for target in reversed(targets):
        target.stop()


def plain_starters(ctx: Context, names: list[str], workers: int,
                   upstream: Upstream) -> dict[str, Callable[[], Target]]:
    return {name: (lambda n=name: start(ctx, n, workers, upstream)) for name in names}


# --- rounds --------------------------------------------------------------------------

Measure = Callable[[Target, str], dict[str, float]]


def rounds(ctx: Context, targets: list[Target], variants: list[str], measure: Measure,
           results: Results, describe: Callable[[dict], str],
           warmup: Callable[[Target, str], object] | None = None,
           repeat: int | None = None) -> None:
    """`repeat` (ctx.repeat) rounds; in each, every variant of every target once."""
    for target in targets:
        for variant in variants:
            if warmup is not None:
                attempt(target, variant, warmup)
    for i in range(ctx.repeat if repeat is None else repeat):
        for variant in variants:
            for target in targets:
                sample = attempt(target, variant, measure)
                if sample is None:
                    continue
                results.series(target.name, target.workers, variant).samples.append(sample)
                print(f"  run {i + 1} {label(target, variant)}: {describe(sample)}",
                      flush=True)


def attempt(target: Target, variant: str, fn):
    try:
        out = fn(target, variant)
        target.check_alive()
        return out
    except FAILURES as exc:
        print(f"  {label(target, variant)}: FAILED: {exc}", flush=True)
        return None


def label(target: Target, variant: str) -> str:
    workers = "" if target.workers is None else f" x{target.workers}"
    return f"{target.name}{workers}{' ' + variant if variant else ''}".ljust(34)


def measured_cpu(target: Target, fn: Callable[[], object]) -> tuple[object, float]:
    """(what fn returns, the CPU seconds the target's processes used meanwhile)."""
    out, cpu, _ = measured(target, fn)
    return out, cpu


def measured(target: Target, fn: Callable[[], object]) -> tuple[object, float, float | None]:
    """measured_cpu, plus how busy the whole machine was meanwhile (0-1, all CPUs:
    proxy, load generator, backend and anything else), to tell a proxy that has CPU
    left from a machine that has none."""
    machine = _machine_ticks()
    before = target.cpu()
    out = fn()
    cpu = target.cpu() - before
    after = _machine_ticks()
    busy = None
    if machine is not None and after is not None and after[0] > machine[0]:
        busy = 1 - (after[1] - machine[1]) / (after[0] - machine[0])
    return out, cpu, busy


def _machine_ticks() -> tuple[int, int] | None:
    """(all ticks, idle ticks) of every CPU since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle  # guest time is already in user
