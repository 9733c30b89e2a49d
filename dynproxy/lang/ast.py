"""The rule language's syntax tree: frozen dataclasses that carry their source position.

Every node knows the file, line and column it came from, so that any later stage
(linter, compiler, REPL, a running proxy's logs) can point back at the source.
Values here are as written (strings, ints); validation and normalisation happen in
lang.checks, never here. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True, slots=True)
class Pos:
    """A span in a source file; lines and columns count from 1, end is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Ref:
    """A name that refers to a backend, pool, plugin or certificate."""

    name: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class Item:
    """One element of a bracketed set: a string, an address or a protocol name."""

    value: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class Endpoint:
    """HOST:PORT as written; host is unbracketed for IPv6."""

    host: str
    port: int
    pos: Pos

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- declarations ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendTls:
    """Re-encrypt to the backend: verify against `ca` (system store when None)."""

    ca: str | None
    sni: str | None
    verify: bool
    pos: Pos


@dataclass(frozen=True, slots=True)
class BackendDecl:
    name: str
    name_pos: Pos
    endpoint: Endpoint
    weight: int | None
    send_proxy: str | None  # "v1" | "v2"
    tls: BackendTls | None
    pos: Pos


@dataclass(frozen=True, slots=True)
class Member:
    """A pool member: a declared backend (ref) or an inline endpoint."""

    ref: Ref | None
    endpoint: Endpoint | None
    weight: int | None
    pos: Pos


@dataclass(frozen=True, slots=True)
class RedisMembers:
    """`members from redis "GLOB"`: keys <prefix>backends:<name> whose name matches."""

    pattern: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class HealthCheck:
    kind: str  # "tcp" | "tls"
    interval: float | None  # seconds; None = default
    timeout: float | None
    rise: int | None
    fall: int | None
    send: str | None
    expect: str | None
    pos: Pos


@dataclass(frozen=True, slots=True)
class Algo:
    kind: str  # "wrr" | "least_conn" | "hash"
    key: str | None  # "src" | "sni" for hash
    pos: Pos

    def __str__(self) -> str:
        return f"hash({self.key})" if self.kind == "hash" else self.kind


@dataclass(frozen=True, slots=True)
class PoolDecl:
    name: str
    name_pos: Pos
    members: tuple[Member, ...]
    redis: tuple[RedisMembers, ...]
    health: HealthCheck | None
    balance: Algo | None
    fallback: Ref | None
    pos: Pos


@dataclass(frozen=True, slots=True)
class Include:
    pattern: str
    pos: Pos


# --- conditions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sni:
    op: str  # "exact" | "prefix" | "suffix" | "glob"
    patterns: tuple[Item, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Src:
    networks: tuple[Item, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class PortRange:
    lo: int
    hi: int
    pos: Pos


@dataclass(frozen=True, slots=True)
class Dport:
    ranges: tuple[PortRange, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Proto:
    proto: str  # "tcp" | "udp"
    pos: Pos


@dataclass(frozen=True, slots=True)
class Alpn:
    protocols: tuple[Item, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Not:
    operand: Cond
    pos: Pos


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Cond, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Cond, ...]
    pos: Pos


Atom = Union[Sni, Src, Dport, Proto, Alpn]
Cond = Union[Atom, Not, And, Or]


# --- actions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    target: Ref
    pos: Pos


@dataclass(frozen=True, slots=True)
class LbTarget:
    ref: Ref
    weight: int | None  # None: weight 1
    pos: Pos


@dataclass(frozen=True, slots=True)
class Lb:
    targets: tuple[LbTarget, ...]
    algo: Algo | None  # None: wrr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Reject:
    pos: Pos


@dataclass(frozen=True, slots=True)
class Terminate:
    cert: Ref | None
    alpn: tuple[Item, ...] | None
    then: Forward | Lb
    pos: Pos


@dataclass(frozen=True, slots=True)
class Plugin:
    name: Ref
    pos: Pos


Action = Union[Forward, Lb, Reject, Terminate, Plugin]


# --- rules and files ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule; `cond` is None for `default`. `text` is the rule as written."""

    name: str | None
    name_pos: Pos | None
    cond: Cond | None
    action: Action
    text: str
    pos: Pos

    @property
    def is_default(self) -> bool:
        return self.cond is None

    @property
    def label(self) -> str:
        """How diagnostics and logs name the rule: its name, else file:line."""
        return self.name or f"{self.pos.file}:{self.pos.line}"


Decl = Union[BackendDecl, PoolDecl]
FileItem = Union[Include, BackendDecl, PoolDecl, Rule]


@dataclass(frozen=True, slots=True)
class RuleFile:
    """One parsed file, items in file order (includes not yet expanded)."""

    path: str
    items: tuple[FileItem, ...]


@dataclass(frozen=True)
class Program:
    """A root file with its includes spliced in: what the linter and compiler see.

    `rules` are in decision order (includes spliced where they stand); `sources`
    maps every file read to its text, for diagnostics.
    """

    root: str
    backends: tuple[BackendDecl, ...]
    pools: tuple[PoolDecl, ...]
    rules: tuple[Rule, ...]
    includes: tuple[Include, ...]
    sources: dict[str, str] = field(default_factory=dict, compare=False)
