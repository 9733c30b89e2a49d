"""What a worker serves with: one immutable snapshot (rules, topology, settings) behind
one reference, so a reload is a single assignment and a connection keeps the snapshot
it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynproxy.core.topology import Topology
from dynproxy.lang import RuleSet
from dynproxy.lang.peek import PeekPolicy


@dataclass(frozen=True)
class Snapshot:
    rules: RuleSet
    topology: Topology
    config: Any  # dynproxy.core.config.Config
    generation: int
    needs_peek: bool  # some rule looks at SNI or ALPN, or terminates TLS (on some port)
    plugins: dict = field(default_factory=dict)  # name -> plugin object with route(ctx)
    tls: Any = None  # net.tls.CertStore when TLS termination is configured
    peek: PeekPolicy | None = None  # per listener port: see lang.peek

    def peek_on(self, port: int) -> bool:
        """Wait for the ClientHello on this local port? (see lang.peek)"""
        return self.peek.needed(port) if self.peek is not None else self.needs_peek


def rules_need_peek(rules: RuleSet) -> bool:
    """Some rule, on some port, needs the ClientHello."""
    return PeekPolicy(rules).anywhere


class Serving:
    """The current snapshot; `swap` replaces it (build-then-swap reload)."""

    def __init__(self, snapshot: Snapshot):
        self.current = snapshot

    def swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot
