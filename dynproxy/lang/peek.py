"""Which listener ports need the ClientHello before a decision can be made.

Waiting for a client's first bytes is free for TLS but costs a server-speaks-first
protocol (SMTP, MySQL, SSH banners) the whole ClientHello timeout. So the proxy peeks
on a port only when some rule that can match there looks at SNI or ALPN, terminates
TLS, asks a plugin, or hashes on SNI. "Can match there" is decided with three-valued
logic: `proto` and `dport` are known for a listener, everything else is unknown.
No I/O.
"""

from __future__ import annotations

from dynproxy.lang import ast


class PeekPolicy:
    """`needed(port)`: must a TCP connection on this local port be peeked at?"""

    def __init__(self, rules):
        self._rules = [r for i, r in enumerate(rules.rules) if _rule_needs_hello(rules, i, r)]
        self._by_port: dict[int, bool] = {}

    @property
    def anywhere(self) -> bool:
        return bool(self._rules)

    def needed(self, port: int) -> bool:
        known = self._by_port.get(port)
        if known is None:
            known = any(_maybe(r.cond, port) is not False for r in self._rules)
            self._by_port[port] = known
        return known


def _rule_needs_hello(rules, index: int, rule: ast.Rule) -> bool:
    if _uses_hello(rule.cond) or isinstance(rule.action, (ast.Terminate, ast.Plugin)):
        return True
    decision = rules.decisions[index]
    pools = rules.pools
    return decision.hash_key == "sni" or any(
        t.name in pools and pools[t.name].hash_key == "sni" for t in decision.targets
    )


def _uses_hello(cond) -> bool:
    if isinstance(cond, (ast.Sni, ast.Alpn)):
        return True
    if isinstance(cond, ast.Not):
        return _uses_hello(cond.operand)
    if isinstance(cond, (ast.And, ast.Or)):
        return any(_uses_hello(c) for c in cond.operands)
    return False


def _maybe(cond, port: int) -> bool | None:
    """Kleene evaluation for a TCP connection on `port`: True, False, or None (unknown)."""
    if cond is None:
        return True
    if isinstance(cond, ast.Proto):
        return cond.proto == "tcp"
    if isinstance(cond, ast.Dport):
        return any(r.lo <= port <= r.hi for r in cond.ranges)
    if isinstance(cond, ast.Not):
        inner = _maybe(cond.operand, port)
        return None if inner is None else not inner
    if isinstance(cond, ast.And):
        values = [_maybe(c, port) for c in cond.operands]
        return False if False in values else (True if all(values) else None)
    if isinstance(cond, ast.Or):
        values = [_maybe(c, port) for c in cond.operands]
        return True if True in values else (False if all(v is False for v in values) else None)
    return None
