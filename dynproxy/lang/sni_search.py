"""The shortest host name in a set given by name patterns, by a bounded product search.

Each pattern (exact, suffix, prefix, glob) is a small automaton; the search walks
their product breadth-first, together with a two-state automaton for the shape of
a real host name (labels of one or more characters joined by single dots). The
alphabet is the patterns' literal characters, the dot, and one spare character
that stands for every other. Past MAX_STATES the answer is UNKNOWN. No I/O.
"""

from __future__ import annotations

import functools
from collections import deque

UNKNOWN = "unknown"
MAX_STATES = 3000
ANY, NOT_DOT = "\x00any", "\x00notdot"


class Automaton:
    """A nondeterministic automaton as bit masks of states; state 0 starts."""

    __slots__ = ("edges", "accept", "memo")

    def __init__(self, edges: list[list[tuple[str, int]]], accept_state: int):
        self.edges = tuple(tuple(e) for e in edges)
        self.accept = 1 << accept_state
        self.memo: dict[tuple[int, str], int] = {}

    def step(self, mask: int, ch: str) -> int:
        key = (mask, ch)
        out = self.memo.get(key)
        if out is None:
            out = self.memo[key] = self._step(mask, ch)
        return out

    def _step(self, mask: int, ch: str) -> int:
        out, state = 0, 0
        while mask:
            if mask & 1:
                for cls, target in self.edges[state]:
                    if cls == ch or cls == ANY or (cls == NOT_DOT and ch != "."):
                        out |= 1 << target
            mask >>= 1
            state += 1
        return out


@functools.lru_cache(maxsize=8192)
def automaton(pattern: tuple[str, str]) -> Automaton:
    op, value = pattern
    edges: list[list[tuple[str, int]]] = [[]]
    if op == "suffix":
        edges[0].append((ANY, 0))
    if op == "glob":
        _glob_edges(value, edges)
    else:
        for ch in value:
            edges[-1].append((ch, len(edges)))
            edges.append([])
    if op == "prefix":
        edges[-1].append((ANY, len(edges) - 1))
    return Automaton(edges, len(edges) - 1)


def _glob_edges(value: str, edges: list[list[tuple[str, int]]]) -> None:
    """`*` one label, `**` one or more labels, `?` one character other than a dot."""
    for i, label in enumerate(value.split(".")):
        if i:
            edges[-1].append((".", len(edges)))
            edges.append([])
        if label in ("*", "**"):
            entry, inside = len(edges) - 1, len(edges)
            edges[entry].append((NOT_DOT, inside))
            edges.append([(NOT_DOT, inside)] + ([(".", entry)] if label == "**" else []))
            continue
        for ch in label:
            edges[-1].append((NOT_DOT if ch == "?" else ch, len(edges)))
            edges.append([])


def _alphabet(patterns) -> list[str]:
    literal = {ch for _, v in patterns for ch in v if ch not in "*?."}
    spare = next((c for c in "xyzqjkwv0123456789abcdefghilmnoprstu-_" if c not in literal), None)
    return ([spare] if spare else []) + ["."] + sorted(literal)


def search_witness(groups, exclude, max_states: int = MAX_STATES):
    """A name matching a pattern of every group and none of `exclude`; None; or UNKNOWN."""
    patterns = sorted({p for g in groups for p in g} | set(exclude))
    autos = [automaton(p) for p in patterns]
    where = {p: i for i, p in enumerate(patterns)}
    group_idx = [tuple(where[p] for p in g) for g in groups]
    excl_idx = tuple(where[p] for p in exclude)
    accepts = [a.accept for a in autos]
    alphabet = _alphabet(patterns)
    start = (0, tuple(1 for _ in autos))  # host-shape state 0: a label must start
    parent: dict = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        host, masks = state
        if host == 1 and all(any(masks[i] & accepts[i] for i in g) for g in group_idx) \
                and not any(masks[i] & accepts[i] for i in excl_idx):
            return _spell(state, parent)
        for ch in alphabet:
            if ch == "." and host != 1:
                continue  # no empty labels, no leading dot
            nxt = (0 if ch == "." else 1, tuple(a.step(m, ch) for a, m in zip(autos, masks, strict=True)))
            if nxt in parent or any(not any(nxt[1][i] for i in g) for g in group_idx):
                continue
            if len(parent) >= max_states:
                return UNKNOWN
            parent[nxt] = (state, ch)
            queue.append(nxt)
    return None


def _spell(state, parent) -> str:
    chars = []
    while parent[state] is not None:
        state, ch = parent[state]
        chars.append(ch)
    return "".join(reversed(chars))
