"""The built-in routing plugin `redis_sni`: the backend for a host name is in Redis.

`sni suffix ".apps.example.com" -> plugin(redis_sni)` looks the connection's SNI up as
`<prefix>backends:<sni>` (the original system's per-host routing), so a hosting
platform maps thousands of host names to backends without a rule per host.

It runs in every worker, in the connection's greenlet, under routing's deadline.
Answers (positive and negative) are cached for `redis.cache_ttl_secs` in a bounded
cache; concurrent misses for one name share one Redis read; changes announced through
the master's event feed (`dynproxy backends ...`, keyspace notifications) drop the
cached entries at once. While Redis is down, stale answers keep serving, and Redis is
not asked again for a second after a failure, so connections never queue behind it.

No opinion (None, so the next rule decides) when there is no SNI, no key, an invalid
value, `healthy: false` or weight 0. A found backend is added to the worker's
topology on the fly (at most MAX_MEMBERS per topology, oldest dropped first) so that
it gets the usual balancing, passive health and active-connection accounting.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict

from gevent.event import AsyncResult

from dynproxy.core.decision import BackendSpec, Decision, Target
from dynproxy.core.topology import Member
from dynproxy.obs.log import log_once_per, log_transition
from dynproxy.store.cache import MISSING, TtlCache
from dynproxy.store.client import REDIS_ERRORS, backend_key, make_client
from dynproxy.store.records import BackendRecord, Skipped, parse_record

__all__ = ["RedisSni", "invalidate_sni_caches"]

log = logging.getLogger("dynproxy.redis_sni")
MAX_MEMBERS = 10_000
MAX_CACHE_ENTRIES = 100_000
PAUSE_AFTER_ERROR = 1.0  # seconds without asking Redis after a failed read

_LIVE: weakref.WeakSet = weakref.WeakSet()


def invalidate_sni_caches(names: list[str] | None) -> None:
    """Drop cached answers for `names` (None: all) in every redis_sni of this process."""
    for plugin in list(_LIVE):
        plugin.invalidate(names)


class RedisSni:
    """The plugin object: `route(context)` -> a forward Decision or None."""

    name = "redis_sni"

    def __init__(self, settings, *, client=None, clock=time.monotonic,
                 max_entries: int = MAX_CACHE_ENTRIES, max_members: int = MAX_MEMBERS):
        self.settings = settings
        self.prefix = settings.key_prefix
        self.max_members = max_members
        self._client = client
        self._clock = clock
        self._cache = TtlCache(settings.cache_ttl_secs, max_entries)
        self._inflight: dict[str, AsyncResult] = {}
        self._pause_until = 0.0
        self._added: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        _LIVE.add(self)

    def invalidate(self, names: list[str] | None) -> None:
        self._cache.invalidate(names)

    def route(self, context) -> Decision | None:
        sni = context.conn.sni
        if not sni:
            return None
        topology = context.snapshot.topology
        entry = self._lookup(sni)
        if entry is None:
            self._forget(topology, sni)
            return None
        record, decision = entry
        return decision if self._ensure_member(topology, record) else None

    # looking up -----------------------------------------------------------------------
    def _lookup(self, sni: str):
        """(record, decision) for a routable backend, else None."""
        now = self._clock()
        value, fresh = self._cache.get(sni, now)
        if fresh or now < self._pause_until:
            return None if value is MISSING else value
        waiting = self._inflight.get(sni)
        if waiting is not None:
            return waiting.get()
        result = self._inflight[sni] = AsyncResult()
        answer = None if value is MISSING else value  # stale, if Redis fails
        try:
            answer = self._read(sni)
            self._cache.put(sni, answer, now)
        except REDIS_ERRORS as exc:
            self._pause_until = self._clock() + PAUSE_AFTER_ERROR
            log_transition("redis_sni", "down", "redis_sni cannot read Redis (%r); serving "
                           "cached answers", exc, level=logging.WARNING, logger=log)
        finally:
            del self._inflight[sni]
            result.set(answer)
        return answer

    def _read(self, sni: str):
        if self._client is None:
            self._client = make_client(self.settings, retries=0)
        raw = self._client.get(backend_key(self.prefix, sni))
        log_transition("redis_sni", "up", "redis_sni reads Redis", logger=log)
        if raw is None:
            return None
        record = parse_record(sni, raw)
        if isinstance(record, Skipped):
            log_once_per(f"redis_sni-skip-{record.reason}", 60.0, "redis_sni skips %s: %s",
                         backend_key(self.prefix, sni), record.message, logger=log)
            return None
        if not record.healthy or record.weight <= 0:
            return None
        return record, Decision("forward", (Target(record.name, record.weight),))

    # the worker's topology ------------------------------------------------------------------
    def _ensure_member(self, topology, record: BackendRecord) -> bool:
        existing = topology.backends.get(record.name) or topology.members.get(record.name)
        if existing is not None and existing.spec.source != "redis":
            log_once_per(f"redis_sni-conflict-{record.name}", 60.0, "redis_sni: %r is a "
                         "backend of the rules; not routing it from Redis", record.name,
                         logger=log)
            return False
        if existing is not None and existing.spec.address == record.address:
            existing.weight = record.weight
            topology.backends[record.name] = existing
            return True
        self._add(topology, record)
        return True

    def _add(self, topology, record: BackendRecord) -> None:
        spec = BackendSpec(record.name, record.host, record.port, record.weight,
                           source="redis")
        member = Member(spec, record.weight)
        topology.backends[record.name] = topology.members[record.name] = member
        added = self._added.setdefault(topology, OrderedDict())
        added[record.name] = None
        while len(added) > self.max_members:
            oldest, _ = added.popitem(last=False)
            self._drop(topology, oldest)

    def _forget(self, topology, name: str) -> None:
        added = self._added.get(topology)
        if added is not None and added.pop(name, MISSING) is not MISSING:
            self._drop(topology, name)

    @staticmethod
    def _drop(topology, name: str) -> None:
        member = topology.backends.pop(name, None)
        if member is not None and topology.members.get(name) is member and not any(
                member in pool.members for pool in topology.pools.values()):
            del topology.members[name]
