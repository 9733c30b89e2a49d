"""Hot-path metric updates kept as plain numbers and pushed to prometheus-client in one go.

In prometheus-client's multiprocess mode every `inc` takes a lock, reads the pid and
writes an mmap (about 1 us; a histogram `observe` 2 us): ~10 us per proxied connection.
The TCP connection path updates cells of a `Batch` instead (an add and a flag test),
and the batch pushes them at most ten times a second (at the end of the loop iteration
when it has been quiet), so a scrape lags the traffic by at most 0.1 s. Cells are made
once per label set, never per connection.

Some values grow with no event to count them at: the bytes an open connection moves
(counted per read, they would cost the hot path). A `Sampler` reads such values once a
second (SAMPLE_INTERVAL) while there are any and adds what grew to cells, so they reach
a scrape at most about a second late.

Must never: do I/O of its own beyond the children it pushes to, or lose an update (a
cell is queued the first time it changes after a push, and every queued cell is pushed).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Callable

__all__ = ["SAMPLE_INTERVAL", "Batch", "Sampler"]

SAMPLE_INTERVAL = 1.0  # seconds between samples: the most a sampled value lags (+ a push)


class _Cell:
    """A counter's or gauge's pending change, pushed to its child by `Batch.flush`."""

    __slots__ = ("child", "delta", "queued", "batch")

    def __init__(self, child: Any, batch: Batch) -> None:
        self.child, self.batch = child, batch
        self.delta = 0
        self.queued = False

    def inc(self, amount: float = 1) -> None:
        self.delta += amount
        if not self.queued:
            self.queued = True
            self.batch.queue(self)

    def dec(self, amount: float = 1) -> None:
        self.delta -= amount
        if not self.queued:
            self.queued = True
            self.batch.queue(self)

    def push(self) -> None:
        delta, self.delta, self.queued = self.delta, 0, False
        if delta:
            self.child.inc(delta)


class _HistogramCell:
    """A histogram's pending observations: a count per bucket and their sum."""

    __slots__ = ("child", "bounds", "counts", "total", "queued", "batch")

    def __init__(self, child: Any, batch: Batch) -> None:
        self.child, self.batch = child, batch
        # prometheus-client counts an observation in the first bucket whose bound is >= it
        self.bounds = tuple(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.queued = False

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        if not self.queued:
            self.queued = True
            self.batch.queue(self)

    def push(self) -> None:
        counts, buckets = self.counts, self.child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        total, self.total, self.queued = self.total, 0.0, False
        self.child._sum.inc(total)


class Batch:
    """Metric updates made on hot paths, kept as plain numbers until `flush()`.

    `bind(loop)` (a gevent/libev loop: run_callback and timer) defers pushes: the first
    update after a quiet spell is pushed at the end of the current loop iteration,
    later ones at most every `interval` seconds, so a busy process pushes ten times a
    second whatever its connection rate. Unbound, every update is pushed at once.
    Hooks added with `after_flush` run after each push, in order: whatever they publish
    (the access-log lines) is never seen before the metrics it implies.
    """

    __slots__ = ("_dirty", "_loop", "_scheduled", "_hooks", "_cells", "_last", "_timer",
                 "interval")
    MAX_CELLS = 10000  # cells made by `cell()`; past it the cache starts over
    INTERVAL = 0.1  # seconds between pushes while busy: the most a scrape can lag

    def __init__(self) -> None:
        self._dirty: list = []
        self._loop: Any = None
        self._scheduled = False
        self._hooks: list[Callable[[], None]] = []
        self._cells: dict[tuple, Any] = {}
        self._last = float("-inf")
        self._timer: Any = None
        self.interval = self.INTERVAL

    def bind(self, loop: Any) -> None:
        """Defer pushes to `loop` (None: push every update at once)."""
        self._loop = loop

    def after_flush(self, hook: Callable[[], None]) -> None:
        if hook not in self._hooks:
            self._hooks.append(hook)

    def counter(self, child: Any) -> _Cell:
        """A cell for a counter's or a gauge's child (`inc`, `dec`)."""
        return _Cell(child, self)

    def histogram(self, child: Any) -> _HistogramCell:
        """A cell for a histogram's child (`observe`)."""
        return _HistogramCell(child, self)

    def cell(self, family: Any, *labels: str) -> Any:
        """The cell of `family`'s child for `labels` (a counter/gauge or a histogram
        cell, as the child is), made on first use and kept. The cache is bounded: a
        cell dropped from it still pushes what it holds, and a new one takes over."""
        key = (family.name, labels)
        cell = self._cells.get(key)
        if cell is None:
            child = family.labels(*labels)
            cell = self.histogram(child) if hasattr(child, "_buckets") else self.counter(child)
            if len(self._cells) >= self.MAX_CELLS:
                self._cells.clear()
            self._cells[key] = cell
        return cell

    def queue(self, cell: Any) -> None:
        self._dirty.append(cell)
        self.touch()

    def touch(self) -> None:
        """Make sure a flush comes (for hooks holding work of their own)."""
        if self._scheduled:
            return
        loop = self._loop
        if loop is None:
            return self.flush()
        self._scheduled = True
        wait = self._last + self.interval - time.monotonic()
        if wait <= 0:
            loop.run_callback(self.flush)
        else:
            self._timer = timer = loop.timer(wait)
            timer.start(self.flush)

    def flush(self) -> None:
        """Push every pending update now, then run the hooks (also at stop)."""
        self._scheduled = False
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        self._last = time.monotonic()
        dirty, self._dirty = self._dirty, []
        for cell in dirty:
            cell.push()
        for hook in self._hooks:
            hook()


class Sampler:
    """Calls `sample()` every `interval` seconds on `loop` (gevent/libev) while awake.

    `sample()` reads values that change without an event of their own and adds their
    growth to cells; it returns False when it has nothing left to watch, and the timer
    then stops until the next `wake()`: an idle process runs no timer. `wake()` is a
    flag test when already awake, cheap enough to call once per connection.
    """

    __slots__ = ("sample", "timer", "awake")

    def __init__(self, loop: Any, sample: Callable[[], bool],
                 interval: float = SAMPLE_INTERVAL) -> None:
        self.sample = sample
        self.timer = loop.timer(interval, interval)
        self.awake = False

    def wake(self) -> None:
        if not self.awake:
            self.awake = True
            self.timer.start(self._tick)

    def stop(self) -> None:
        self.awake = False
        self.timer.stop()

    def _tick(self) -> None:
        if not self.sample():
            self.stop()
