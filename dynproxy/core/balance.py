"""Load-balancing strategies: which pool member gets the next connection.

Each strategy is a small object with one method, ``pick``, chosen by name with
``make_balancer`` (``wrr``, ``least_conn``, ``hash`` + ``src``|``sni``). A balancer
keeps per-member state between calls, so keep one per pool per worker process; it is
not thread-safe (gevent greenlets cannot interleave inside ``pick``: it never yields).

Must never do I/O, block, or use Python's ``hash()`` for placement (it is salted per
process, and workers must agree on where a client goes).

A candidate is any object with ``id`` (stable, unique within one call), ``weight``
(int >= 0), ``available`` (healthy and not draining) and ``active`` (open connections).
Eligible = available, weight > 0, id not in ``exclude`` (the ids already tried, for
retries). ``pick`` returns None when nobody is eligible.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_right
from collections.abc import Sequence, Set
from itertools import chain
from typing import Protocol

__all__ = [
    "Balancer",
    "Candidate",
    "ConsistentHash",
    "LeastConnections",
    "SmoothWeightedRoundRobin",
    "make_balancer",
    "stable_hash64",
]

_NOTHING: frozenset[str] = frozenset()


class Candidate(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def available(self) -> bool: ...
    @property
    def active(self) -> int: ...


class Balancer(Protocol):
    def pick(
        self, candidates: Sequence[Candidate], hash_key: str | None = None,
        exclude: Set[str] = _NOTHING,
    ) -> Candidate | None: ...


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: weights 3:1 give a, a, b, a.

    Every eligible member's running score grows by its weight; the highest score wins
    (first in list order on a tie) and pays back the round's total weight. Scores are
    kept per id, so the member list may change between calls: new ids start at 0,
    ineligible ones keep their score, ids no longer listed are forgotten.
    """

    __slots__ = ("_score",)

    def __init__(self) -> None:
        self._score: dict[str, int] = {}

    def __str__(self) -> str:
        return "wrr"

    def pick(self, candidates, hash_key=None, exclude=_NOTHING):
        # One pass with no helper calls: this runs for every new connection.
        score = self._score
        best = None
        best_score = total = known = 0
        for c in candidates:
            current = score.get(c.id)
            if current is not None:
                known += 1
            weight = c.weight
            if not c.available or weight <= 0 or c.id in exclude:
                continue
            if current is None:
                current, known = 0, known + 1
            current += weight
            score[c.id] = current
            total += weight
            if best is None or current > best_score:
                best, best_score = c, current
        if len(score) > known:
            self._forget_unlisted(candidates)
        if best is not None:
            score[best.id] = best_score - total
        return best

    def _forget_unlisted(self, candidates) -> None:
        listed = {c.id for c in candidates}
        self._score = {k: v for k, v in self._score.items() if k in listed}


class LeastConnections:
    """Fewest open connections per unit of weight; equal members take turns.

    Ties are broken round-robin: each scan starts just after the position picked last,
    so members with equal load share new connections instead of the first one taking
    every burst before its counter moves.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def __str__(self) -> str:
        return "least_conn"

    def pick(self, candidates, hash_key=None, exclude=_NOTHING):
        n = len(candidates)
        start = self._next % n if n else 0
        best = None
        best_at = best_active = best_weight = 0
        for i in chain(range(start, n), range(start)):
            c = candidates[i]
            weight = c.weight
            if not c.available or weight <= 0 or c.id in exclude:
                continue
            # active/weight < best_active/best_weight, without floats
            if best is None or c.active * best_weight < best_active * weight:
                best, best_at, best_active, best_weight = c, i, c.active, weight
        if best is not None:
            self._next = best_at + 1
        return best


def stable_hash64(text: str) -> int:
    """A 64-bit hash that every process and every run agree on."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class ConsistentHash:
    """Consistent hashing on a ring of virtual nodes, proportional to weight.

    A key goes to the owner of the first ring point clockwise from its hash; when that
    owner is ineligible the walk goes on clockwise, so a member going down moves only
    its own clients, and removing a member moves only its clients. The heaviest member
    gets ``POINTS_PER_MEMBER`` points, the others proportionally fewer (at least one):
    the ring stays bounded whatever scale the weights use (1..3 in rules, 100 in Redis).
    A member's points are the first N of a fixed sequence, so a weight change adds or
    drops points only at that member's tail; the one exception is a change of the
    heaviest weight, which rescales everybody's share. The ring is rebuilt only when
    the (id, weight) list changes.

    With no ``hash_key`` (no SNI on the connection for ``hash(sni)``) it falls back to
    smooth weighted round robin, as HAProxy does when the hashed input is missing.
    """

    POINTS_PER_MEMBER = 160
    # Each ring entry is one 64-bit int: the point's top 44 bits, then the owner's
    # index in the candidate list in the low 20. Sorting plain ints is twice as fast as
    # sorting (point, owner) tuples, and an array of them takes 8 bytes per point.
    _INDEX_BITS = 20
    _INDEX_MASK = (1 << _INDEX_BITS) - 1
    _UNPACK = struct.Struct("<8Q").unpack  # one 64-byte blake2b digest = 8 points

    __slots__ = ("key", "_fallback", "_signature", "_ring")

    def __init__(self, key: str) -> None:
        self.key = key  # which connection field the caller hashes: "src" or "sni"
        self._fallback = SmoothWeightedRoundRobin()
        self._signature: tuple = ()
        self._ring = array("Q")  # sorted (point | owner index) entries

    def __str__(self) -> str:
        return f"hash({self.key})"

    def pick(self, candidates, hash_key=None, exclude=_NOTHING):
        if hash_key is None:
            return self._fallback.pick(candidates, None, exclude)
        signature = tuple([(c.id, c.weight) for c in candidates])
        if signature != self._signature:
            self._rebuild(signature)
        ring = self._ring
        if not ring:
            return None
        # OR-ing in the mask skips entries whose point equals the key's: strictly clockwise
        at = bisect_right(ring, stable_hash64(hash_key) | self._INDEX_MASK)
        return self._walk(candidates, ring, at, exclude)

    def _walk(self, candidates, ring, at, exclude):
        size, mask = len(ring), self._INDEX_MASK
        for step in range(size):
            if step == 1 and not _any_eligible(candidates, exclude):
                return None  # don't walk the whole ring to learn that nobody is up
            c = candidates[ring[(at + step) % size] & mask]
            if c.available and c.weight > 0 and c.id not in exclude:
                return c
        return None

    def _rebuild(self, signature: tuple) -> None:
        if len(signature) > self._INDEX_MASK:
            raise ValueError(f"hash balancing supports up to {self._INDEX_MASK} members, "
                             f"got {len(signature)}; split the pool")
        heaviest = max((w for _, w in signature), default=0)
        keep = ~self._INDEX_MASK
        ring: list[int] = []
        for index, (member_id, weight) in enumerate(signature):
            if weight > 0:
                count = max(1, round(self.POINTS_PER_MEMBER * weight / heaviest))
                ring.extend([p & keep | index for p in self._member_points(member_id, count)])
        ring.sort()
        self._ring = array("Q", ring)
        self._signature = signature

    @classmethod
    def _member_points(cls, member_id: str, count: int) -> list[int]:
        points: list[int] = []
        block = 0
        while len(points) < count:
            seed = f"{member_id}#{block}".encode()
            points.extend(cls._UNPACK(hashlib.blake2b(seed, digest_size=64).digest()))
            block += 1
        return points[:count]


def _any_eligible(candidates, exclude) -> bool:
    for c in candidates:
        if c.available and c.weight > 0 and c.id not in exclude:
            return True
    return False


_KINDS = {"wrr": SmoothWeightedRoundRobin, "least_conn": LeastConnections}
_HASH_KEYS = ("src", "sni")


def make_balancer(kind: str, key: str | None = None) -> Balancer:
    """A fresh balancer by its rule-language name: ``wrr``, ``least_conn`` or ``hash``
    (with ``key`` ``src`` or ``sni``). ``str()`` of the result prints the name back."""
    if kind == "hash":
        if key not in _HASH_KEYS:
            raise ValueError(f"balancer 'hash' needs key 'src' or 'sni', got {key!r}")
        return ConsistentHash(key)
    if kind not in _KINDS:
        raise ValueError(
            f"unknown balancer {kind!r}; use one of 'wrr', 'least_conn', 'hash'")
    if key is not None:
        raise ValueError(f"balancer {kind!r} takes no hash key, got {key!r}; only 'hash' does")
    return _KINDS[kind]()
