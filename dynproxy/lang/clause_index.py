"""An index of earlier rules' boxes, so each rule is compared only with rules it can meet.

Linting 100,000 rules must stay near-linear. Each indexed box goes into a bucket by
the dimensions where it does NOT hold a "generic" value (no SNI, no ALPN offer, a
port and a source address no rule mentions): a box that holds the generic value
everywhere but in SNI lives in the SNI bucket, and so on. Within a bucket, boxes are
keyed by exact names, suffixes, glob suffixes, prefixes, ports and address blocks.

A query returns a superset of the indexed boxes that can intersect the query box,
minus a few rare pairings it skips on purpose (a suffix or glob query is not matched
against prefixes that its names may merely start with). Leaving a box out only ever costs a warning, never
invents one; None means "too many to look at". No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dynproxy.lang.boxes import Box, iv_contains, iv_size, src_contains
from dynproxy.lang.values import glob_fixed_suffix

SNI, PORT, SRC, ALPN = 1, 2, 4, 8
DIMS = (SNI, PORT, SRC, ALPN)
MAX_PORT_KEYS = 64
MAX_PORT_PROBES = 1024
MAX_BLOCK_PROBES = 256
START_LENGTHS = (3, 4, 5, 6, 8, 12)


@dataclass(frozen=True, slots=True)
class Generic:
    """Values no rule mentions; a box holding one is 'broad' in that dimension."""

    port: int | None
    src: tuple[int, int] | None  # (version, integer address)

    def mask(self, box: Box) -> int:
        m = SNI if box.sni.nosni else 0
        if self.port is not None and iv_contains(box.ports, self.port):
            m |= PORT
        if self.src is not None and src_contains(box.src, self.src):
            m |= SRC
        return m | (ALPN if box.alpn.holds_no_offer else 0)


@dataclass(frozen=True, slots=True)
class Entry:
    ident: int  # order of insertion = rule order
    rule: int
    box: Box


def dot_suffixes(name: str) -> list[str]:
    """'a.b.com' -> ['.b.com', '.com']; '.b.com' -> ['.b.com', '.com']."""
    out, i = [], name.find(".")
    while i != -1:
        out.append(name[i:])
        i = name.find(".", i + 1)
    return out


class _Keys:
    """key -> entries, plus entries that fit no key (always candidates)."""

    def __init__(self) -> None:
        self.by_key: dict = {}
        self.wide: list[Entry] = []

    def add(self, key, entry: Entry) -> None:
        self.by_key.setdefault(key, []).append(entry)

    def get(self, keys) -> list[Entry]:
        out = list(self.wide)
        for key in keys:
            out += self.by_key.get(key, ())
        return out


class _SniKeys(_Keys):
    def add_entry(self, entry: Entry) -> None:
        group = entry.box.sni.groups[0] if entry.box.sni.groups else None
        if group is None:
            self.wide.append(entry)
            return
        for op, value in group:
            self._add_pattern(op, value, entry)

    def _add_pattern(self, op: str, value: str, entry: Entry) -> None:
        if op == "glob":
            fixed = glob_fixed_suffix(value)
            if fixed == "." + value:
                op = "exact"
            elif not fixed:
                self.wide.append(entry)
                return
            else:
                op, value = "globsuffix", fixed
        if op == "prefix":
            self.add(("prefix", value), entry)
            self._add_starts(value, entry)
            self.add("all-prefixes", entry)
            return
        self.add((op, value), entry)
        for key in dot_suffixes(value):
            self.add(("under", key), entry)
        if op == "exact":
            self._add_starts(value, entry)

    def _add_starts(self, value: str, entry: Entry) -> None:
        """Key names and prefixes by how they start, for prefix queries."""
        for k in START_LENGTHS:
            if len(value) >= k:
                self.add(("starts", value[:k]), entry)

    def probe(self, box: Box) -> list[Entry] | None:
        if not box.sni.groups:
            return None
        keys: list = []
        for op, value in box.sni.groups[0]:
            more = self._probe_keys(op, value)
            if more is None:
                return None
            keys += more
        return self.get(keys)

    def _probe_keys(self, op: str, value: str) -> list | None:
        keys: list = []
        if op == "glob":
            fixed = glob_fixed_suffix(value)
            head = re.split(r"[*?]", value, maxsplit=1)[0]
            keys += self._prefix_ancestors(head)  # a glob like "api.*.com" may sit in a prefix
            if not fixed:
                return None
            op, value = ("exact", value) if fixed == "." + value else ("suffix", fixed)
        if op == "exact":
            return keys + [("exact", value)] + self._ancestors(dot_suffixes(value)) \
                + self._prefix_ancestors(value)
        if op == "suffix":
            return keys + self._ancestors(dot_suffixes(value)) + [("under", value)]
        fitting = [k for k in START_LENGTHS if k <= len(value)]
        if not fitting:
            return None
        return [("starts", value[: fitting[-1]])] + self._prefix_ancestors(value)

    def _prefix_ancestors(self, value: str) -> list:
        if "all-prefixes" not in self.by_key:
            return []
        return [("prefix", value[:k]) for k in range(1, len(value) + 1)]

    @staticmethod
    def _ancestors(suffixes: list[str]) -> list:
        return [(op, s) for s in suffixes for op in ("suffix", "globsuffix")]


class _PortKeys(_Keys):
    def add_entry(self, entry: Entry) -> None:
        ports = entry.box.ports
        if iv_size(ports) > MAX_PORT_KEYS:
            self.wide.append(entry)
            return
        for lo, hi in ports:
            for port in range(lo, hi + 1):
                self.add(port, entry)

    def probe(self, box: Box) -> list[Entry] | None:
        if iv_size(box.ports) > MAX_PORT_PROBES:
            return None
        return self.get(p for lo, hi in box.ports for p in range(lo, hi + 1))


# Address blocks as shifts: a /16 (IPv4) or /48 (IPv6) when a range fits in one,
# else a /8 or /32; wider ranges are not keyed.
_BLOCKS = {4: (16, 24), 6: (80, 96)}


class _SrcKeys(_Keys):
    def add_entry(self, entry: Entry) -> None:
        for version, ivs in ((4, entry.box.src.v4), (6, entry.box.src.v6)):
            for lo, hi in ivs:
                key = self._block(version, lo, hi)
                if key is None:
                    self.wide.append(entry)
                    return
                self.add(key, entry)

    @staticmethod
    def _block(version: int, lo: int, hi: int):
        for shift in _BLOCKS[version]:
            if lo >> shift == hi >> shift:
                return (version, shift, lo >> shift)
        return None

    def probe(self, box: Box) -> list[Entry] | None:
        keys: list = []
        for version, ivs in ((4, box.src.v4), (6, box.src.v6)):
            for lo, hi in ivs:
                for shift in _BLOCKS[version]:
                    first, last = lo >> shift, hi >> shift
                    if last - first >= MAX_BLOCK_PROBES:
                        return None
                    keys += [(version, shift, b) for b in range(first, last + 1)]
        return self.get(keys)


class _Bucket:
    def __init__(self, mask: int) -> None:
        self.entries: list[Entry] = []
        self.keys = []
        if mask & SNI:
            self.keys.append(_SniKeys())
        if mask & PORT:
            self.keys.append(_PortKeys())
        if mask & SRC:
            self.keys.append(_SrcKeys())

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        for keys in self.keys:
            keys.add_entry(entry)

    def candidates(self, box: Box) -> list[Entry]:
        best = self.entries
        for keys in self.keys:
            found = keys.probe(box)
            if found is not None and len(found) < len(best):
                best = found
        return best


class ClauseIndex:
    def __init__(self, generic: Generic) -> None:
        self.generic = generic
        self.buckets: dict[int, _Bucket] = {}
        self.count = 0

    def add(self, rule: int, box: Box) -> Entry:
        mask = 15 & ~self.generic.mask(box)
        entry = Entry(self.count, rule, box)
        self.count += 1
        bucket = self.buckets.get(mask)
        if bucket is None:
            bucket = self.buckets[mask] = _Bucket(mask)
        bucket.add(entry)
        return entry

    def query(self, box: Box, skip: int = 0, need: int = 0, limit: int = 2048):
        """Entries in rule order from buckets not meeting `skip` and holding all of `need`."""
        seen: dict[int, Entry] = {}
        for mask, bucket in self.buckets.items():
            if mask & skip or (mask & need) != need:
                continue
            found = bucket.candidates(box)
            if len(found) > 2 * limit:
                return None
            for entry in found:
                seen[entry.ident] = entry
            if len(seen) > limit:
                return None
        return [seen[k] for k in sorted(seen)]
