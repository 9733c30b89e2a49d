"""Why a connection went where it went: the deciding rule, and why each earlier rule did not match.

`explain(ruleset, conn)` asks the compiled router for the decision (so the answer is
the proxy's own), then walks each earlier rule's condition tree with the same atom
tests the router uses to name the first atom that failed and say why in words, e.g.
`sni suffix ".example.com": 'example.com' is the apex, a suffix needs at least one
more label`. Plugins are never run here: a matching `plugin(NAME)` rule is recorded
as a step and matching goes on as if the plugin had no opinion.

Pure: no I/O, no plugin calls; for the REPL and for tests.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from dynproxy.core.decision import NO_MATCH, Decision
from dynproxy.core.router import Atom, ConnInfo, parse_src
from dynproxy.lang import ast
from dynproxy.lang.compile import cond_atoms
from dynproxy.lang.values import glob_regex


@dataclass(frozen=True, slots=True)
class Reason:
    """One atom that made a rule fail: where it is, how it reads, and why."""

    pos: ast.Pos
    condition: str  # the atom as written, with "not " when it had to be false
    why: str

    def __str__(self) -> str:
        return f"{self.condition}: {self.why}"


@dataclass(frozen=True, slots=True)
class Skip:
    """An earlier rule that did not match (1-based `number` in decision order)."""

    number: int
    rule: ast.Rule
    reasons: tuple[Reason, ...]  # one for a failed `and`, one per branch of a failed `or`

    def __str__(self) -> str:
        where = self.reasons[0].pos if self.reasons else self.rule.pos
        return f"{where.file}:{where.line}: " + "; ".join(map(str, self.reasons))


@dataclass(frozen=True, slots=True)
class Step:
    """A rule that matched: a plugin rule (assumed to have no opinion) or the decider."""

    number: int
    rule: ast.Rule
    decision: Decision

    @property
    def is_plugin(self) -> bool:
        return self.decision.action == "plugin"


@dataclass(frozen=True, slots=True)
class Explanation:
    conn: ConnInfo
    steps: tuple[Step, ...]  # matched rules in order; all but a deciding last one are plugins
    skipped: tuple[Skip, ...]  # every rule before the last step (or all rules) that failed

    @property
    def deciding(self) -> Step | None:
        """The rule whose action is taken when every plugin has no opinion."""
        return self.steps[-1] if self.steps and not self.steps[-1].is_plugin else None

    @property
    def decision(self) -> Decision:
        deciding = self.deciding
        return deciding.decision if deciding else NO_MATCH

    @property
    def plugins(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.is_plugin)


def explain(ruleset, conn: ConnInfo) -> Explanation:
    """Explain `ruleset`'s decision for `conn` (a ConnInfo with the SNI normalised)."""
    rules = ruleset.rules
    steps: list[Step] = []
    skipped: list[Skip] = []
    start, ip = 0, parse_src(conn.src)
    while start < len(rules):
        decision = ruleset.decide_conn(conn, start)
        end = decision.rule.index if decision.rule else len(rules)
        skipped += (skip(i + 1, rules[i], conn, ip) for i in range(start, end))
        if decision.rule is None:
            break
        steps.append(Step(end + 1, rules[end], decision))
        if decision.action != "plugin":
            break
        start = end + 1
    return Explanation(conn, tuple(steps), tuple(skipped))


def skip(number: int, rule: ast.Rule, conn: ConnInfo, ip=None) -> Skip:
    """Why `rule` does not match `conn`; `ip` is parse_src(conn.src), passed to save work."""
    reasons = why_false(rule.cond, conn, ip) if rule.cond is not None else []
    if not reasons:  # the router and this walk disagree: say so rather than hide it
        reasons = [Reason(rule.pos, "internal", "the router skipped this rule although its "
                          "condition holds; please report this")]
    return Skip(number, rule, tuple(reasons))


# --- walking a condition ------------------------------------------------------------


def holds(cond: ast.Cond, conn: ConnInfo, ip) -> bool:
    if isinstance(cond, ast.Not):
        return not holds(cond.operand, conn, ip)
    if isinstance(cond, ast.And):
        return all(holds(c, conn, ip) for c in cond.operands)
    if isinstance(cond, ast.Or):
        return any(holds(c, conn, ip) for c in cond.operands)
    return any(a.test(conn, ip) for a in _atoms(cond))


def why_false(cond: ast.Cond, conn: ConnInfo, ip) -> list[Reason]:
    """The atoms that make `cond` false (empty when it holds)."""
    if holds(cond, conn, ip):
        return []
    if isinstance(cond, ast.Not):
        return why_true(cond.operand, conn, ip, negated=True)
    if isinstance(cond, ast.And):
        first = next(c for c in cond.operands if not holds(c, conn, ip))
        return why_false(first, conn, ip)
    if isinstance(cond, ast.Or):
        return [r for c in cond.operands for r in why_false(c, conn, ip)]
    return [Reason(cond.pos, atom_text(cond), _false_reason(cond, conn, ip))]


def why_true(cond: ast.Cond, conn: ConnInfo, ip, negated: bool = False) -> list[Reason]:
    """The atoms that make `cond` true (for a `not` that failed)."""
    if isinstance(cond, ast.Not):
        return why_false(cond.operand, conn, ip)
    if isinstance(cond, ast.And):
        return [r for c in cond.operands for r in why_true(c, conn, ip, negated)]
    if isinstance(cond, ast.Or):
        first = next(c for c in cond.operands if holds(c, conn, ip))
        return why_true(first, conn, ip, negated)
    text = ("not " if negated else "") + atom_text(cond)
    return [Reason(cond.pos, text, _true_reason(cond, conn, ip))]


def iter_atoms(cond: ast.Cond | None):
    """Every atom of a condition, left to right (none for `default`)."""
    if isinstance(cond, ast.Not):
        yield from iter_atoms(cond.operand)
    elif isinstance(cond, (ast.And, ast.Or)):
        for operand in cond.operands:
            yield from iter_atoms(operand)
    elif cond is not None:
        yield cond


@functools.lru_cache(maxsize=65536)
def _atoms(cond: ast.Atom) -> tuple[Atom, ...]:
    return tuple(cond_atoms(cond))


# --- reasons, per dimension -----------------------------------------------------------

NO_SNI = "the connection has no SNI (not TLS or UDP)"


def _false_reason(cond: ast.Atom, conn: ConnInfo, ip) -> str:
    if isinstance(cond, ast.Sni):
        return NO_SNI if conn.sni is None else _sni_miss(cond.op, _atoms(cond), conn.sni)
    if isinstance(cond, ast.Src):
        if ip is None:
            return "no valid source address was given" if conn.src else \
                "no source address was given"
        return f"{ip} is not in {_one_of(str(a.key) for a in _atoms(cond))}"
    if isinstance(cond, ast.Dport):
        return "no destination port was given" if conn.dport is None else \
            f"the connection's port is {conn.dport}"
    if isinstance(cond, ast.Proto):
        return f"the connection is {conn.proto}"
    if not conn.alpn:
        return "the connection offers no ALPN"
    return f"the client offers {_all_of(conn.alpn)}, none of them listed"


def _true_reason(cond: ast.Atom, conn: ConnInfo, ip) -> str:
    hit = next(a for a in _atoms(cond) if a.test(conn, ip))
    if isinstance(cond, ast.Sni):
        verb = {"exact": "is", "suffix": "ends in", "prefix": "starts with",
                "glob": "matches"}[cond.op]
        return f"the SNI {conn.sni!r} {verb} {_pattern(hit)!r}"
    if isinstance(cond, ast.Src):
        return f"{ip} is in {hit.key}"
    if isinstance(cond, ast.Dport):
        return f"the connection's port is {conn.dport}"
    if isinstance(cond, ast.Proto):
        return f"the connection is {conn.proto}"
    return f"the client offers {hit.key!r}"


def _sni_miss(op: str, atoms: tuple[Atom, ...], sni: str) -> str:
    patterns = [_pattern(a) for a in atoms]
    quoted = [repr(p) for p in patterns]
    if op == "exact":
        return f"the SNI is {sni!r}"
    if op == "suffix":
        if any(p[1:] == sni for p in patterns):
            return f"{sni!r} is the apex, a suffix needs at least one more label"
        return f"{sni!r} does not end in {_one_of(quoted)}"
    if op == "prefix":
        return f"{sni!r} does not start with {_one_of(quoted)}"
    for p in patterns:
        if "*" in p and _matches_with_deep_stars(p, sni):
            return (f"{sni!r} has more labels than {p!r} allows "
                    "('*' is exactly one label, '**' one or more)")
    return f"{sni!r} does not match {_one_of(quoted)}"


def _matches_with_deep_stars(pattern: str, sni: str) -> bool:
    deep = ".".join("**" if label == "*" else label for label in pattern.split("."))
    return re.fullmatch(glob_regex(deep), sni) is not None


def _pattern(atom: Atom) -> str:
    return atom.key[0] if atom.kind == "glob" else atom.key


def _one_of(texts) -> str:
    texts = list(texts)
    return texts[0] if len(texts) == 1 else "any of " + ", ".join(texts)


def _all_of(values) -> str:
    return ", ".join(repr(v) for v in values)


# --- atoms as written -------------------------------------------------------------------


def atom_text(cond: ast.Atom) -> str:
    """An atom in rule syntax, e.g. `sni suffix ".example.com"` or `dport [53, 5000..5010]`."""
    if isinstance(cond, ast.Sni):
        return f"sni {cond.op} {_set(quote_string(i.value) for i in cond.patterns)}"
    if isinstance(cond, ast.Src):
        return f"src {_set(i.value for i in cond.networks)}"
    if isinstance(cond, ast.Dport):
        return f"dport {_set(_port(r) for r in cond.ranges)}"
    if isinstance(cond, ast.Proto):
        return f"proto {cond.proto}"
    return f"alpn {_set(quote_string(i.value) for i in cond.protocols)}"


def _set(values) -> str:
    values = list(values)
    return values[0] if len(values) == 1 else "[" + ", ".join(values) + "]"


def quote_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _port(r: ast.PortRange) -> str:
    return str(r.lo) if r.lo == r.hi else f"{r.lo}..{r.hi}"
