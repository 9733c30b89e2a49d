"""Program (AST) -> router clauses, per-rule decisions, and resolved backends and pools.

Assumes the program linted without errors (names resolve, values are valid); the
public entry point lang.load() guarantees that. Conditions become DNF clauses for
core.router; a condition whose DNF would exceed MAX_CLAUSES becomes one opaque
clause checked by a closure. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynproxy.core.decision import (
    BackendSpec,
    BackendTlsSpec,
    Decision,
    HealthSpec,
    MemberSpec,
    PoolSpec,
    RuleRef,
    Target,
    TerminateSpec,
)
from dynproxy.core.router import Atom, Clause, ConnInfo, Literal, Router, glob_atom, parse_src
from dynproxy.lang import ast
from dynproxy.lang.values import (
    glob_fixed_suffix,
    glob_regex,
    parse_network,
    parse_sni_pattern,
)

MAX_CLAUSES = 64
DEFAULT_HEALTH = {"interval": 2.0, "timeout": 1.0, "rise": 2, "fall": 3}


class _TooManyClauses(Exception):
    pass


@dataclass(frozen=True)
class Compiled:
    router: Router
    decisions: tuple[Decision, ...]  # per rule index
    backends: dict[str, BackendSpec]
    pools: dict[str, PoolSpec]


def compile_program(program: ast.Program, health_defaults: dict | None = None) -> Compiled:
    clauses: list[Clause] = []
    for index, rule in enumerate(program.rules):
        clauses += rule_clauses(index, rule.cond)
    router = Router(clauses, len(program.rules), glob_fixed_suffix)
    decisions = tuple(rule_decision(i, r) for i, r in enumerate(program.rules))
    backends = {b.name: backend_spec(b) for b in program.backends}
    defaults = {**DEFAULT_HEALTH, **(health_defaults or {})}
    pools = {p.name: pool_spec(p, backends, defaults) for p in program.pools}
    return Compiled(router, decisions, backends, pools)


# --- conditions -> clauses -------------------------------------------------------


def rule_clauses(index: int, cond: ast.Cond | None) -> list[Clause]:
    if cond is None:
        return [Clause(index, (), ())]
    try:
        terms = _dnf(cond, False)
    except _TooManyClauses:
        check = cond_closure(cond)
        return [Clause(index, (), (), check=check)]
    return [Clause(index, tuple(pos), tuple(neg)) for pos, neg in terms]


def _dnf(cond, negated: bool) -> list[tuple[frozenset, frozenset]]:
    if isinstance(cond, ast.Not):
        return _dnf(cond.operand, not negated)
    if isinstance(cond, (ast.And, ast.Or)):
        parts = [_dnf(c, negated) for c in cond.operands]
        conjunctive = isinstance(cond, ast.And) != negated
        return _product(parts) if conjunctive else _concat(parts)
    lit = atom_literal(cond)
    return [(frozenset(), frozenset([lit]))] if negated else [(frozenset([lit]), frozenset())]


def _concat(parts):
    out = [term for part in parts for term in part]
    if len(out) > MAX_CLAUSES:
        raise _TooManyClauses
    return out


def _product(parts):
    out = [(frozenset(), frozenset())]
    for part in parts:
        out = [(p1 | p2, n1 | n2) for p1, n1 in out for p2, n2 in part if not (p1 | p2) & (n1 | n2)]
        if len(out) > MAX_CLAUSES:
            raise _TooManyClauses
    return out


def atom_literal(cond: ast.Atom) -> Literal:
    return Literal(frozenset(cond_atoms(cond)))


def cond_atoms(cond: ast.Atom) -> list[Atom]:
    """The router atoms of one AST condition atom (a set gives several)."""
    if isinstance(cond, ast.Sni):
        values = [parse_sni_pattern(cond.op, item.value) for item in cond.patterns]
        if cond.op == "glob":
            return [glob_atom(v, glob_regex(v)) for v in values]
        return [Atom("sni", cond.op, v) for v in values]
    if isinstance(cond, ast.Src):
        return [Atom("src", "net", parse_network(i.value)) for i in cond.networks]
    if isinstance(cond, ast.Dport):
        return [Atom("dport", "range", (r.lo, r.hi)) for r in cond.ranges]
    if isinstance(cond, ast.Proto):
        return [Atom("proto", "proto", cond.proto)]
    if isinstance(cond, ast.Alpn):
        return [Atom("alpn", "alpn", i.value) for i in cond.protocols]
    raise TypeError(f"not a condition atom: {cond!r}")


def cond_closure(cond):
    """A direct evaluator for a condition: used when DNF would be too large."""
    if isinstance(cond, ast.Not):
        inner = cond_closure(cond.operand)
        return lambda conn, ip=None: not inner(conn, ip)
    if isinstance(cond, (ast.And, ast.Or)):
        parts = [cond_closure(c) for c in cond.operands]
        combine = all if isinstance(cond, ast.And) else any
        return lambda conn, ip=None: combine(p(conn, ip) for p in parts)
    atoms = cond_atoms(cond)

    def check(conn: ConnInfo, ip=None) -> bool:
        ip = ip if ip is not None else parse_src(conn.src)
        return any(a.test(conn, ip) for a in atoms)

    return check


# --- actions -> decisions ------------------------------------------------------------


def rule_ref(index: int, rule: ast.Rule) -> RuleRef:
    return RuleRef(index, rule.name, rule.pos.file, rule.pos.line, rule.pos.col, rule.text)


def rule_decision(index: int, rule: ast.Rule) -> Decision:
    return action_decision(rule.action, rule_ref(index, rule))


def action_decision(action: ast.Action, ref: RuleRef | None) -> Decision:
    if isinstance(action, ast.Reject):
        return Decision("reject", rule=ref)
    if isinstance(action, ast.Plugin):
        return Decision("plugin", plugin=action.name.name, rule=ref)
    if isinstance(action, ast.Forward):
        return Decision("forward", (Target(action.target.name, 1),), rule=ref)
    if isinstance(action, ast.Lb):
        targets = tuple(Target(t.ref.name, 1 if t.weight is None else t.weight)
                        for t in action.targets)
        algo = action.algo
        return Decision("lb", targets, algo.kind if algo else "wrr",
                        algo.key if algo else None, rule=ref)
    inner = action_decision(action.then, ref)
    spec = TerminateSpec(
        action.cert.name if action.cert else None,
        tuple(i.value for i in action.alpn or ()),
    )
    return Decision(inner.action, inner.targets, inner.algo, inner.hash_key, spec, rule=ref)


# --- declarations -> specs -------------------------------------------------------------


def backend_spec(decl: ast.BackendDecl) -> BackendSpec:
    tls = decl.tls
    return BackendSpec(
        name=decl.name,
        host=decl.endpoint.host,
        port=decl.endpoint.port,
        weight=1 if decl.weight is None else decl.weight,
        send_proxy=decl.send_proxy,
        tls=BackendTlsSpec(tls.ca, tls.sni, tls.verify) if tls else None,
    )


def pool_spec(decl: ast.PoolDecl, backends: dict[str, BackendSpec], defaults: dict) -> PoolSpec:
    members = []
    for m in decl.members:
        if m.ref is not None:
            backend = backends[m.ref.name]
            weight = backend.weight if m.weight is None else m.weight
        else:
            backend = BackendSpec(str(m.endpoint), m.endpoint.host, m.endpoint.port)
            weight = 1 if m.weight is None else m.weight
        members.append(MemberSpec(backend, weight))
    algo = decl.balance
    return PoolSpec(
        name=decl.name,
        members=tuple(members),
        redis_patterns=tuple(r.pattern for r in decl.redis),
        health=health_spec(decl.health, defaults) if decl.health else None,
        algo=algo.kind if algo else "wrr",
        hash_key=algo.key if algo else None,
        fallback=decl.fallback.name if decl.fallback else None,
    )


def health_spec(h: ast.HealthCheck, defaults: dict) -> HealthSpec:
    def pick(name):
        value = getattr(h, name)
        return defaults[name] if value is None else value

    return HealthSpec(
        kind=h.kind,
        interval=pick("interval"),
        timeout=pick("timeout"),
        rise=pick("rise"),
        fall=pick("fall"),
        send=h.send.encode("latin-1") if h.send is not None else None,
        expect=h.expect.encode("latin-1") if h.expect is not None else None,
    )
