"""Conditions -> disjunctive normal form -> the box of connections each clause matches.

`not` is pushed down to the atoms, then ANDs are distributed over ORs; a rule whose
condition would need more than MAX_CLAUSES clauses is left out of the analysis (the
caller says nothing about it rather than guess). Atom values get their meaning from
lang.values only. Also renders atoms back to text for messages. No I/O.
"""

from __future__ import annotations

import functools

from dynproxy.lang import ast
from dynproxy.lang.boxes import (
    PORTS_ALL,
    TCP,
    UDP,
    Box,
    SrcSet,
    alpn_atom,
    alpn_intersect,
    is_empty,
    iv_complement,
    iv_intersect,
    iv_normalize,
    src_complement,
    src_intersect,
)
from dynproxy.lang.sni_sets import sni_atom, sni_intersect
from dynproxy.lang.values import check_port_range, parse_network, parse_sni_pattern

MAX_CLAUSES = 64
MAX_ALPN_BYTES = 255

Literal = tuple[ast.Atom, bool]  # (atom, positive)
Clause = tuple[Literal, ...]

NOUNS = {ast.Proto: "protocol", ast.Dport: "port", ast.Src: "source address",
         ast.Alpn: "ALPN offer", ast.Sni: "server name"}


class _TooManyClauses(Exception):
    pass


def to_dnf(cond: ast.Cond, limit: int = MAX_CLAUSES) -> tuple[Clause, ...] | None:
    """The clauses of `cond` (an OR of ANDs of literals), or None past `limit`."""
    try:
        return tuple(_dnf(cond, True, limit))
    except _TooManyClauses:
        return None


def _dnf(node, positive: bool, limit: int) -> list[Clause]:
    while isinstance(node, ast.Not):
        node, positive = node.operand, not positive
    if isinstance(node, (ast.And, ast.Or)):
        parts = [_dnf(op, positive, limit) for op in node.operands]
        if isinstance(node, ast.And) == positive:
            return _product(parts, limit)
        joined = [c for part in parts for c in part]
        if len(joined) > limit:
            raise _TooManyClauses
        return joined
    return [((node, positive),)]


def _product(parts: list[list[Clause]], limit: int) -> list[Clause]:
    out: list[Clause] = [()]
    for part in parts:
        if len(out) * len(part) > limit:
            raise _TooManyClauses
        out = [a + b for a in out for b in part]
    return out


# --- atoms -> sets ----------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def atom_value(atom: ast.Atom):
    """The set a positive atom matches, in its dimension's form; ValueError if invalid."""
    if isinstance(atom, ast.Proto):
        return TCP if atom.proto == "tcp" else UDP
    if isinstance(atom, ast.Dport):
        for r in atom.ranges:
            check_port_range(r.lo, r.hi)
        return iv_normalize((r.lo, r.hi) for r in atom.ranges)
    if isinstance(atom, ast.Src):
        return _networks(atom)
    if isinstance(atom, ast.Alpn):
        return frozenset(_alpn(item.value) for item in atom.protocols)
    return frozenset((atom.op, parse_sni_pattern(atom.op, i.value)) for i in atom.patterns)


def _networks(atom: ast.Src) -> SrcSet:
    v4, v6 = [], []
    for item in atom.networks:
        net = parse_network(item.value)
        pair = (int(net.network_address), int(net.broadcast_address))
        (v4 if net.version == 4 else v6).append(pair)
    return SrcSet(iv_normalize(v4), iv_normalize(v6))


def _alpn(value: str) -> str:
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_ALPN_BYTES:
        raise ValueError(f"ALPN protocol {value!r} is {size} bytes; it must be 1 to 255")
    return value


def clause_box(clause: Clause) -> Box:
    """The box of connections the clause matches (before narrowing UDP)."""
    proto, ports, src = TCP | UDP, PORTS_ALL, SrcSet()
    alpn, sni = Box().alpn, Box().sni
    for atom, positive in clause:
        value = atom_value(atom)
        if isinstance(atom, ast.Proto):
            proto &= value if positive else (TCP | UDP) & ~value
        elif isinstance(atom, ast.Dport):
            ports = iv_intersect(ports, value if positive else iv_complement(value, PORTS_ALL))
        elif isinstance(atom, ast.Src):
            src = src_intersect(src, value if positive else src_complement(value))
        elif isinstance(atom, ast.Alpn):
            alpn = alpn_intersect(alpn, alpn_atom(value, positive))
        else:
            sni = sni_intersect(sni, sni_atom(value, positive))
    return Box(proto, ports, src, alpn, sni)


def why_empty(clause: Clause) -> tuple[str, list[Literal]] | None:
    """The first dimension whose literals alone match nothing: (noun, literals)."""
    for kind, noun in NOUNS.items():
        lits = tuple(lit for lit in clause if isinstance(lit[0], kind))
        if lits and is_empty(clause_box(lits)):
            return noun, list(lits)
    return None


# --- back to text -----------------------------------------------------------------


def render_literal(lit: Literal) -> str:
    atom, positive = lit
    return render_atom(atom) if positive else f"not {render_atom(atom)}"


def render_atom(atom: ast.Atom) -> str:
    if isinstance(atom, ast.Proto):
        return f"proto {atom.proto}"
    if isinstance(atom, ast.Dport):
        return "dport " + _listing([_port(r) for r in atom.ranges])
    if isinstance(atom, ast.Src):
        return "src " + _listing([i.value for i in atom.networks])
    if isinstance(atom, ast.Alpn):
        return "alpn " + _listing([_quote(i.value) for i in atom.protocols])
    return f"sni {atom.op} " + _listing([_quote(i.value) for i in atom.patterns])


def _port(r: ast.PortRange) -> str:
    return str(r.lo) if r.lo == r.hi else f"{r.lo}..{r.hi}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "[" + ", ".join(items) + "]"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def atoms_of(cond: ast.Cond | None):
    """Every atom of a condition, in source order, without recursion."""
    stack = [cond] if cond is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Not):
            stack.append(node.operand)
        elif isinstance(node, (ast.And, ast.Or)):
            stack.extend(reversed(node.operands))
        else:
            yield node
