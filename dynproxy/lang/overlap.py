"""W301 (a specific rule behind a broader one) and W302 (overlapping globs).

First match wins in dynproxy, while people coming from nginx or Envoy expect the
most specific server name to win. These checks compare a rule's SNI patterns with
those of earlier deciding rules that it meets and that act differently: either the
rule's names all fall inside the earlier rule's broader pattern (W301), or the two
only partly overlap and one of them is a glob (W302, with a name matching both).
Claims are proved by lang.sni_sets; undecided cases stay silent. No I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynproxy.lang import ast
from dynproxy.lang.boxes import Box, intersect
from dynproxy.lang.clause_index import SNI, ClauseIndex
from dynproxy.lang.diagnostics import Diagnostic, help_, note, warning
from dynproxy.lang.rule_text import one_line, sni_group_text
from dynproxy.lang.sni_sets import EMPTY, NONEMPTY, SniSet, names_witness, sni_minus, sni_status

if TYPE_CHECKING:
    from dynproxy.lang.analysis import Shape

MAX_CANDIDATES = 512
MAX_CHECKED = 64


def overlap_warnings(shape: Shape, index: ClauseIndex, shapes: dict) -> list[Diagnostic]:
    inside, partial = None, None
    for box in shape.boxes:
        if box.sni.nosni or not box.sni.groups:
            continue
        for entry in (index.query(box, need=SNI, limit=MAX_CANDIDATES) or [])[:MAX_CHECKED]:
            other = shapes[entry.rule]
            if other.action == shape.action:
                continue
            kind, witness = relation(box, entry.box)
            if kind == "inside" and inside is None:
                inside = (other.rule, box.sni, entry.box.sni)
            elif kind == "partial" and partial is None:
                partial = (other.rule, box.sni, entry.box.sni, witness)
    out = []
    if inside:
        out.append(_specificity(shape.rule, *inside))
    if partial:
        out.append(_overlapping(shape.rule, *partial))
    return out


def relation(c: Box, e: Box) -> tuple[str | None, str | None]:
    """("inside", None) when c's names lie strictly inside e's broad pattern,
    ("partial", example name) when they only partly overlap and a glob is involved."""
    c_ops, e_ops = _ops(c.sni), _ops(e.sni)
    may_be_inside = bool(e_ops & {"suffix", "prefix", "glob"})
    may_overlap = "glob" in c_ops | e_ops and "prefix" not in c_ops | e_ops
    if not (may_be_inside or may_overlap):
        return None, None
    common = intersect(c, e)
    if common is None or sni_status(common.sni) != NONEMPTY:
        return None, None
    c_out = [sni_status(p) for p in sni_minus(c.sni, e.sni)]
    if may_be_inside and all(s == EMPTY for s in c_out):
        return ("inside", None) if _reaches_beyond(e.sni, c.sni) else (None, None)
    if may_overlap and NONEMPTY in c_out and _reaches_beyond(e.sni, c.sni):
        witness = names_witness(common.sni.groups, common.sni.exclude)
        if isinstance(witness, str) and witness:
            return "partial", witness
    return None, None


def _reaches_beyond(e: SniSet, c: SniSet) -> bool:
    return any(sni_status(p) == NONEMPTY for p in sni_minus(e, c))


def _ops(s: SniSet) -> set[str]:
    return {op for g in s.groups for op, _ in g}


def _sni_pos(rule: ast.Rule) -> ast.Pos:
    stack = [rule.cond]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Sni):
            return node.pos
        if isinstance(node, ast.Not):
            stack.append(node.operand)
        elif isinstance(node, (ast.And, ast.Or)):
            stack.extend(reversed(node.operands))
    return rule.pos


def _move_hint(earlier: ast.Rule, rule: ast.Rule) -> str:
    where = "" if earlier.pos.file == rule.pos.file else f" of {earlier.pos.file}"
    return f"move it above line {earlier.pos.line}{where} if it should win"


def _specificity(rule: ast.Rule, earlier: ast.Rule, mine: SniSet, broad: SniSet) -> Diagnostic:
    return warning(
        "W301",
        f"`{sni_group_text(mine.groups[0])}` is more specific than "
        f"`{sni_group_text(broad.groups[0])}` of the earlier rule at {earlier.pos}, which "
        "acts differently and takes the connections both match (first match wins)",
        _sni_pos(rule),
        note(f"broader rule at {earlier.pos}: {one_line(earlier.text)}"),
        help_(_move_hint(earlier, rule)),
    )


def _overlapping(rule, earlier: ast.Rule, mine: SniSet, theirs: SniSet, witness: str):
    return warning(
        "W302",
        f"`{sni_group_text(mine.groups[0])}` overlaps `{sni_group_text(theirs.groups[0])}` "
        f"of the earlier rule at {earlier.pos}, which acts differently: a name such as "
        f"{witness!r} matches both and goes to the earlier rule",
        _sni_pos(rule),
        note(f"earlier rule at {earlier.pos}: {one_line(earlier.text)}"),
        help_("make the patterns disjoint, or put the rule that should win first"),
    )
