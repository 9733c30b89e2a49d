"""The UDP session table of one listener: client address -> session, with idle expiry
and a size cap.

UDP has no connections, so the proxy invents them: the first datagram from a client
address creates a session (typically an upstream socket), later datagrams and replies
``touch`` it, and it ends when idle longer than the timeout or when the table is full
and it is the least recently active one.

Must never do I/O, read the clock or close anything: callers pass ``now`` (a
monotonic clock such as ``time.monotonic()``, never wall time) and close the sessions
this hands back from ``add``, ``expire``, ``remove`` and ``pop_all``.

One idle timeout per table (tables are per listener, and timeouts are per listener).
That keeps activity order identical to expiry order, which is what lets ``expire``
cost only as much as the number of sessions it removes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["SessionTable"]

V = TypeVar("V")


class SessionTable(Generic[V]):
    """Sessions by client address, kept in order of last activity (oldest first)."""

    __slots__ = ("capacity", "idle_timeout", "_last_active", "_values")

    def __init__(self, capacity: int, idle_timeout: float) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"UDP session capacity must be an int >= 1, got {capacity!r}")
        if not idle_timeout > 0:
            raise ValueError(f"UDP session idle timeout must be > 0 seconds, got {idle_timeout!r}")
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._last_active: OrderedDict[Hashable, float] = OrderedDict()
        self._values: dict[Hashable, V] = {}

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, addr: Hashable) -> bool:
        return addr in self._values

    def get(self, addr: Hashable) -> V | None:
        return self._values.get(addr)

    def touch(self, addr: Hashable, now: float) -> bool:
        """Mark activity; False (and no effect) if the session is gone, so a late reply
        cannot bring an expired session back."""
        last_active = self._last_active
        if addr not in last_active:
            return False
        last_active[addr] = now
        last_active.move_to_end(addr)
        return True

    def add(self, addr: Hashable, value: V, now: float) -> tuple[Hashable, V] | None:
        """Start a session. When the table is full, the least recently active session
        makes room and is returned for the caller to close and count."""
        if addr in self._values:
            raise ValueError(
                f"UDP session for {addr!r} already exists; get() it, or remove() it first")
        evicted = None
        if len(self._values) >= self.capacity:
            oldest, _ = self._last_active.popitem(last=False)
            evicted = (oldest, self._values.pop(oldest))
        self._last_active[addr] = now
        self._values[addr] = value
        return evicted

    def expire(self, now: float) -> list[tuple[Hashable, V]]:
        """Remove and return every session idle for longer than ``idle_timeout``."""
        expired = []
        last_active, deadline = self._last_active, now - self.idle_timeout
        while last_active:
            addr, last = next(iter(last_active.items()))
            if last >= deadline:
                break  # every later one was active more recently still
            del last_active[addr]
            expired.append((addr, self._values.pop(addr)))
        return expired

    def next_expiry(self) -> float | None:
        """When the oldest session will be past its timeout, or None when empty: how
        long the expiry loop may sleep."""
        for last in self._last_active.values():
            return last + self.idle_timeout
        return None

    def remove(self, addr: Hashable) -> V | None:
        """End one session (its upstream failed, say); its value, or None if unknown."""
        self._last_active.pop(addr, None)
        return self._values.pop(addr, None)

    def pop_all(self) -> list[tuple[Hashable, V]]:
        """Empty the table (listener shutdown), oldest first."""
        sessions = [(addr, self._values[addr]) for addr in self._last_active]
        self._last_active.clear()
        self._values.clear()
        return sessions
