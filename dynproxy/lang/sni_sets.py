"""Sets of server names (SNI) for the linter's analysis, with a sound emptiness test.

A set is `nosni` (does it hold connections without SNI?) plus a names part: the
host names that match some pattern of every group and none of `exclude`. That form
is closed under intersection and lets a difference be written as a few such sets,
which is all the box algebra in lang.boxes needs.

Emptiness is exact for what operators write (exact names, suffixes) by direct
reasoning, and for prefixes and globs by a bounded search over the product of the
patterns' automata; when the bound is hit the answer is UNKNOWN, which callers must
read as "maybe not empty" so that no warning is ever claimed without proof.
Only real host names count: labels of one or more characters joined by single dots
(the ClientHello parser refuses anything else). No I/O.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

from dynproxy.lang.sni_search import UNKNOWN, search_witness
from dynproxy.lang.values import glob_fixed_suffix, glob_regex

Pattern = tuple[str, str]  # (op, normalised value): ("suffix", ".example.com")

EMPTY = "empty"
NONEMPTY = "nonempty"

MAX_COMBINATIONS = 256
_CACHE_LIMIT = 200_000


@dataclass(frozen=True, slots=True)
class SniSet:
    nosni: bool
    groups: tuple[frozenset[Pattern], ...] = ()
    exclude: frozenset[Pattern] = frozenset()

    @property
    def has_no_names(self) -> bool:
        return any(not g for g in self.groups)


SNI_ALL = SniSet(True)
NO_SNI_ONLY = SniSet(True, (frozenset(),))


def sni_atom(patterns: frozenset[Pattern], positive: bool) -> SniSet:
    """`sni OP [..]` holds for names matching a pattern; `not sni ..` also for no SNI."""
    if positive:
        return SniSet(False, (patterns,))
    return SniSet(True, (), patterns)


def sni_intersect(a: SniSet, b: SniSet) -> SniSet:
    groups = a.groups + tuple(g for g in b.groups if g not in a.groups)
    return SniSet(a.nosni and b.nosni, groups, a.exclude | b.exclude)


def sni_minus(r: SniSet, e: SniSet) -> list[SniSet]:
    """Sets whose union is r minus e (they may overlap; none is known to be empty)."""
    pieces = []
    if not r.has_no_names and (e.groups or e.exclude):
        pieces += [SniSet(False, r.groups, r.exclude | g) for g in e.groups]
        if e.exclude:
            pieces.append(SniSet(False, r.groups + (e.exclude,), r.exclude))
    if r.nosni and not e.nosni:
        pieces.append(NO_SNI_ONLY)
    return pieces


def sni_status(s: SniSet) -> str:
    if s.nosni:
        return NONEMPTY
    return names_status(s.groups, s.exclude)


def names_status(groups, exclude) -> str:
    witness = names_witness(groups, exclude)
    if witness is UNKNOWN:
        return UNKNOWN
    return EMPTY if witness is None else NONEMPTY


_witness_cache: dict = {}


def names_witness(groups: tuple[frozenset[Pattern], ...], exclude: frozenset[Pattern]):
    """A host name in the names part, None if there is none, or UNKNOWN."""
    key = (groups, exclude)
    if key in _witness_cache:
        return _witness_cache[key]
    if len(_witness_cache) > _CACHE_LIMIT:
        _witness_cache.clear()
    result = _find_witness(groups, exclude)
    _witness_cache[key] = result
    return result


def _find_witness(groups, exclude):
    if any(not g for g in groups):
        return None
    if len(groups) == 1 and not exclude:  # one atom's patterns: any example of them
        found = next((n for n in map(_example, sorted(groups[0])) if n and _is_host(n)), None)
        if found is not None:
            return found
    exact_groups = [g for g in groups if all(op == "exact" for op, _ in g)]
    if exact_groups:
        smallest = min(exact_groups, key=len)
        return _first_member(sorted(v for _, v in smallest), groups, exclude)
    if all(op in ("exact", "suffix") for g in (*groups, exclude) for op, _ in g):
        return _suffix_witness(groups, exclude)
    found = _first_member(_examples(groups), groups, exclude)
    if found is not None:
        return found
    if _plainly_empty(groups, exclude):
        return None
    return search_witness(groups, exclude)


def _first_member(names, groups, exclude):
    for name in names:
        if is_member(name, groups, exclude):
            return name
    return None


def is_member(name: str, groups, exclude) -> bool:
    return all(any(matches(p, name) for p in g) for g in groups) and not any(
        matches(p, name) for p in exclude
    )


def matches(pattern: Pattern, name: str) -> bool:
    op, value = pattern
    if op == "exact":
        return name == value
    if op == "suffix":
        return name.endswith(value)
    if op == "prefix":
        return name.startswith(value)
    return _glob(value).fullmatch(name) is not None


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern:
    return re.compile(glob_regex(pattern))


# --- quick answers before a search ----------------------------------------------


def _examples(groups) -> list[str]:
    """Likely members: one name per pattern, and prefixes joined to the others' names."""
    patterns = [p for g in groups for p in g]
    names = [n for n in (_example(p) for p in patterns) if n]
    prefixes = [v for op, v in patterns if op == "prefix"]
    names += [pre + n for pre in prefixes for n in names if not n.startswith(pre)]
    return [n for n in names if _is_host(n)]


def _example(pattern: Pattern) -> str | None:
    op, value = pattern
    if op == "suffix":
        return "x" + value
    if op == "prefix":
        return value + "x"
    if op == "glob":
        return ".".join("x" if "*" in lb else lb.replace("?", "x") for lb in value.split("."))
    return value


def _is_host(name: str) -> bool:
    return bool(name) and name[0] != "." and name[-1] != "." and ".." not in name


def _plainly_empty(groups, exclude) -> bool:
    """Provably empty by pattern structure alone (False means: not known)."""
    for g in groups:
        if all(any(pattern_inside(p, q) for q in exclude) for p in g):
            return True
    return any(
        all(patterns_disjoint(p, q) for p in g1 for q in g2)
        for i, g1 in enumerate(groups) for g2 in groups[i + 1:]
    )


def pattern_inside(p: Pattern, q: Pattern) -> bool:
    """Is every name matching p also matching q? (False: not known.)"""
    (pop, pv), (qop, qv) = p, q
    if pop == "exact":
        return matches(q, pv)
    if qop == "suffix" and pop in ("suffix", "glob"):
        tail = pv if pop == "suffix" else glob_fixed_suffix(pv)
        return bool(tail) and tail.endswith(qv)
    if qop == pop == "prefix":
        return pv.startswith(qv)
    return p == q


def patterns_disjoint(p: Pattern, q: Pattern) -> bool:
    """Can no name match both? (False: not known.) Names end with a glob's fixed tail."""
    if p[0] == "exact" or q[0] == "exact":
        value, other = (p[1], q) if p[0] == "exact" else (q[1], p)
        return not matches(other, value)
    if p[0] == q[0] == "prefix":
        return not (p[1].startswith(q[1]) or q[1].startswith(p[1]))
    tails = [v if op == "suffix" else glob_fixed_suffix(v) if op == "glob" else ""
             for op, v in (p, q)]
    if not all(tails):
        return False
    return not (tails[0].endswith(tails[1]) or tails[1].endswith(tails[0]))


# --- exact names and suffixes: decided directly ----------------------------------


def _suffix_witness(groups, exclude):
    """Each group is exact names and suffixes; the set is empty iff every choice is."""
    if not groups:
        return _fresh_name("", groups, exclude)
    choices = itertools.islice(itertools.product(*(sorted(g) for g in groups)), MAX_COMBINATIONS + 1)
    unknown = False
    for n, choice in enumerate(choices):
        if n == MAX_COMBINATIONS:
            unknown = True
            break
        found = _choice_witness(choice, groups, exclude)
        if found is not None:
            return found
    return UNKNOWN if unknown else None


def _choice_witness(choice, groups, exclude):
    names = [v for op, v in choice if op == "exact"]
    if names:
        return _first_member(names[:1], groups, exclude)
    longest = max((v for _, v in choice), key=len)
    if not all(longest.endswith(v) for _, v in choice):
        return None  # two suffixes that are not nested share no name
    if any(op == "suffix" and longest.endswith(v) for op, v in exclude):
        return None
    return _fresh_name(longest, groups, exclude)


def _fresh_name(suffix: str, groups, exclude):
    """A name `LABEL` + suffix outside the excluded exact names (there are finitely many)."""
    for n in range(len(exclude) + 2):
        name = f"x{n or ''}{suffix}" if suffix else f"x{n or ''}"
        if is_member(name, groups, exclude):
            return name
    return UNKNOWN
