"""The Redis watcher: a local copy of the backend keys, kept fresh, surviving outages.

One greenlet per proxy instance (in the master) holds a pub/sub connection and
rescans: SCAN (never KEYS) + MGET in batches, on every `rescan_interval` and at once
when a message arrives on the change channel (`dynproxy backends ...` publishes
there) or a keyspace notification does (used when the server has them on, never
relied upon). Plain `redis-cli SET`/`DEL` and TTL expiry are therefore seen within
the rescan interval, CLI changes within milliseconds.

Invalid values are skipped with one log line per key and problem (logged when the
problem appears or changes, not on every rescan) and counted in
`proxy_redis_skipped_keys_total{reason}`. While Redis is down the last good copy is
kept (routing goes on with it); reconnects back off with jitter; `proxy_redis_up` and
one log line mark each transition; the first scan after a reconnect resynchronises.

Never blocks routing: callers get copies through callbacks. Never logs the URL.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Callable, Iterable

import gevent
from gevent.lock import Semaphore

from dynproxy.core.backoff import ExponentialBackoff
from dynproxy.obs.log import log_once_per
from dynproxy.store.client import REDIS_ERRORS, make_client, redacted_url
from dynproxy.store.records import BackendRecord, Skipped, key_glob, parse_record

__all__ = ["RedisWatcher"]

log = logging.getLogger("dynproxy.redis")
SCAN_COUNT = 1000
MGET_BATCH = 500
RECONNECT = ExponentialBackoff(base=0.1, cap=3.0, jitter="full")


class RedisWatcher:
    """Mirrors the backend keys whose names match the wanted patterns.

    Callbacks: `on_records(dict name -> BackendRecord)` after a scan that changed the
    valid records; `on_names(list of names | None)` when a notification names changed
    keys (None: unknown which); `on_state(up)` on each Redis up/down transition.
    """

    def __init__(self, settings, metrics, *, on_records: Callable[[dict], None],
                 on_names: Callable[[list | None], None] = lambda names: None,
                 on_state: Callable[[bool], None] = lambda up: None, client=None):
        self.settings = settings
        self.metrics = metrics
        self.client = client if client is not None else make_client(settings)
        self.prefix = settings.key_prefix
        self.records: dict[str, BackendRecord] = {}
        self.up: bool | None = None  # None until the first attempt
        self._on_records, self._on_names, self._on_state = on_records, on_names, on_state
        self._patterns: tuple[re.Pattern, ...] = ()
        self._reserved: frozenset[str] = frozenset()
        self._raw: dict[str, bytes] = {}
        self._problems: dict[str, tuple[str, str]] = {}
        self._parsed: dict[str, tuple[bytes, BackendRecord | Skipped]] = {}  # by raw value
        self._lock = Semaphore()
        self._dirty = False

    # what to watch -----------------------------------------------------------------------
    def set_filter(self, patterns: Iterable[re.Pattern], reserved: Iterable[str]) -> bool:
        """Watch names matching `patterns`; skip names in `reserved` (owned by the rules).
        Re-judges the values already held; True when a rescan is needed (new patterns)."""
        patterns, reserved = tuple(patterns), frozenset(reserved)
        new_patterns = {p.pattern for p in patterns} != {p.pattern for p in self._patterns}
        self._patterns, self._reserved = patterns, reserved
        if new_patterns:
            self._raw = {n: v for n, v in self._raw.items() if self._wanted(n)}
        self._judge_all()
        return new_patterns

    def _wanted(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._patterns)

    # the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Greenlet body: sessions until killed, backing off between failed ones."""
        failures = 0
        while True:
            try:
                self._session()
            except REDIS_ERRORS as exc:
                failures = 1 if self.up else failures + 1
                self._set_up(False, exc)
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive a bad callback
                failures += 1
                log_once_per("redis-watcher-bug", 60.0, "Redis watcher failed: %r", exc)
            gevent.sleep(RECONNECT.compute(max(failures, 1)))

    def _session(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.settings.channel)
            pubsub.psubscribe(self._keyspace_pattern())
            self.resync()
            self._set_up(True, None)
            self._listen(pubsub)
        finally:
            pubsub.close()

    def _listen(self, pubsub) -> None:
        interval = self.settings.rescan_interval
        next_scan = time.monotonic() + interval
        while True:
            message = pubsub.get_message(timeout=max(0.0, next_scan - time.monotonic()))
            while message is not None:
                self._notified(message)
                message = pubsub.get_message(timeout=0.0)
            if self._dirty or time.monotonic() >= next_scan:
                self.resync()
                next_scan = time.monotonic() + interval

    def _keyspace_pattern(self) -> str:
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        return f"__keyspace@{db}__:{key_glob(self.prefix)}"

    def _notified(self, message: dict) -> None:
        self._dirty = True
        self._on_names(self._names_in(message))

    def _names_in(self, message: dict) -> list[str] | None:
        channel = _text(message.get("channel"))
        if message.get("type") == "pmessage":
            key = channel.split(":", 1)[1] if ":" in channel else ""
            start = self.prefix + "backends:"
            return [key[len(start):]] if key.startswith(start) else None
        try:
            names = json.loads(message.get("data") or b"").get("names")
        except (ValueError, AttributeError):
            return None
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else None

    def _set_up(self, up: bool, exc) -> None:
        """Metric, one log line and a callback per transition (never per attempt)."""
        if self.up == up:
            return
        self.up = up
        self.metrics.redis_up.set(1 if up else 0)
        where = redacted_url(self.settings.url)
        if up:
            log.info("Redis at %s is up; backends resynchronised", where,
                     extra={"state": "up"})
        else:
            log.warning("Redis at %s is down (%s); routing goes on with the last known "
                        "backends", where, _short(exc), extra={"state": "down"})
        self._on_state(up)

    # scanning --------------------------------------------------------------------------------
    def resync(self) -> None:
        """Read every wanted backend key now (raises on Redis errors)."""
        with self._lock:
            self._dirty = False
            self._absorb(self._read_all())

    def _read_all(self) -> dict[str, bytes]:
        start = len(self.prefix) + len("backends:")
        keys, names = [], []
        for key in self.client.scan_iter(match=key_glob(self.prefix), count=SCAN_COUNT):
            name = _decode_name(key[start:])
            if name is not None and self._wanted(name):
                keys.append(key)
                names.append(name)
        values: list = []
        for i in range(0, len(keys), MGET_BATCH):
            values += self.client.mget(keys[i:i + MGET_BATCH])
        return {n: v for n, v in zip(names, values, strict=True) if v is not None}

    def _absorb(self, raw: dict[str, bytes]) -> None:
        gone = [n for n in self._raw if n not in raw]
        fresh = [n for n, v in raw.items() if self._raw.get(n) != v]
        if not gone and not fresh:
            return
        self._raw = raw
        self._judge_all()

    def _judge_all(self) -> None:
        records = {}
        for name, raw in self._raw.items():
            result = self._judge(name, raw)
            if isinstance(result, BackendRecord):
                records[name] = result
        for table in (self._problems, self._parsed):
            for name in [n for n in table if n not in self._raw]:
                del table[name]
        if records != self.records:
            self.records = records
            self._on_records(dict(records))

    def _judge(self, name: str, raw: bytes) -> BackendRecord | Skipped:
        cached = self._parsed.get(name)
        if cached is None or cached[0] != raw:
            cached = self._parsed[name] = (raw, parse_record(name, raw))
        result = cached[1]
        if isinstance(result, BackendRecord) and name in self._reserved:
            result = Skipped(name, "name_conflict", f"backend {name!r} is also declared in "
                             "the rules; rename the Redis key or the rules' backend")
        if isinstance(result, Skipped):
            self._report(name, result)
        elif self._problems.pop(name, None) is not None:
            log.info("Redis key %s is valid again", self.prefix + "backends:" + name)
        return result

    def _report(self, name: str, skipped: Skipped) -> None:
        problem = (skipped.reason, skipped.message)
        if self._problems.get(name) == problem:
            return  # already said: one line per key and problem, not per rescan
        self._problems[name] = problem
        self.metrics.redis_skipped_keys_total.labels(skipped.reason).inc()
        log.warning("skipping Redis key %s: %s", self.prefix + "backends:" + name,
                    skipped.message, extra={"key": self.prefix + "backends:" + name,
                                            "reason": skipped.reason})

    def close(self) -> None:
        self.client.close()


def _decode_name(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        log_once_per("redis-bad-key-name", 60.0, "skipping Redis key with a non-UTF-8 name "
                     "%r", raw[:80])
        return None


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _short(exc) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]
