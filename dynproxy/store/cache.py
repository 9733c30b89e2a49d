"""A bounded cache with a time to live, for lookups that must not wait on Redis twice.

Holds positive and negative answers alike (the caller decides what a value means).
An expired entry is still returned as stale, so a caller whose source is down can
keep serving the last answer it had. At most `max_entries` are kept; the least
recently stored goes first. Keys come from traffic (SNI), hence the bound.

Pure: no clock of its own (callers pass `now`), no I/O, not thread-safe (one
greenlet at a time, no yields inside).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

__all__ = ["MISSING", "TtlCache"]

MISSING = object()


class TtlCache:
    __slots__ = ("ttl", "max_entries", "_entries")

    def __init__(self, ttl: float, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"cache max_entries must be >= 1, got {max_entries!r}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, now: float) -> tuple[Any, bool]:
        """(value, fresh): MISSING when absent; fresh False when older than the TTL."""
        entry = self._entries.get(key)
        if entry is None:
            return MISSING, False
        return entry[1], now < entry[0]

    def put(self, key: Any, value: Any, now: float) -> None:
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (now + self.ttl, value)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def invalidate(self, keys: Iterable[Any] | None = None) -> None:
        """Forget `keys` (None: everything), so the next lookup asks the source again."""
        if keys is None:
            self._entries.clear()
            return
        for key in keys:
            self._entries.pop(key, None)
