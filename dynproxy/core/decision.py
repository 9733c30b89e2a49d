"""What the router answers, and the resolved backends and pools it points at.

Decisions are built once per rule when a rule set is compiled and shared by every
connection that rule decides (no allocation per decision). Pure values, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RuleRef:
    """The deciding rule, for logs, metrics and the REPL."""

    index: int
    name: str | None
    file: str
    line: int
    col: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def label(self) -> str:
        """Bounded metric label: the rule's name, else file:line."""
        return self.name or self.where


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # a backend or pool name
    weight: int


@dataclass(frozen=True, slots=True)
class TerminateSpec:
    cert: str | None  # certificate NAME from the config; None = choose by SNI
    alpn: tuple[str, ...]  # protocols the rule allows; () = those of the config


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "forward" | "lb" | "reject" | "plugin"
    targets: tuple[Target, ...] = ()
    algo: str = "wrr"  # "wrr" | "least_conn" | "hash"
    hash_key: str | None = None  # "src" | "sni" when algo == "hash"
    terminate: TerminateSpec | None = None
    plugin: str | None = None
    rule: RuleRef | None = None  # None: no rule matched (implicit reject)

    @property
    def rejects(self) -> bool:
        return self.action == "reject"

    def describe(self) -> str:
        if self.action == "reject":
            return "reject"
        if self.action == "plugin":
            return f"plugin({self.plugin})"
        inner = ", ".join(f"{t.name}:{t.weight}" if self.action == "lb" else t.name
                          for t in self.targets)
        if self.action == "lb" and self.algo != "wrr":
            inner += f", algo={self.algo}" + (f"({self.hash_key})" if self.hash_key else "")
        text = f"{self.action}({inner})"
        if self.terminate:
            cert = f" cert {self.terminate.cert}" if self.terminate.cert else ""
            text = f"terminate tls{cert} then {text}"
        return text


NO_MATCH = Decision("reject")


@dataclass(frozen=True, slots=True)
class BackendTlsSpec:
    ca: str | None
    sni: str | None
    verify: bool


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    host: str
    port: int
    weight: int = 1
    send_proxy: str | None = None  # "v1" | "v2"
    tls: BackendTlsSpec | None = None
    source: str = "rules"  # "rules" | "redis"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthSpec:
    kind: str  # "tcp" | "tls"
    interval: float
    timeout: float
    rise: int
    fall: int
    send: bytes | None = None
    expect: bytes | None = None


@dataclass(frozen=True, slots=True)
class MemberSpec:
    backend: BackendSpec
    weight: int


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    members: tuple[MemberSpec, ...]
    redis_patterns: tuple[str, ...]
    health: HealthSpec | None
    algo: str = "wrr"
    hash_key: str | None = None
    fallback: str | None = None
