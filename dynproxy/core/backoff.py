"""Exponential backoff with jitter: how long to wait before the next retry.

A tiny strategy object in the style of redis-py's ``redis/backoff.py``: configured
once, then ``compute(failures)`` gives the delay. It keeps no state, so one instance
can serve every reconnect loop (Redis watcher, upstream retries).

Must never sleep or do I/O: callers sleep for what this returns. Randomness comes from
the ``rng`` argument so tests can pin it.
"""

from __future__ import annotations

import math
import random

__all__ = ["ExponentialBackoff"]

_JITTERS = ("full", "equal", "none")


class ExponentialBackoff:
    """Delay ceiling ``min(cap, base * 2 ** (failures - 1))``: ``base`` after the first
    failure, doubling after each further one, never above ``cap``.

    ``jitter="full"`` waits uniformly in [0, ceiling) (AWS's "full jitter", the best
    at spreading reconnect storms); ``"equal"`` waits in [ceiling/2, ceiling), never
    retrying almost at once; ``"none"`` waits exactly the ceiling.
    """

    __slots__ = ("base", "cap", "jitter", "_capped_from")

    def __init__(self, base: float, cap: float, jitter: str = "full") -> None:
        if not base > 0:
            raise ValueError(f"backoff base must be > 0 seconds, got {base!r}")
        if not cap >= base or math.isinf(cap):
            raise ValueError(f"backoff cap must be finite and >= base ({base!r}), got {cap!r}")
        if jitter not in _JITTERS:
            raise ValueError(f"backoff jitter must be 'full', 'equal' or 'none', got {jitter!r}")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        # from this many failures on the ceiling is the cap; also keeps 2 ** n small
        self._capped_from = 1 + max(0, math.ceil(math.log2(cap / base)))

    def __repr__(self) -> str:
        return f"ExponentialBackoff(base={self.base!r}, cap={self.cap!r}, jitter={self.jitter!r})"

    def ceiling(self, failures: int) -> float:
        """The longest delay after ``failures`` failures in a row (0 for none)."""
        if failures < 0:
            raise ValueError(f"backoff failures must be >= 0, got {failures!r}")
        if failures == 0:
            return 0.0
        if failures >= self._capped_from:
            return self.cap
        return min(self.cap, self.base * 2 ** (failures - 1))

    def compute(self, failures: int, rng=random) -> float:
        """Seconds to wait after ``failures`` failures in a row. ``rng`` is anything with
        ``random()``, such as a ``random.Random``."""
        ceiling = self.ceiling(failures)
        if self.jitter == "full":
            return ceiling * rng.random()
        if self.jitter == "equal":
            return ceiling / 2 * (1 + rng.random())
        return ceiling
