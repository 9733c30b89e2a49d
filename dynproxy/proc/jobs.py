"""Background jobs of one proxy instance: the Redis watcher, active health checks,
health write-back; and `apply_event`, which brings their results into a Topology.

Jobs run ONCE per instance (in the master, or in the only process), so Redis and the
backends see one watcher and one prober per instance however many workers serve.
They never touch a Topology: they report changes as small JSON-able events through
`publish`. The master forwards events to its workers, and each worker calls
`apply_event(topology, event, metrics)`; in single-process use `attach_jobs` applies
them directly. A worker that starts late asks for `state_events()` (the full state).

Events (dicts, JSON-able):
  {"kind": "members", "pool": "web", "close_removed": false,
   "backends": [{"name": "web-1", "host": "127.0.0.1", "port": 9001, "weight": 100}]}
  {"kind": "health", "member": "web-1", "up": false, "reason": "...", "last_check": 1.7e9}
  {"kind": "redis", "up": true}
  {"kind": "changed", "names": ["a.example.com"]}   (names: null = any)

Passive health (connect failures in live traffic) stays per worker (net.dial).
"""

from __future__ import annotations

import logging
from typing import Callable

from gevent.pool import Group

from dynproxy.core.decision import BackendSpec, PoolSpec
from dynproxy.core.health import HealthState
from dynproxy.net.probes import ProbeLoop, ProbeResult
from dynproxy.obs.log import log_once_per, log_transition
from dynproxy.store.client import REDIS_ERRORS, make_client
from dynproxy.store.records import BackendRecord, redis_glob
from dynproxy.store.redis_sni import invalidate_sni_caches
from dynproxy.store.watcher import RedisWatcher
from dynproxy.store.writeback import HealthWriter

__all__ = ["Jobs", "apply_event", "attach_jobs", "carry_redis_members"]

log = logging.getLogger("dynproxy.jobs")
PUBLISH_EVERY = 5.0  # s: health events re-sent this often even without a flip (last_check)
WRITE_EVERY = 10.0  # s: last_check written back to Redis at most this often without a flip


class _Check:
    """One member's active check: its probe greenlet, hysteresis and publishing clock."""

    __slots__ = ("spec", "health", "pools", "source", "state", "last_check", "greenlet",
                 "published_at", "written_at")

    def __init__(self, spec: BackendSpec, health, pools: list[str], up: bool):
        self.spec, self.health, self.pools = spec, health, pools
        self.source = spec.source
        self.state = HealthState(health.rise, health.fall, initially_up=up)
        if not up:
            self.state.record(False, "marked unhealthy in Redis")  # sets the reason
        self.last_check: float | None = None
        self.greenlet = None
        self.published_at = self.written_at = 0.0

    def same_probe(self, spec: BackendSpec, health) -> bool:
        return (self.spec.address, self.spec.tls, self.health) == (spec.address, spec.tls,
                                                                   health)


class Jobs:
    """The background greenlets of one instance, in one group that `stop` kills."""

    def __init__(self, config, metrics, publish: Callable[[dict], None]):
        self.config = config
        self.metrics = metrics
        self.publish = publish
        self.group = Group()
        self._pools: dict[str, PoolSpec] = {}
        self._patterns: dict[str, tuple] = {}  # pool -> compiled globs
        self._reserved: frozenset[str] = frozenset()
        self._records: dict[str, BackendRecord] = {}
        self._views: dict[str, tuple] = {}  # pool -> last published Redis members
        self._checks: dict[str, _Check] = {}
        self._watcher: RedisWatcher | None = None
        self._writer: HealthWriter | None = None
        self._redis_greenlets: list = []

    # lifecycle ------------------------------------------------------------------------------
    def start(self, snapshot) -> None:
        """Start watching Redis and checking the pools of `snapshot` (or a Serving)."""
        self._adopt(_snapshot(snapshot))
        if self.config.redis.url:
            self._start_redis()
        self._sync_checks()

    def reconfigure(self, snapshot) -> None:
        """After a reload: adjust checks and watched patterns, keep health state, and
        publish the full state (a new topology starts without Redis members)."""
        old_redis = self.config.redis
        self._adopt(_snapshot(snapshot))
        if self.config.redis != old_redis:
            self._stop_redis()
            self._records = {}
            if self.config.redis.url:
                self._start_redis()
        elif self._watcher is not None and self._watcher.set_filter(*self._filter()):
            self.group.spawn(self._resync)
        self._refresh_views(publish=False)
        self._sync_checks()
        for event in self.state_events():
            self.publish(event)

    def stop(self) -> None:
        self.group.kill(block=True, timeout=2)
        self._stop_redis()
        self._checks.clear()

    def state_events(self) -> list[dict]:
        """Everything a worker needs to catch up: Redis state, members, health."""
        events: list[dict] = []
        if self._watcher is not None and self._watcher.up is not None:
            events.append({"kind": "redis", "up": self._watcher.up})
        events += [self._members_event(pool) for pool in self._redis_pools()]
        events += [self._health_event(mid, check) for mid, check in self._checks.items()]
        return events

    def _adopt(self, snap) -> None:
        self.config = snap.config
        self._pools = dict(snap.rules.pools)
        self._patterns = {name: tuple(redis_glob(p) for p in spec.redis_patterns)
                          for name, spec in self._pools.items() if spec.redis_patterns}
        self._reserved = frozenset(snap.rules.backends) | frozenset(
            m.backend.name for spec in self._pools.values() for m in spec.members)

    # Redis ---------------------------------------------------------------------------------
    def _start_redis(self) -> None:
        settings = self.config.redis
        self._watcher = RedisWatcher(settings, self.metrics, on_records=self._on_records,
                                     on_names=self._on_names, on_state=self._on_state)
        self._watcher.set_filter(*self._filter())
        self._writer = HealthWriter(make_client(settings), settings.key_prefix)
        self._resync()  # routing starts with Redis members when Redis answers at once
        self._redis_greenlets = [self.group.spawn(self._watcher.run),
                                 self.group.spawn(self._writer.run)]

    def _stop_redis(self) -> None:
        for greenlet in self._redis_greenlets:
            greenlet.kill(block=True, timeout=2)
        self._redis_greenlets = []
        for part in (self._watcher, self._writer):
            if part is not None:
                part.client.close()
        self._watcher = self._writer = None

    def _filter(self) -> tuple[list, frozenset[str]]:
        return [p for globs in self._patterns.values() for p in globs], self._reserved

    def _resync(self) -> None:
        try:
            self._watcher.resync()
        except REDIS_ERRORS as exc:  # the watcher's loop reports it and retries
            log.debug("initial Redis read failed: %r", exc)

    def _on_records(self, records: dict[str, BackendRecord]) -> None:
        self._records = records
        self._refresh_views(publish=True)
        self._sync_checks()

    def _on_names(self, names: list[str] | None) -> None:
        self.publish({"kind": "changed", "names": names})

    def _on_state(self, up: bool) -> None:
        self.publish({"kind": "redis", "up": up})

    def _redis_pools(self) -> list[str]:
        return list(self._patterns)

    def _pool_view(self, pool: str) -> tuple[BackendRecord, ...]:
        """The pool's Redis members: names matching its globs; in a pool without active
        checks `healthy: false` in Redis keeps a member out (another instance's checks
        or the operator said so); with checks, this instance's own checks decide."""
        globs, checked = self._patterns[pool], self._pools[pool].health is not None
        return tuple(sorted((r for name, r in self._records.items()
                             if (checked or r.healthy) and any(g.fullmatch(name) for g in globs)),
                            key=lambda r: r.name))

    def _refresh_views(self, publish: bool) -> None:
        old, self._views = self._views, {p: self._pool_view(p) for p in self._redis_pools()}
        for pool, view in self._views.items():
            before = old.get(pool)
            if publish and (before is None or _routing(before) != _routing(view)):
                self.publish(self._members_event(pool))

    def _members_event(self, pool: str) -> dict:
        return {"kind": "members", "pool": pool,
                "close_removed": self.config.redis.close_removed,
                "backends": [{"name": r.name, "host": r.host, "port": r.port,
                              "weight": r.weight} for r in self._views.get(pool, ())]}

    # health checks ---------------------------------------------------------------------------
    def _wanted_checks(self) -> dict[str, tuple[BackendSpec, object, list[str], bool]]:
        wanted: dict[str, tuple] = {}
        for name, pool in self._pools.items():
            if pool.health is None:
                continue
            specs = [(m.backend, True) for m in pool.members] + [
                (BackendSpec(r.name, r.host, r.port, r.weight, source="redis"), r.healthy)
                for r in self._views.get(name, ())]
            for spec, up in specs:
                entry = wanted.setdefault(spec.name, (spec, pool.health, [], up))
                entry[2].append(name)
        return wanted

    def _sync_checks(self) -> None:
        wanted = self._wanted_checks()
        for mid in [m for m in self._checks if m not in wanted]:
            self._drop_check(mid)
        for mid, (spec, health, pools, up) in wanted.items():
            check = self._checks.get(mid)
            if check is not None and check.same_probe(spec, health):
                check.pools = pools
                continue
            if check is not None:
                up = check.state.up
                self._drop_check(mid)
            self._add_check(mid, _Check(spec, health, pools, up))

    def _add_check(self, mid: str, check: _Check) -> None:
        self._checks[mid] = check
        self._set_gauges(mid, check)
        if not check.state.up:
            self.publish(self._health_event(mid, check))
        loop = ProbeLoop(check.spec, check.health, lambda result: self._on_result(mid, result))
        check.greenlet = self.group.spawn(loop.run)

    def _drop_check(self, mid: str) -> None:
        check = self._checks.pop(mid)
        if check.greenlet is not None:
            check.greenlet.kill(block=False)
        for pool in check.pools:
            self.metrics.backend_health.remove(pool, mid)

    def _on_result(self, mid: str, result: ProbeResult) -> None:
        check = self._checks.get(mid)
        if check is None:
            return
        flipped = check.state.record(result.ok, result.reason) is not None
        check.last_check = result.at
        if flipped:
            self._set_gauges(mid, check)
            self._log_flip(mid, check)
        if flipped or result.at - check.published_at >= PUBLISH_EVERY:
            check.published_at = result.at
            self.publish(self._health_event(mid, check))
        if check.source == "redis" and self._writer is not None and (
                flipped or result.at - check.written_at >= WRITE_EVERY):
            check.written_at = result.at
            self._writer.submit(mid, check.state.up if flipped else None, result.at)

    def _set_gauges(self, mid: str, check: _Check) -> None:
        for pool in check.pools:
            self.metrics.backend_health.labels(pool, mid).set(1 if check.state.up else 0)

    @staticmethod
    def _log_flip(mid: str, check: _Check) -> None:
        up = check.state.up
        log_transition(f"health-{mid}", "up" if up else "down", "backend %s (%s) is %s: %s",
                       mid, check.spec.address, "up" if up else "down", check.state.reason,
                       level=logging.INFO if up else logging.WARNING)

    @staticmethod
    def _health_event(mid: str, check: _Check) -> dict:
        return {"kind": "health", "member": mid, "up": check.state.up,
                "reason": check.state.reason, "last_check": check.last_check}


def _routing(view: tuple[BackendRecord, ...]) -> list[tuple]:
    return [r.routing for r in view]


def _snapshot(snapshot_or_serving):
    """Server hands over its Serving holder; tests and the master a Snapshot."""
    return getattr(snapshot_or_serving, "current", snapshot_or_serving)


# applying events (in every worker) ------------------------------------------------------------
def apply_event(topology, event: dict, metrics) -> None:
    """Bring one Jobs event into this worker's topology (unknown pools/members: ignored,
    they belong to another generation of the rules)."""
    handler = _HANDLERS.get(event.get("kind"))
    if handler is None:
        log_once_per("jobs-unknown-event", 60.0, "ignoring unknown jobs event %r", event)
        return
    handler(topology, event, metrics)


def _apply_members(topology, event: dict, metrics) -> None:
    if event["pool"] not in topology.pools:
        return
    specs = [BackendSpec(b["name"], b["host"], int(b["port"]), int(b["weight"]),
                         source="redis") for b in event["backends"]]
    before = {m.id for m in topology.pools[event["pool"]].redis_members}
    gone = topology.set_redis_members(event["pool"], specs)
    _member_series(topology, event["pool"], before, gone, metrics)
    if event.get("close_removed"):
        for member in gone:
            if member.removed:  # not still a member somewhere else
                member.close_connections()


def _member_series(topology, pool: str, before: set[str], gone: list, metrics) -> None:
    """proxy_backend_health for a pool's Redis members: a member that joins gets its
    series at once (as this process sees it: a new member is up), and one that leaves
    loses it here. In multiprocess mode the master's /metrics also drops the series of
    members it no longer has (obs.http), since a worker's files cannot forget one."""
    for member in topology.pools[pool].redis_members:
        if member.id not in before:
            metrics.backend_health.labels(pool, member.id).set(1 if member.health.up else 0)
    for member in gone:
        metrics.backend_health.remove(pool, member.id)


def _apply_health(topology, event: dict, metrics) -> None:
    member = topology.members.get(event["member"])
    if member is None:
        return
    state, up = member.health, bool(event["up"])
    for _ in range(max(state.rise, state.fall)):  # public API only: record until it flips
        if state.up == up:
            break
        state.record(up, event.get("reason") or "")
    state.record(up)  # agreeing result: clears the checks' progress towards a flip
    member.last_check = event.get("last_check")
    for pool in topology.pools.values():
        if member in pool.members:
            metrics.backend_health.labels(pool.name, member.id).set(1 if up else 0)


def _apply_redis(topology, event: dict, metrics) -> None:
    metrics.redis_up.set(1 if event["up"] else 0)


def _apply_changed(topology, event: dict, metrics) -> None:
    invalidate_sni_caches(event.get("names"))


_HANDLERS = {"members": _apply_members, "health": _apply_health, "redis": _apply_redis,
             "changed": _apply_changed}


def carry_redis_members(topology, previous) -> None:
    """Give a freshly built topology the Redis members its predecessor had (pools of
    the same name that still read Redis), before it is swapped in: a reload must not
    serve a moment without them. The jobs' next events correct any difference (the
    master publishes the full state after every reload)."""
    if previous is None:
        return
    for name, pool in previous.pools.items():
        new = topology.pools.get(name)
        if pool.redis_members and new is not None and new.spec.redis_patterns:
            topology.set_redis_members(name, [m.spec for m in pool.redis_members])


def attach_jobs(server, snapshot, metrics) -> Jobs:
    """Single-process wiring: jobs whose events go straight into the server's current
    topology. Sets `server.jobs`; Server.start()/reload()/stop drive it."""
    def publish(event: dict) -> None:
        apply_event(server.serving.current.topology, event, metrics)

    jobs = Jobs(snapshot.config, metrics, publish)
    server.jobs = jobs
    return jobs

