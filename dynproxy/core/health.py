"""Health hysteresis: when a backend's string of check results flips it up or down.

A member goes down after ``fall`` consecutive failures and comes back after ``rise``
consecutive successes, so one lost probe does not flap it: that is ``record``, fed by
the active checks. Live traffic keeps its own count (``record_passive``): a member goes
down after ``passive_fall`` consecutive failures seen by live traffic (a refused
connect; 0: never), a live success resets that count, and neither count moves the
other, so the active checks' rise/fall mean what they say whatever traffic does.

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

    ``consecutive`` counts the check results in a row that contradicted the current
    state: progress towards a flip. Any result that agrees with the state resets it to
    0, and so does a flip. ``passive_failures`` counts live-traffic failures in a row
    while up (see ``record_passive``); a flip resets it too.
    """

    __slots__ = ("rise", "fall", "_up", "_reason", "_consecutive", "_passive")

    def __init__(self, rise: int = 2, fall: int = 3, initially_up: bool = True) -> None:
        for name, value in (("rise", rise), ("fall", fall)):
            if type(value) is not int or value < 1:
                raise ValueError(f"health {name} must be an int >= 1, got {value!r}")
        self.rise = rise
        self.fall = fall
        self._up = initially_up
        self._reason = "initial state"
        self._consecutive = 0
        self._passive = 0

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

    @property
    def passive_failures(self) -> int:
        return self._passive

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
        return self._flip(ok, reason or self._count_reason(ok, self._consecutive))

    def record_passive(self, ok: bool, passive_fall: int, reason: str = "",
                       may_rise: bool = True) -> Transition | None:
        """Count one result seen by live traffic; a Transition only when it flips.

        A failure while up adds to ``passive_failures`` and marks the member down when
        that reaches ``passive_fall`` (0: never: live traffic only reports). A success
        resets the count, and brings a down member back up at once when ``may_rise``
        (nothing but traffic watches it); otherwise the active checks decide when it is
        up again. Failures while down count nothing. Never touches ``consecutive``.
        """
        if ok:
            self._passive = 0
            if self._up or not may_rise:
                return None
            return self._flip(True, reason or "a success in live traffic")
        if not self._up:
            return None
        self._passive += 1
        if not passive_fall or self._passive < passive_fall:
            return None
        count = self._passive
        return self._flip(False, f"{count} consecutive failure{'s' if count > 1 else ''} "
                                 f"in live traffic" + (f", the last: {reason}" if reason else ""))

    def _flip(self, up: bool, reason: str) -> Transition:
        self._up = bool(up)
        self._reason = reason
        self._consecutive = self._passive = 0
        return Transition(self._up, reason)

    @staticmethod
    def _count_reason(ok: bool, count: int) -> str:
        return f"{count} consecutive {'successful' if ok else 'failed'} checks"

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        passive = f", passive_failures={self._passive}" if self._passive else ""
        return (f"HealthState({state}, rise={self.rise}, fall={self.fall}, "
                f"consecutive={self._consecutive}{passive}, reason={self._reason!r})")


def jittered_interval(interval_s: float, rng=random) -> float:
    """``interval_s`` moved by up to +-10%, so checks of many members spread out instead
    of firing in lockstep. ``rng`` is anything with ``random()`` (a ``random.Random``)."""
    if not interval_s > 0:
        raise ValueError(f"health check interval must be > 0 seconds, got {interval_s!r}")
    return interval_s * (0.9 + 0.2 * rng.random())
