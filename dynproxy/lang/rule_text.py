"""Rules and their parts as short text for the linter's messages. No I/O."""

from __future__ import annotations

from dynproxy.lang import ast
from dynproxy.lang.clauses import Clause, render_literal, why_empty

MAX_TEXT = 120


def one_line(text: str) -> str:
    """A rule's source on one line, shortened for a note."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_TEXT else flat[: MAX_TEXT - 3] + "..."


def reason_text(clause: Clause) -> str:
    """Why a clause matches nothing, quoting the literals that exclude each other."""
    found = why_empty(clause)
    if found is None:
        return "its parts exclude each other"
    noun, lits = found
    quoted = [f"`{render_literal(lit)}`" for lit in lits]
    if len(quoted) == 1:
        return f"{quoted[0]} matches no {noun}"
    if len(quoted) == 2:
        return f"no {noun} satisfies both {quoted[0]} and {quoted[1]}"
    return f"no {noun} satisfies all of {', '.join(quoted[:-1])} and {quoted[-1]}"


def sni_group_text(group) -> str:
    """`sni OP "VALUE"` (or a bracketed list) for one group of patterns."""
    ops = sorted({op for op, _ in group})
    values = [f'"{v}"' for _, v in sorted(group)]
    listing = values[0] if len(values) == 1 else "[" + ", ".join(values) + "]"
    return f"sni {ops[0]} {listing}" if len(ops) == 1 else f"sni {listing}"


def action_key(action: ast.Action) -> str:
    """What an action does, without positions; equal keys mean the same decision."""
    if isinstance(action, ast.Forward):
        return f"forward({action.target.name})"
    if isinstance(action, ast.Lb):
        if len(action.targets) == 1 and action.algo is None:
            return f"forward({action.targets[0].ref.name})"
        targets = ",".join(f"{t.ref.name}:{1 if t.weight is None else t.weight}"
                           for t in action.targets)
        return f"lb({targets},algo={action.algo or 'wrr'})"
    if isinstance(action, ast.Terminate):
        cert = action.cert.name if action.cert else ""
        alpn = ",".join(i.value for i in action.alpn or ())
        return f"terminate(cert={cert},alpn={alpn})->{action_key(action.then)}"
    if isinstance(action, ast.Plugin):
        return f"plugin({action.name.name})"
    return "reject"
