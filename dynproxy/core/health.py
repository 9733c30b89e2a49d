"""Health hysteresis: when a backend's string of check results flips it up or down.

A member goes down after ``fall`` consecutive failures and comes back after ``rise``
consecutive successes, so one lost probe does not flap it. Active probes and passive
failures seen on live traffic (a refused connect) feed the same ``record``.

Must never do I/O, sleep or read the clock: the prober owns timing, this owns only the
counting. ``jittered_interval`` takes its random source as an argument for the same
reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["HealthState", "Transition", "jittered_interval"]


@dataclass(frozen=True, slots=True)
class Transition:
    """The state flipped: ``up`` is the new state, ``reason`` why (for logs and Redis)."""

    up: bool
    reason: str


class HealthState:
    """Up/down state of one backend with rise/fall hysteresis (HAProxy's semantics).

    ``consecutive`` counts the results in a row that contradicted the current state:
    progress towards a flip. Any result that agrees with the state resets it to 0, and
    so does a flip.
    """

    __slots__ = ("rise", "fall", "_up", "_reason", "_consecutive")

    def __init__(self, rise: int = 2, fall: int = 3, initially_up: bool = True) -> None:
        for name, value in (("rise", rise), ("fall", fall)):
            if type(value) is not int or value < 1:
                raise ValueError(f"health {name} must be an int >= 1, got {value!r}")
        self.rise = rise
        self.fall = fall
        self._up = initially_up
        self._reason = "initial state"
        self._consecutive = 0

    @property
    def up(self) -> bool:
        return self._up

    @property
    def reason(self) -> str:
        """Why the state is what it is: the reason given with the result that flipped it."""
        return self._reason

    @property
    def consecutive(self) -> int:
        return self._consecutive

    def record(self, ok: bool, reason: str = "") -> Transition | None:
        """Count one check result; a Transition only when this result flips the state.

        ``reason`` describes the result (``"connect refused"``); when it is empty the
        transition's reason says how many results in a row caused it.
        """
        ok = bool(ok)
        if ok == self._up:
            self._consecutive = 0
            return None
        self._consecutive += 1
        if self._consecutive < (self.rise if ok else self.fall):
            return None
        self._up = ok
        self._reason = reason or self._count_reason(ok, self._consecutive)
        self._consecutive = 0
        return Transition(ok, self._reason)

    @staticmethod
    def _count_reason(ok: bool, count: int) -> str:
        return f"{count} consecutive {'successful' if ok else 'failed'} checks"

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return (f"HealthState({state}, rise={self.rise}, fall={self.fall}, "
                f"consecutive={self._consecutive}, reason={self._reason!r})")


def jittered_interval(interval_s: float, rng=random) -> float:
    """``interval_s`` moved by up to +-10%, so checks of many members spread out instead
    of firing in lockstep. ``rng`` is anything with ``random()`` (a ``random.Random``)."""
    if not interval_s > 0:
        raise ValueError(f"health check interval must be > 0 seconds, got {interval_s!r}")
    return interval_s * (0.9 + 0.2 * rng.random())
