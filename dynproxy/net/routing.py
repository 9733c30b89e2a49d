"""Deciding where a connection goes: the compiled rules, plus routing plugins.

A `plugin(NAME)` rule asks the plugin; `None` (no opinion), an error, a timeout or
a nonsense answer all continue with the next rule, counted and logged once per
interval. Plugins run in the connection's greenlet under a deadline and may do
cooperative I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gevent

from dynproxy.core.decision import Decision
from dynproxy.core.router import ConnInfo
from dynproxy.net.dial import hash_source
from dynproxy.obs.log import log_once_per

log = logging.getLogger("dynproxy.routing")
PLUGIN_DEADLINE = 0.5  # seconds


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What a plugin sees: the connection's facts and the rule that called it."""

    conn: ConnInfo
    rule: object  # core.decision.RuleRef
    snapshot: object  # net.state.Snapshot (rules, topology, config)


class DecisionFacts:
    """What the connection path needs of a decision, worked out once per decision:
    its proxy_routing_decisions_total cell, the deciding rule's file:line, and what its
    balancers hash."""

    __slots__ = ("decision", "metrics", "counter", "where", "hashed")

    def __init__(self, decision: Decision, metrics, topology) -> None:
        rule = decision.rule
        self.decision, self.metrics = decision, metrics
        self.counter = metrics.batch.cell(metrics.routing_decisions_total,
                                          rule.label if rule else "none", decision.action)
        self.where = rule.where if rule else None
        # what the balancers hash (net.dial.hash_source): fixed by the decision's rule set
        self.hashed = hash_source(decision, topology) if decision.targets else None


# id(decision) -> its facts; each entry holds its decision, so the id cannot be reused
# while it is here. Decisions live in rule sets (a plugin may answer new ones): bounded.
_FACTS: dict[int, DecisionFacts] = {}
_FACTS_MAX = 4096


def route(snap, conn: ConnInfo, metrics) -> Decision:
    return route_facts(snap, conn, metrics).decision


def route_facts(snap, conn: ConnInfo, metrics) -> DecisionFacts:
    """The decision for `conn` (plugins asked as the rules say), counted, with its facts."""
    rules = snap.rules
    decision = rules.decide_conn(conn)
    while decision.action == "plugin":
        answer = ask_plugin(snap, decision, conn, metrics)
        if answer is not None:
            decision = answer
            break
        decision = rules.decide_conn(conn, decision.rule.index + 1)
    facts = _FACTS.get(id(decision))
    if facts is None or facts.metrics is not metrics:
        if len(_FACTS) >= _FACTS_MAX:
            _FACTS.clear()
        facts = _FACTS[id(decision)] = DecisionFacts(decision, metrics, snap.topology)
    facts.counter.inc()
    return facts


def ask_plugin(snap, decision: Decision, conn: ConnInfo, metrics) -> Decision | None:
    name = decision.plugin
    plugin = snap.plugins.get(name)
    if plugin is None:
        return _plugin_failed(metrics, name, "unavailable", "plugin %r is not loaded", name)
    try:
        with gevent.Timeout(PLUGIN_DEADLINE):
            answer = plugin.route(RouteContext(conn, decision.rule, snap))
    except gevent.Timeout:
        return _plugin_failed(metrics, name, "timeout", "plugin %r took longer than %ss",
                              name, PLUGIN_DEADLINE)
    except Exception as exc:  # noqa: BLE001 - a plugin must never take the connection down
        return _plugin_failed(metrics, name, "exception", "plugin %r raised %r", name, exc)
    if answer is None:
        return None
    if not isinstance(answer, Decision) or not _known_targets(snap, answer):
        return _plugin_failed(metrics, name, "bad_answer", "plugin %r answered %r", name, answer)
    return answer if answer.rule is not None else _with_rule(answer, decision)


def _known_targets(snap, answer: Decision) -> bool:
    topo = snap.topology
    return answer.action == "reject" or (
        bool(answer.targets) and answer.action in ("forward", "lb")
        and all(t.name in topo.backends or t.name in topo.pools or t.name in topo.members
                for t in answer.targets)
    )


def _with_rule(answer: Decision, asked: Decision) -> Decision:
    return Decision(answer.action, answer.targets, answer.algo, answer.hash_key,
                    answer.terminate, None, asked.rule)


def _plugin_failed(metrics, name, reason, msg, *args) -> None:
    metrics.plugin_errors_total.labels(name, reason).inc()
    log_once_per(f"plugin-{name}-{reason}", 10.0, msg, *args)
    return None
