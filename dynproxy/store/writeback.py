"""Health write-back: put the proxy's view of a Redis backend into its key.

Only two fields are ever written, `healthy` and `last_check`, through the
compare-and-set patch of store.client, so an operator's concurrent edit of any other
field (weight, address, metadata) is never overwritten, and the key's TTL is kept. A
deleted key is never recreated. `last_check` only moves forward, so several proxy
instances writing the same key leave the most recent check time; `healthy` is the
state of the instance whose health last flipped (docs/redis.md).

Writes are queued and coalesced per backend and done by one greenlet, so a slow or
absent Redis never delays a probe. A write that fails is dropped: the next transition
or periodic update writes again.
"""

from __future__ import annotations

import logging
from typing import Any

from gevent.event import Event

from dynproxy.obs.log import log_once_per
from dynproxy.store.client import REDIS_ERRORS, StoreError, backend_key, patch_backend
from dynproxy.store.records import RecordError

__all__ = ["HealthWriter", "patch_health"]

log = logging.getLogger("dynproxy.redis")


class HealthWriter:
    """Queue of pending write-backs (latest per backend wins) and the greenlet doing them."""

    def __init__(self, client, prefix: str):
        self.client = client
        self.prefix = prefix
        self.written = 0  # successful writes, for tests and debugging
        self._pending: dict[str, tuple[bool | None, int]] = {}
        self._wake = Event()

    def submit(self, name: str, healthy: bool | None, last_check: float) -> None:
        """Ask for `healthy` (None: leave it) and `last_check` to be written soon."""
        previous = self._pending.get(name)
        if healthy is None and previous is not None:
            healthy = previous[0]
        self._pending[name] = (healthy, int(last_check))
        self._wake.set()

    def run(self) -> None:
        """Greenlet body: write whatever is pending, forever."""
        while True:
            self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            for name, (healthy, last_check) in batch.items():
                self._write(name, healthy, last_check)

    def _write(self, name: str, healthy: bool | None, last_check: int) -> None:
        key = backend_key(self.prefix, name)
        try:
            if patch_backend(self.client, key, lambda f: patch_health(f, healthy, last_check)):
                self.written += 1
        except (RecordError, StoreError) as err:
            log_once_per(f"writeback-{name}", 60.0, "health of %s not written to Redis: %s",
                         key, err, level=logging.INFO, logger=log)
        except REDIS_ERRORS as err:  # the watcher logs Redis going down; say it once here
            log_once_per("writeback-redis", 60.0, "health write-backs to Redis failing: %r",
                         err, level=logging.INFO, logger=log)


def patch_health(fields: dict[str, Any], healthy: bool | None,
                 last_check: int) -> dict[str, Any]:
    """The stored fields with the health fields updated (last_check never goes back)."""
    if healthy is not None:
        fields["healthy"] = healthy
    old = fields.get("last_check")
    if not (type(old) in (int, float) and old > last_check):
        fields["last_check"] = last_check
    return fields
