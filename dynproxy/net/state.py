"""What a worker serves with: one immutable snapshot (rules, topology, settings) behind
one reference, so a reload is a single assignment and a connection keeps the snapshot
it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynproxy.core.topology import Topology
from dynproxy.lang import RuleSet


@dataclass(frozen=True)
class Snapshot:
    rules: RuleSet
    topology: Topology
    config: Any  # dynproxy.core.config.Config
    generation: int
    needs_peek: bool  # some rule looks at SNI or ALPN, or terminates TLS
    plugins: dict = field(default_factory=dict)  # name -> plugin object with route(ctx)
    tls: Any = None  # net.tls.CertStore when TLS termination is configured


def rules_need_peek(rules: RuleSet) -> bool:
    """Peek at the ClientHello only if a decision can depend on it (saves a wait for
    server-speaks-first protocols such as SMTP or MySQL)."""
    from dynproxy.lang import ast

    def uses(cond) -> bool:
        if isinstance(cond, (ast.Sni, ast.Alpn)):
            return True
        if isinstance(cond, ast.Not):
            return uses(cond.operand)
        if isinstance(cond, (ast.And, ast.Or)):
            return any(uses(c) for c in cond.operands)
        return False

    return any(
        uses(r.cond) or isinstance(r.action, (ast.Terminate, ast.Plugin)) for r in rules.rules
    ) or any(d.hash_key == "sni" for d in rules.decisions) or any(
        p.hash_key == "sni" for p in rules.pools.values()
    )


class Serving:
    """The current snapshot; `swap` replaces it (build-then-swap reload)."""

    def __init__(self, snapshot: Snapshot):
        self.current = snapshot

    def swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot
