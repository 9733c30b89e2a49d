"""Runtime topology: shared members, per-pool weights, pool health settings, picking."""

from collections import Counter

from dynproxy.core.topology import Topology
from dynproxy.lang import load_text

RULES = """
backend a 127.0.0.1:9001
backend b 127.0.0.1:9002
pool heavy-a { member a weight 3
               member b weight 1
               health tcp every 2s rise 5 fall 4 }
pool heavy-b { member a weight 1
               member b weight 3 }
rule one: sni exact "one.test" -> forward(heavy-a)
rule two: sni exact "two.test" -> forward(heavy-b)
default -> lb(a:1, b:1)
"""


def topology(previous=None):
    rules = load_text(RULES)
    return rules, Topology(rules.backends, rules.pools, previous)


def picks(topo, rules, sni, n=8):
    decision = rules.decide(sni=sni)
    return Counter(topo.pick(decision, None, frozenset()).id for _ in range(n))


def test_a_backend_in_two_pools_has_a_weight_per_pool_and_one_state():
    rules, topo = topology()
    assert picks(topo, rules, "one.test") == {"a": 6, "b": 2}
    assert picks(topo, rules, "two.test") == {"a": 2, "b": 6}
    assert topo.pools["heavy-a"].members[0] is topo.pools["heavy-b"].members[0]
    view = topo.snapshot()["pools"]
    assert [m["weight"] for m in view["heavy-a"]["members"]] == [3, 1]
    assert [m["weight"] for m in view["heavy-b"]["members"]] == [1, 3]


def test_the_pool_health_line_sets_rise_and_fall_of_declared_backends():
    _, topo = topology()
    assert (topo.members["a"].health.rise, topo.members["a"].health.fall) == (5, 4)
    assert topo.members["a"].actively_checked


def test_a_down_member_is_skipped_and_state_survives_a_reload():
    rules, topo = topology()
    for _ in range(4):
        topo.members["a"].record(False, "refused")
    assert not topo.members["a"].available
    assert picks(topo, rules, "one.test") == {"b": 8}
    _, again = topology(previous=topo)
    assert again.members["a"] is topo.members["a"] and not again.members["a"].available


def test_a_pool_with_every_member_down_hands_over_to_its_fallback():
    rules = load_text("backend a 127.0.0.1:1\nbackend b 127.0.0.1:2\n"
                      "pool p { member a\n fallback q }\npool q { member b }\n"
                      "default -> forward(p)\n")
    topo = Topology(rules.backends, rules.pools)
    decision = rules.decide(dport=443)
    for _ in range(3):
        topo.members["a"].record(False, "refused")
    assert topo.pick(decision, None, frozenset()).id == "b"
    for _ in range(3):
        topo.members["b"].record(False, "refused")
    assert topo.pick(decision, None, frozenset()) is None  # then: no backend (rejected)
