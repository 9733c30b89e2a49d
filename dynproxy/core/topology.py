"""Runtime state of backends and pools: who is healthy, busy, draining, and who is next.

A Topology is built from a compiled rule set (its BackendSpecs and PoolSpecs) and
lives in one worker. Members are shared by id across pools and rules, so a backend
named in a pool and in an lb(...) has one health state and one connection count.
Redis members are swapped in by the store layer; health results come from probes
and from live traffic. On reload a new Topology adopts the old one's member states
(same id and address), so health and counters survive. Pure: no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from dynproxy.core.balance import make_balancer
from dynproxy.core.decision import BackendSpec, Decision, PoolSpec
from dynproxy.core.health import HealthState, Transition


class Member:
    """One backend as the balancer and the connection code see it (mutable, per worker)."""

    __slots__ = ("id", "spec", "weight", "active", "health", "draining", "removed",
                 "last_check", "actively_checked", "retry_at", "connections")
    PASSIVE_RETRY = 10.0  # seconds a member without active checks rests after going down

    def __init__(self, spec: BackendSpec, weight: int, rise: int = 2, fall: int = 3):
        self.id = spec.name
        self.spec = spec
        self.weight = weight
        self.active = 0
        self.health = HealthState(rise=rise, fall=fall)
        self.draining = False  # gets no new connections (removed from Redis, or drained)
        self.removed = False  # no longer part of the topology
        self.last_check: float | None = None
        self.actively_checked = False  # set when a pool with a `health` line owns it
        self.retry_at = 0.0
        # closers of its open connections, registered by the connection code, for
        # `redis.close_removed` (a set: adding and discarding cost O(1) per connection)
        self.connections: set = set()

    @property
    def available(self) -> bool:
        if self.draining or self.weight <= 0:
            return False
        if self.health.up:
            return True
        # Without active checks nothing would ever bring a member back: after a rest,
        # let live traffic try it again (as nginx's fail_timeout does).
        return not self.actively_checked and time.monotonic() >= self.retry_at

    def close_connections(self) -> int:
        """Close every open connection to this member (it left Redis, and the operator
        asked for `close_removed`); returns how many."""
        closers, self.connections = list(self.connections), set()
        for close in closers:
            close()
        return len(closers)

    def record(self, ok: bool, reason: str = "") -> Transition | None:
        """An active check's result (rise/fall hysteresis)."""
        transition = self.health.record(ok, reason)
        if not ok and not self.health.up:
            self.retry_at = time.monotonic() + self.PASSIVE_RETRY
        return transition

    def record_passive(self, ok: bool, passive_fall: int, reason: str = "") -> Transition | None:
        """A result seen by live traffic (`health.passive_fall`; see
        HealthState.record_passive). A success brings back a member that no active check
        owns; one that active checks own comes back when they say so."""
        transition = self.health.record_passive(ok, passive_fall, reason,
                                                may_rise=not self.actively_checked)
        if not ok and not self.health.up:
            self.retry_at = time.monotonic() + self.PASSIVE_RETRY
        return transition


class _Choice:
    """A balancer candidate: a member, or a pool/backend target inside an lb(...)."""

    __slots__ = ("id", "weight", "available", "active", "target")

    def __init__(self, id_: str, weight: int, target):
        self.id, self.weight, self.target = id_, weight, target
        self.available, self.active = True, 0


class Slot:
    """A member as one pool sees it: with that pool's weight for it. A backend in two
    pools has one health state and one connection count, but a weight per pool."""

    __slots__ = ("member", "id", "weight")

    def __init__(self, member: Member, weight: int):
        self.member, self.id, self.weight = member, member.id, weight

    @property
    def available(self) -> bool:
        return self.member.available

    @property
    def active(self) -> int:
        return self.member.active


class Pool:
    def __init__(self, spec: PoolSpec, members: list[Member], weights: dict[str, int]):
        self.spec = spec
        self.name = spec.name
        self.static_members = list(members)
        self._static_weights = weights
        self._redis_members: list[Member] = []
        self.balancer = make_balancer(spec.algo, spec.hash_key)
        self._rebuild()

    @property
    def redis_members(self) -> list[Member]:
        return self._redis_members

    @redis_members.setter
    def redis_members(self, members: list[Member]) -> None:
        self._redis_members = list(members)
        self._rebuild()

    def _rebuild(self) -> None:
        self.members = self.static_members + self._redis_members
        self.slots = [Slot(m, self._static_weights[m.id]) for m in self.static_members]
        self.slots += [Slot(m, m.weight) for m in self._redis_members]

    def weight_of(self, member: Member) -> int:
        return next((s.weight for s in self.slots if s.member is member), member.weight)

    def available(self) -> bool:
        return any(m.available for m in self.members)

    def active(self) -> int:
        return sum(m.active for m in self.members)

    def pick(self, hash_key: str | None, exclude: frozenset[str]) -> Member | None:
        slot = self.balancer.pick(self.slots, hash_key, exclude)
        return None if slot is None else slot.member


@dataclass(frozen=True, slots=True)
class Unknown:
    name: str


class Topology:
    """Members and pools of one rule set, plus the picking logic for decisions."""

    def __init__(self, backends: dict[str, BackendSpec], pools: dict[str, PoolSpec],
                 previous: Topology | None = None):
        self._adopt = previous.members if previous else {}
        self.members: dict[str, Member] = {}
        self.backends = {name: self._member(spec, spec.weight) for name, spec in backends.items()}
        self.pools = {name: self._pool(spec) for name, spec in pools.items()}
        self._lb_balancers: dict[int, object] = {}
        self._lb_choices: dict[int, list[_Choice]] = {}

    # building --------------------------------------------------------------------
    def _member(self, spec: BackendSpec, weight: int | None, health=None) -> Member:
        """The member for `spec`, shared by id (adopted across reloads). `weight` None
        keeps the member's own (a pool keeps its weight for it in its Slot); `health`
        (a pool's check settings) sets its rise/fall."""
        member = self.members.get(spec.name) or self._adopt.get(spec.name)
        if member is not None and member.spec.address == spec.address:
            member.spec, member.removed = spec, False
            if weight is not None:
                member.weight = weight
        else:
            member = Member(spec, spec.weight if weight is None else weight, 1, 3)
        if health is not None:
            member.health.rise, member.health.fall = health.rise, health.fall
        self.members[spec.name] = member
        return member

    def _pool(self, spec: PoolSpec) -> Pool:
        members = [self._member(m.backend, None, spec.health) for m in spec.members]
        for m in members:
            m.actively_checked = m.actively_checked or spec.health is not None
        weights = {m.backend.name: m.weight for m in spec.members}
        return Pool(spec, members, weights)

    def set_redis_members(self, pool_name: str, specs: Iterable[BackendSpec]) -> list[Member]:
        """Replace a pool's Redis members; returns the members that left (now draining)."""
        pool = self.pools[pool_name]
        new = [self._member(s, s.weight, pool.spec.health) for s in specs]
        keep = {m.id for m in new}
        gone = [m for m in pool.redis_members if m.id not in keep]
        for m in gone:
            if not self._referenced(m, exclude_pool=pool):
                m.draining, m.removed = True, True
                self.members.pop(m.id, None)
        for m in new:
            m.draining = False
            m.actively_checked = m.actively_checked or pool.spec.health is not None
        pool.redis_members = new
        return gone

    def _referenced(self, member: Member, exclude_pool: Pool) -> bool:
        return member.id in self.backends or any(
            member in p.members for p in self.pools.values() if p is not exclude_pool
        )

    # picking -----------------------------------------------------------------------
    def candidates(self, decision: Decision, hash_key: str | None,
                   attempts: int) -> Iterator[Member]:
        """Members to try in order for a forward/lb decision (distinct, available)."""
        tried: set[str] = set()
        for _ in range(attempts):
            member = self.pick(decision, hash_key, frozenset(tried))
            if member is None:
                return
            tried.add(member.id)
            yield member

    def pick(self, decision: Decision, hash_key: str | None,
             exclude: frozenset[str]) -> Member | None:
        if decision.action == "forward":
            return self._pick_target(decision.targets[0].name, hash_key, exclude)
        choices = self._choices(decision)
        for c in choices:
            c.available = self._target_available(c.target, exclude)
            c.active = self._target_active(c.target)
        balancer = self._lb_balancers[decision.rule.index]
        tried: set[str] = set()
        while True:
            choice = balancer.pick(choices, hash_key, frozenset(tried))
            if choice is None:
                return None
            member = self._pick_target(choice.target, hash_key, exclude)
            if member is not None:
                return member
            tried.add(choice.id)

    def _choices(self, decision: Decision) -> list[_Choice]:
        key = decision.rule.index
        choices = self._lb_choices.get(key)
        if choices is None:
            choices = [_Choice(t.name, t.weight, t.name) for t in decision.targets]
            self._lb_choices[key] = choices
            self._lb_balancers[key] = make_balancer(decision.algo, decision.hash_key)
        return choices

    def _pick_target(self, name: str, hash_key, exclude, fallback: bool = True) -> Member | None:
        """A member of backend or pool `name`; a pool whose members are all down hands
        over to its `fallback` (one hop only, so fallbacks cannot loop)."""
        member = self.backends.get(name)
        if member is not None:
            return member if member.available and member.id not in exclude else None
        pool = self.pools.get(name)
        if pool is None:
            return None
        picked = pool.pick(hash_key, exclude)
        if picked is None and fallback and pool.spec.fallback not in (None, name):
            return self._pick_target(pool.spec.fallback, hash_key, exclude, fallback=False)
        return picked

    def _target_available(self, name: str, exclude) -> bool:
        member = self.backends.get(name)
        if member is not None:
            return member.available and member.id not in exclude
        pool = self.pools.get(name)
        return pool is not None and any(
            m.available and m.id not in exclude for m in pool.members
        )

    def _target_active(self, name: str) -> int:
        member = self.backends.get(name)
        if member is not None:
            return member.active
        pool = self.pools.get(name)
        return pool.active() if pool else 0

    # views ----------------------------------------------------------------------------
    def pool_of(self, member: Member) -> str:
        for pool in self.pools.values():
            if member in pool.members:
                return pool.name
        return "-"

    def snapshot(self, active: dict[str, int] | None = None) -> dict:
        """JSON-ready view for GET /backends; `active` (member id -> open connections)
        replaces this process's own counts (the master's workers carry the traffic)."""
        def view(m: Member, source: str, weight: int | None = None) -> dict:
            shown = _member_view(m, source, weight)
            if active is not None:
                shown["active_connections"] = active.get(m.id, 0)
            return shown

        return {
            "pools": {name: {
                "algo": pool.spec.algo + (f"({pool.spec.hash_key})" if pool.spec.hash_key else ""),
                "members": [view(m, "redis" if m in pool.redis_members else "rules",
                                 pool.weight_of(m))
                            for m in pool.members],
            } for name, pool in self.pools.items()},
            "backends": {name: view(m, m.spec.source) for name, m in self.backends.items()},
        }


def _member_view(m: Member, source: str, weight: int | None = None) -> dict:
    return {
        "id": m.id,
        "address": m.spec.address,
        "weight": m.weight if weight is None else weight,
        "source": source,
        "healthy": m.health.up,
        "reason": m.health.reason,
        "last_check": m.last_check,
        "draining": m.draining,
        "active_connections": m.active,
    }
