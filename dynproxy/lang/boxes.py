"""Boxes: the set of connections one AND-clause of a condition matches, for the linter.

A box is a product of one set per dimension: protocol, destination port, source
address, ALPN offer and SNI. Boxes intersect dimension by dimension, and a difference
of two boxes is a short list of boxes, which is what proving a rule unreachable
needs. Every answer here errs on the side of "maybe not empty": the linter may miss a
warning, it must never invent one. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dynproxy.lang.sni_sets import (
    EMPTY,
    NO_SNI_ONLY,
    SNI_ALL,
    SniSet,
    sni_intersect,
    sni_minus,
    sni_status,
)

Intervals = tuple[tuple[int, int], ...]  # sorted, disjoint, not adjacent

TCP, UDP = 1, 2
PORTS_ALL: Intervals = ((1, 65535),)
V4_ALL: Intervals = ((0, 2**32 - 1),)
V6_ALL: Intervals = ((0, 2**128 - 1),)


# --- interval sets --------------------------------------------------------------


def iv_normalize(pairs) -> Intervals:
    out: list[list[int]] = []
    for lo, hi in sorted(pairs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def iv_intersect(a: Intervals, b: Intervals) -> Intervals:
    if a == b:
        return a
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def iv_complement(a: Intervals, universe: Intervals) -> Intervals:
    lo_all, hi_all = universe[0]
    out, nxt = [], lo_all
    for lo, hi in a:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= hi_all:
        out.append((nxt, hi_all))
    return tuple(out)


def iv_subtract(a: Intervals, b: Intervals, universe: Intervals) -> Intervals:
    return iv_intersect(a, iv_complement(b, universe))


def iv_contains(a: Intervals, x: int) -> bool:
    return any(lo <= x <= hi for lo, hi in a)


def iv_size(a: Intervals) -> int:
    return sum(hi - lo + 1 for lo, hi in a)


# --- ALPN offers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlpnSet:
    """Offers that hit every set in `hits` (and offer something when hit_any) and
    none of `avoid` (nothing at all when avoid_all). An offer is a set of protocols."""

    hits: tuple[frozenset[str], ...] = ()
    hit_any: bool = False
    avoid: frozenset[str] = frozenset()
    avoid_all: bool = False

    @property
    def is_empty(self) -> bool:
        if self.avoid_all:
            return bool(self.hits) or self.hit_any
        return any(h <= self.avoid for h in self.hits)

    @property
    def holds_no_offer(self) -> bool:
        """Does it hold the connection that offers no ALPN (not TLS, UDP, or none sent)?"""
        return not self.hits and not self.hit_any


ALPN_ALL = AlpnSet()
ALPN_NONE_OFFERED = AlpnSet(avoid_all=True)


def alpn_atom(protocols: frozenset[str], positive: bool) -> AlpnSet:
    return AlpnSet(hits=(protocols,)) if positive else AlpnSet(avoid=protocols)


def alpn_intersect(a: AlpnSet, b: AlpnSet) -> AlpnSet:
    return AlpnSet(
        a.hits + tuple(h for h in b.hits if h not in a.hits),
        a.hit_any or b.hit_any,
        a.avoid | b.avoid,
        a.avoid_all or b.avoid_all,
    )


def alpn_minus(r: AlpnSet, e: AlpnSet) -> list[AlpnSet]:
    parts = [AlpnSet(avoid=h) for h in e.hits]
    if e.hit_any:
        parts.append(ALPN_NONE_OFFERED)
    if e.avoid:
        parts.append(AlpnSet(hits=(e.avoid,)))
    if e.avoid_all:
        parts.append(AlpnSet(hit_any=True))
    return [p for p in (alpn_intersect(r, part) for part in parts) if not p.is_empty]


# --- source addresses -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SrcSet:
    v4: Intervals = V4_ALL
    v6: Intervals = V6_ALL

    @property
    def is_empty(self) -> bool:
        return not self.v4 and not self.v6


SRC_ALL = SrcSet()


def src_intersect(a: SrcSet, b: SrcSet) -> SrcSet:
    return SrcSet(iv_intersect(a.v4, b.v4), iv_intersect(a.v6, b.v6))


def src_complement(a: SrcSet) -> SrcSet:
    return SrcSet(iv_complement(a.v4, V4_ALL), iv_complement(a.v6, V6_ALL))


def src_contains(a: SrcSet, point: tuple[int, int]) -> bool:
    version, value = point
    return iv_contains(a.v4 if version == 4 else a.v6, value)


# --- boxes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Box:
    proto: int = TCP | UDP
    ports: Intervals = PORTS_ALL
    src: SrcSet = SRC_ALL
    alpn: AlpnSet = ALPN_ALL
    sni: SniSet = SNI_ALL


UNIVERSE = Box()


def is_empty(box: Box) -> bool:
    """True only when provably empty."""
    return (
        not box.proto
        or not box.ports
        or box.src.is_empty
        or box.alpn.is_empty
        or sni_status(box.sni) == EMPTY
    )


def split_by_proto(box: Box) -> list[Box]:
    """One box per protocol; UDP carries neither SNI nor ALPN, so those narrow."""
    out = []
    if box.proto & TCP:
        out.append(Box(TCP, box.ports, box.src, box.alpn, box.sni))
    if box.proto & UDP:
        sni = sni_intersect(box.sni, NO_SNI_ONLY)
        alpn = alpn_intersect(box.alpn, ALPN_NONE_OFFERED)
        out.append(Box(UDP, box.ports, box.src, alpn, sni))
    return [b for b in out if not is_empty(b)]


def intersect(a: Box, b: Box) -> Box | None:
    """a ∩ b, or None when provably empty (cheap dimensions first)."""
    proto = a.proto & b.proto
    if not proto:
        return None
    ports = iv_intersect(a.ports, b.ports)
    if not ports:
        return None
    src = src_intersect(a.src, b.src) if a.src is not b.src else a.src
    if src.is_empty:
        return None
    alpn = a.alpn if b.alpn is ALPN_ALL else alpn_intersect(a.alpn, b.alpn)
    if alpn.is_empty:
        return None
    sni = a.sni if b.sni is SNI_ALL else sni_intersect(a.sni, b.sni)
    if sni is not a.sni and sni_status(sni) == EMPTY:
        return None
    return Box(proto, ports, src, alpn, sni)


def difference(r: Box, e: Box, common: Box) -> list[Box]:
    """r minus e as boxes, given common = r ∩ e (non-empty); pieces may overlap."""
    pieces = []
    cur = r
    if r.proto & ~e.proto:
        pieces.append(replace(cur, proto=r.proto & ~e.proto))
    cur = replace(cur, proto=common.proto)
    rest = iv_subtract(r.ports, e.ports, PORTS_ALL)
    if rest:
        pieces.append(replace(cur, ports=rest))
    cur = replace(cur, ports=common.ports)
    rest_src = src_intersect(r.src, src_complement(e.src))
    if not rest_src.is_empty:
        pieces.append(replace(cur, src=rest_src))
    cur = replace(cur, src=common.src)
    pieces += [replace(cur, alpn=a) for a in alpn_minus(r.alpn, e.alpn)]
    cur = replace(cur, alpn=common.alpn)
    for s in sni_minus(r.sni, e.sni):
        if sni_status(s) != EMPTY:
            pieces.append(replace(cur, sni=s))
    return pieces
