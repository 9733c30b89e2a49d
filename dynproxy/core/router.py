"""First-match routing without scanning the rules: a bitset index over DNF clauses.

The compiler (lang.compile) turns every rule's condition into clauses: ANDs of
literals, each literal "any of these atoms is true" or its negation, numbered in
rule order. Here each atom (an exact SNI, a suffix, a CIDR, a port range, ...) is
indexed per dimension and carries two bitsets (Python ints): the clauses that need
one of its literals, and the clauses that forbid one. For a connection we find the
true atoms of each dimension through dicts (cached per value), combine bitsets, and
the lowest set bit is the first matching clause. A decision costs a handful of
dict probes and big-int operations whatever the number of rules.

Pure: no I/O. Built once per rule set, shared read-only; a reload swaps the whole
Router.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterable

DIMENSIONS = ("sni", "src", "dport", "proto", "alpn")
_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """The facts a routing decision may use. `sni` is already normalised."""

    proto: str = "tcp"
    src: str | None = None
    dport: int | None = None
    sni: str | None = None
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Atom:
    """One indexable fact test. `key` depends on dim/kind (see Index.add_atom)."""

    dim: str
    kind: str  # sni: exact|suffix|prefix|glob; src: net; dport: range; proto; alpn
    key: object

    def test(self, conn: ConnInfo, src_ip=None) -> bool:
        return ATOM_TESTS[(self.dim, self.kind)](self.key, conn, src_ip)


@dataclass(frozen=True, slots=True)
class Literal:
    """True when any of its atoms is true (a bracketed set in the rules)."""

    atoms: frozenset[Atom]

    @property
    def dim(self) -> str:
        return next(iter(self.atoms)).dim


@dataclass(frozen=True, slots=True)
class Clause:
    """An AND of literals; `check` (if set) is a closure that decides the clause alone."""

    rule: int
    positive: tuple[Literal, ...]
    negative: tuple[Literal, ...]
    check: Callable[[ConnInfo], bool] | None = None


def parse_src(src: str | None):
    """Client address -> ip_address, IPv4-mapped IPv6 unwrapped; None if absent/invalid."""
    if not src:
        return None
    fast = _ipv4_fast(src)
    if fast is not None:
        return fast
    try:
        ip = ipaddress.ip_address(src.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _ipv4_fast(src: str):
    """Dotted-quad parsing without ipaddress's per-octet checks (the common case)."""
    parts = src.split(".")
    if len(parts) != 4:
        return None
    try:
        a, b, c, d = (int(p) for p in parts)
    except ValueError:
        return None
    if a | b | c | d > 255 or min(a, b, c, d) < 0 or any(len(p) > 3 for p in parts):
        return None
    return ipaddress.IPv4Address((a << 24) | (b << 16) | (c << 8) | d)


def _glob_match(key, conn, _ip):
    return conn.sni is not None and key[1].fullmatch(conn.sni) is not None


ATOM_TESTS = {
    ("sni", "exact"): lambda k, c, _ip: c.sni == k,
    ("sni", "suffix"): lambda k, c, _ip: c.sni is not None and c.sni.endswith(k),
    ("sni", "prefix"): lambda k, c, _ip: c.sni is not None and c.sni.startswith(k),
    ("sni", "glob"): _glob_match,
    ("src", "net"): lambda k, c, ip: ip is not None and ip in k,
    ("dport", "range"): lambda k, c, _ip: c.dport is not None and k[0] <= c.dport <= k[1],
    ("proto", "proto"): lambda k, c, _ip: c.proto == k,
    ("alpn", "alpn"): lambda k, c, _ip: k in c.alpn,
}


def glob_atom(pattern: str, regex: str) -> Atom:
    return Atom("sni", "glob", (pattern, re.compile(regex)))


class _Bits:
    """need/forbid bitsets accumulated per atom while building."""

    __slots__ = ("need", "forbid")

    def __init__(self):
        self.need = 0
        self.forbid = 0


class Router:
    """Answers `first_clause(conn, start_rule)`; built from clauses in rule order."""

    def __init__(self, clauses: Iterable[Clause], n_rules: int, glob_suffix: Callable[[str], str]):
        self.clauses = tuple(clauses)
        self._rule_start = _rule_starts(self.clauses, n_rules)
        self._glob_suffix = glob_suffix
        self._bits: dict[Atom, _Bits] = {}
        self._required = dict.fromkeys(DIMENSIONS, 0)
        self._verify = 0  # clauses that need more than the bitsets can tell
        self._all = (1 << len(self.clauses)) - 1
        for i, clause in enumerate(self.clauses):
            self._add_clause(i, clause)
        self._not_required = {d: self._all & ~req for d, req in self._required.items()}
        self._active_dims = tuple(d for d in DIMENSIONS if self._required[d] or self._forbids(d))
        self._build_indexes()
        self._caches: dict[str, dict] = {d: {} for d in DIMENSIONS}

    # building ----------------------------------------------------------------------
    def _add_clause(self, i: int, clause: Clause) -> None:
        bit = 1 << i
        seen_dims: set[str] = set()
        for lit in clause.positive:
            if lit.dim in seen_dims:
                self._verify |= bit  # two literals of one dimension: bitsets see "any"
            seen_dims.add(lit.dim)
            self._required[lit.dim] |= bit
            for atom in lit.atoms:
                self._bits.setdefault(atom, _Bits()).need |= bit
        for lit in clause.negative:
            for atom in lit.atoms:
                self._bits.setdefault(atom, _Bits()).forbid |= bit
        if clause.check is not None:
            self._verify |= bit

    def _forbids(self, dim: str) -> bool:
        return any(a.dim == dim and b.forbid for a, b in self._bits.items())

    def _build_indexes(self) -> None:
        self._sni_exact: dict[str, list[Atom]] = {}
        self._sni_suffix: dict[str, list[Atom]] = {}
        self._sni_prefix: dict[int, dict[str, list[Atom]]] = {}
        self._sni_glob_by_suffix: dict[str, list[Atom]] = {}
        self._sni_glob_rest: list[Atom] = []
        self._src: dict[tuple[int, int], dict[int, list[Atom]]] = {}
        self._ports: dict[int, list[Atom]] = {}
        self._port_ranges: list[Atom] = []
        self._simple: dict[tuple[str, object], list[Atom]] = {}
        for atom in self._bits:
            self._index_atom(atom)

    def _index_atom(self, atom: Atom) -> None:
        k = atom.key
        if atom.dim == "sni":
            self._index_sni(atom)
        elif atom.dim == "src":
            net = k
            bucket = self._src.setdefault((net.version, net.prefixlen), {})
            bucket.setdefault(int(net.network_address) >> (net.max_prefixlen - net.prefixlen),
                              []).append(atom)
        elif atom.dim == "dport":
            if k[0] == k[1]:
                self._ports.setdefault(k[0], []).append(atom)
            else:
                self._port_ranges.append(atom)
        else:
            self._simple.setdefault((atom.dim, k), []).append(atom)

    def _index_sni(self, atom: Atom) -> None:
        k = atom.key
        if atom.kind == "exact":
            self._sni_exact.setdefault(k, []).append(atom)
        elif atom.kind == "suffix":
            self._sni_suffix.setdefault(k, []).append(atom)
        elif atom.kind == "prefix":
            self._sni_prefix.setdefault(len(k), {}).setdefault(k, []).append(atom)
        else:
            fixed = self._glob_suffix(k[0])
            if fixed:
                self._sni_glob_by_suffix.setdefault(fixed, []).append(atom)
            else:
                self._sni_glob_rest.append(atom)

    # deciding ----------------------------------------------------------------------
    def first_clause(self, conn: ConnInfo, start_rule: int = 0) -> int | None:
        """Index of the first clause (of a rule >= start_rule) that matches, or None."""
        m = self._all
        if start_rule:
            if start_rule >= len(self._rule_start):
                return None
            m &= ~((1 << self._rule_start[start_rule]) - 1)
        forbid = 0
        for dim in self._active_dims:
            need, forb = self._dim_bits(dim, conn)
            m &= self._not_required[dim] | need
            forbid |= forb
            if not m:
                return None
        m &= ~forbid
        return self._lowest_verified(m, conn)

    def _lowest_verified(self, m: int, conn: ConnInfo) -> int | None:
        while m:
            low = m & -m
            i = low.bit_length() - 1
            if not (self._verify & low) or self._verify_clause(self.clauses[i], conn):
                return i
            m ^= low
        return None

    def _verify_clause(self, clause: Clause, conn: ConnInfo) -> bool:
        if clause.check is not None:
            return clause.check(conn)
        ip = parse_src(conn.src)
        return all(any(a.test(conn, ip) for a in lit.atoms) for lit in clause.positive) and not any(
            any(a.test(conn, ip) for a in lit.atoms) for lit in clause.negative
        )

    def _dim_bits(self, dim: str, conn: ConnInfo) -> tuple[int, int]:
        value = _DIM_VALUE[dim](conn)
        cache = self._caches[dim]
        hit = cache.get(value)
        if hit is not None:
            return hit
        need = forbid = 0
        for atom in self._true_atoms(dim, value):
            b = self._bits[atom]
            need |= b.need
            forbid |= b.forbid
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[value] = (need, forbid)
        return need, forbid

    def _true_atoms(self, dim: str, value) -> list[Atom]:
        if value is None:
            return []
        if dim == "sni":
            return self._sni_atoms(value)
        if dim == "src":
            return self._src_atoms(value)
        if dim == "dport":
            return self._ports.get(value, []) + [
                a for a in self._port_ranges if a.key[0] <= value <= a.key[1]
            ]
        if dim == "alpn":
            return [a for proto in value for a in self._simple.get(("alpn", proto), ())]
        return self._simple.get((dim, value), [])

    def _sni_atoms(self, sni: str) -> list[Atom]:
        found = list(self._sni_exact.get(sni, ()))
        dot = sni.find(".")
        while dot != -1:
            suffix = sni[dot:]
            found += self._sni_suffix.get(suffix, ())
            for atom in self._sni_glob_by_suffix.get(suffix, ()):
                if atom.key[1].fullmatch(sni):
                    found.append(atom)
            dot = sni.find(".", dot + 1)
        found += [a for a in self._sni_glob_by_suffix.get("." + sni, ()) if a.key[1].fullmatch(sni)]
        for length, table in self._sni_prefix.items():
            if length <= len(sni):
                found += table.get(sni[:length], ())
        found += [a for a in self._sni_glob_rest if a.key[1].fullmatch(sni)]
        return found

    def _src_atoms(self, src: str) -> list[Atom]:
        ip = parse_src(src)
        if ip is None:
            return []
        n, bits, found = int(ip), ip.max_prefixlen, []
        for (version, plen), table in self._src.items():
            if version == ip.version:
                found += table.get(n >> (bits - plen), ())
        return found


def _rule_starts(clauses: tuple[Clause, ...], n_rules: int) -> list[int]:
    """rule index -> index of the first clause belonging to that rule or a later one."""
    starts, c = [], 0
    for rule in range(n_rules + 1):
        while c < len(clauses) and clauses[c].rule < rule:
            c += 1
        starts.append(c)
    return starts


_DIM_VALUE = {
    "sni": lambda c: c.sni,
    "src": lambda c: c.src,
    "dport": lambda c: c.dport,
    "proto": lambda c: c.proto,
    "alpn": lambda c: c.alpn or None,
}
