"""What the rules do together: conditions that never hold, UDP rules that test TLS
facts, unreachable rules, specific rules behind broad ones, overlapping globs.

Each rule becomes a list of boxes (lang.clauses), one per DNF clause and protocol.
A rule is unreachable when its boxes minus the boxes of every earlier deciding rule
(plugins may pass, so they decide nothing here) leave nothing. Every claim is proved
by the set algebra in lang.boxes; when a question is too costly or undecidable the
linter says nothing. Warnings only: these checks never make a file invalid. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dynproxy.lang import ast
from dynproxy.lang.boxes import (
    ALPN_NONE_OFFERED,
    PORTS_ALL,
    UDP,
    UNIVERSE,
    V4_ALL,
    V6_ALL,
    Box,
    SrcSet,
    difference,
    intersect,
    is_empty,
    iv_complement,
    iv_normalize,
    split_by_proto,
)
from dynproxy.lang.clause_index import ALPN, PORT, SNI, SRC, ClauseIndex, Entry, Generic
from dynproxy.lang.clauses import atom_value, atoms_of, clause_box, to_dnf
from dynproxy.lang.diagnostics import Diagnostic, help_, note, warning
from dynproxy.lang.overlap import overlap_warnings
from dynproxy.lang.rule_text import action_key, one_line, reason_text
from dynproxy.lang.sni_sets import NO_SNI_ONLY

MAX_PIECES = 64
MAX_STEPS = 4000
MAX_LISTED = 3


@dataclass(frozen=True, slots=True)
class Shape:
    """A rule as the analysis sees it."""

    index: int
    rule: ast.Rule
    boxes: tuple[Box, ...]
    decides: bool  # False for plugin actions: the plugin may pass to the next rule
    action: str


def analyze(program: ast.Program, skip: frozenset[int] = frozenset()) -> list[Diagnostic]:
    """W220, W221, W300, W301, W302 for the program's rules (rules in `skip` left out)."""
    diags: list[Diagnostic] = []
    shapes = {}
    for i, rule in enumerate(program.rules):
        if i not in skip:
            shape = _shape(i, rule, diags)
            if shape is not None:
                shapes[i] = shape
    _Reachability(shapes, _generic(program.rules, skip), diags).run()
    return diags


# --- one rule -------------------------------------------------------------------


def _shape(i: int, rule: ast.Rule, diags: list[Diagnostic]) -> Shape | None:
    decides = not isinstance(rule.action, ast.Plugin)
    if rule.cond is None:
        return Shape(i, rule, tuple(split_by_proto(UNIVERSE)), decides, action_key(rule.action))
    clauses = to_dnf(rule.cond)
    if clauses is None:
        return None
    try:
        raw = [(c, clause_box(c)) for c in clauses]
    except ValueError:
        return None
    live = [(c, b) for c, b in raw if not is_empty(b)]
    if not live:
        diags.append(_never_true(rule, [c for c, _ in raw]))
        return None
    if all(b.proto == UDP for _, b in live):
        diags += _tls_facts_on_udp(rule)
    boxes = tuple(nb for _, b in live for nb in split_by_proto(b))
    if not boxes:
        return None
    return Shape(i, rule, boxes, decides, action_key(rule.action))


def _never_true(rule: ast.Rule, clauses) -> Diagnostic:
    reasons = [reason_text(c) for c in clauses]
    if len(reasons) == 1:
        return warning("W220", f"this condition can never be true: {reasons[0]}", rule.cond.pos)
    notes = [note(f"alternative {n}: {r}") for n, r in enumerate(reasons[:MAX_LISTED], 1)]
    return warning(
        "W220",
        f"this condition can never be true: none of its {len(reasons)} alternatives can hold",
        rule.cond.pos,
        *notes,
    )


def _tls_facts_on_udp(rule: ast.Rule) -> list[Diagnostic]:
    out, seen = [], set()
    for atom in atoms_of(rule.cond):
        kind = type(atom)
        if kind in (ast.Sni, ast.Alpn) and kind not in seen:
            seen.add(kind)
            what = "SNI" if kind is ast.Sni else "ALPN"
            out.append(warning(
                "W221", f"`{kind.__name__.lower()}` on a rule that only matches UDP: "
                f"UDP carries no TLS ClientHello, so there is never an {what} to test",
                atom.pos,
            ))
    if isinstance(rule.action, ast.Terminate):
        out.append(warning(
            "W221", "`terminate tls` on a rule that only matches UDP: there is no TLS "
            "to terminate on UDP", rule.action.pos,
        ))
    return out


def _generic(rules, skip) -> Generic:
    """A port and a source address that no atom mentions (indexing hints only)."""
    ports, v4, v6 = [], [], []
    for i, rule in enumerate(rules):
        if i in skip:
            continue
        for atom in atoms_of(rule.cond):
            if isinstance(atom, (ast.Dport, ast.Src)):
                try:
                    value = atom_value(atom)
                except ValueError:
                    continue
                if isinstance(atom, ast.Dport):
                    ports += value
                else:
                    v4 += value.v4
                    v6 += value.v6
    free_ports = iv_complement(iv_normalize(ports), PORTS_ALL)
    free4 = iv_complement(iv_normalize(v4), V4_ALL)
    free6 = iv_complement(iv_normalize(v6), V6_ALL)
    src = (4, free4[0][0]) if free4 else (6, free6[0][0]) if free6 else None
    return Generic(free_ports[0][0] if free_ports else None, src)


# --- rules together -------------------------------------------------------------


class _Reachability:
    def __init__(self, shapes: dict[int, Shape], generic: Generic, diags: list[Diagnostic]):
        self.shapes = shapes
        self.generic = generic
        self.index = ClauseIndex(generic)
        self.diags = diags
        self.default: Shape | None = None

    def run(self) -> None:
        for shape in self.shapes.values():
            if self.default is not None:
                self.diags.append(_after_default(shape.rule, self.default.rule))
                continue
            shadows = self._shadowing_rules(shape)
            if shadows is not None:
                self.diags.append(_unreachable(shape.rule, [self.shapes[i].rule for i in shadows]))
                continue
            self.diags += overlap_warnings(shape, self.index, self.shapes)
            if shape.decides:
                for box in shape.boxes:
                    self.index.add(shape.index, box)
                if shape.rule.is_default:
                    self.default = shape

    def _shadowing_rules(self, shape: Shape) -> list[int] | None:
        """Earlier rules that together take all of `shape`, or None if not provable."""
        used: dict[int, None] = {}
        for box in shape.boxes:
            entries = self._cover(box)
            if entries is None:
                return None
            used.update((e.rule, None) for e in entries)
        return self._fewest(shape, sorted(used))

    def _cover(self, box: Box) -> list[Entry] | None:
        """Entries that together take all of `box`, or None.

        First the cheap necessary test: the slice of `box` that holds the generic
        value wherever `box` does can only be taken by rules broad there too, which
        the index finds without looking at the (many) narrow ones."""
        mask = self.generic.mask(box)
        slice_ = self._generic_slice(box, mask)
        first = self.index.query(box, skip=mask)
        if first is None:
            return None
        covered, used = cover(slice_, first)
        if not covered:
            return None  # some connection in the generic slice reaches this rule
        covered, by_few = cover(box, used)  # usually the same few rules take it all
        if covered:
            return by_few
        every = self.index.query(box)
        if every is None:
            return None
        seen = {e.ident for e in used}
        covered, used = cover(box, used + [e for e in every if e.ident not in seen])
        return used if covered else None

    def _generic_slice(self, box: Box, mask: int) -> Box:
        """The part of `box` with the generic value in each dimension where it has it."""
        g = self.generic
        if mask & SNI:
            box = replace(box, sni=NO_SNI_ONLY)
        if mask & ALPN:
            box = replace(box, alpn=ALPN_NONE_OFFERED)
        if mask & PORT:
            box = replace(box, ports=((g.port, g.port),))
        if mask & SRC:
            version, value = g.src
            point = ((value, value),)
            box = replace(box, src=SrcSet(point, ()) if version == 4 else SrcSet((), point))
        return box

    def _fewest(self, shape: Shape, rules: list[int]) -> list[int]:
        """Drop rules not needed to cover `shape` (small lists only): clearer notes."""
        if len(rules) > 12:
            return rules
        for r in list(reversed(rules)):
            rest = [x for x in rules if x != r]
            if rest and self._covered_by(shape, rest):
                rules = rest
        return rules

    def _covered_by(self, shape: Shape, rules: list[int]) -> bool:
        entries = [Entry(n, r, b) for n, (r, b) in enumerate(
            (r, b) for r in rules for b in self.shapes[r].boxes)]
        return all(cover(box, entries)[0] for box in shape.boxes)


def cover(box: Box, entries: list[Entry]) -> tuple[bool, list[Entry]]:
    """(is `box` inside the union of the entries' boxes, the entries that cut it)."""
    remaining, used, steps = [box], [], 0
    for entry in entries:
        kept, cut = [], False
        for piece in remaining:
            steps += 1
            common = intersect(piece, entry.box)
            if common is None:
                kept.append(piece)
            else:
                cut = True
                kept += difference(piece, entry.box, common)
        if cut:
            used.append(entry)
        remaining = kept
        if not remaining:
            return True, used
        if len(remaining) > MAX_PIECES or steps > MAX_STEPS:
            return False, used
    return False, used


def _after_default(rule: ast.Rule, default: ast.Rule) -> Diagnostic:
    where = "" if default.pos.file == rule.pos.file else f" of {default.pos.file}"
    return warning(
        "W300", f"this rule is unreachable: `default` at {default.pos} comes first and "
        "takes every connection", rule.pos,
        help_(f"move it above line {default.pos.line}{where}, or delete it"),
    )


def _unreachable(rule: ast.Rule, shadows: list[ast.Rule]) -> Diagnostic:
    what = "`default` is never used" if rule.is_default else "this rule is unreachable"
    if len(shadows) == 1:
        return warning(
            "W300", f"{what}: every connection it matches is taken by an earlier rule",
            rule.pos, note(f"shadowed by {shadows[0].pos}: {one_line(shadows[0].text)}"),
        )
    notes = [note(f"shadowed in part by {s.pos}: {one_line(s.text)}") for s in shadows[:MAX_LISTED]]
    if len(shadows) > MAX_LISTED:
        notes.append(note(f"and {len(shadows) - MAX_LISTED} more earlier rule(s)"))
    return warning(
        "W300", f"{what}: every connection it matches is taken by {len(shadows)} earlier "
        "rules together", rule.pos, *notes,
    )
