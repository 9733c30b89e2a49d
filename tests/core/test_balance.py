"""Load-balancing strategies: exact wrr sequences, least_conn spread, consistent hashing."""

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest

from dynproxy.core.balance import (
    ConsistentHash,
    LeastConnections,
    SmoothWeightedRoundRobin,
    make_balancer,
    stable_hash64,
)


@dataclass
class Member:
    id: str
    weight: int = 1
    available: bool = True
    active: int = 0


def members(**weights):
    return [Member(name, weight) for name, weight in weights.items()]


def picks(balancer, candidates, n, **kwargs):
    return [balancer.pick(candidates, **kwargs).id for _ in range(n)]


# --- make_balancer --------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, key, cls, text",
    [
        ("wrr", None, SmoothWeightedRoundRobin, "wrr"),
        ("least_conn", None, LeastConnections, "least_conn"),
        ("hash", "src", ConsistentHash, "hash(src)"),
        ("hash", "sni", ConsistentHash, "hash(sni)"),
    ],
)
def test_make_balancer_by_name(kind, key, cls, text):
    balancer = make_balancer(kind, key)
    assert type(balancer) is cls
    assert str(balancer) == text


def test_make_balancer_returns_fresh_state():
    assert make_balancer("wrr") is not make_balancer("wrr")


@pytest.mark.parametrize(
    "kind, key, fragment",
    [
        ("round_robin", None, "'round_robin'"),
        ("hash", None, "None"),
        ("hash", "dst", "'dst'"),
        ("wrr", "src", "'src'"),
        ("least_conn", "sni", "'sni'"),
    ],
)
def test_make_balancer_errors_name_the_bad_value(kind, key, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        make_balancer(kind, key)


# --- behaviour common to every strategy ------------------------------------------------

ALL_KINDS = [("wrr", None), ("least_conn", None), ("hash", "src")]


@pytest.mark.parametrize("kind, key", ALL_KINDS)
@pytest.mark.parametrize("hash_key", [None, "10.0.0.1"])
def test_nothing_eligible_gives_none(kind, key, hash_key):
    balancer = make_balancer(kind, key)
    assert balancer.pick([], hash_key=hash_key) is None
    down = [Member("a", 1, available=False), Member("b", 0), Member("c", 2)]
    assert balancer.pick(down, hash_key=hash_key, exclude={"c"}) is None


@pytest.mark.parametrize("kind, key", ALL_KINDS)
@pytest.mark.parametrize("hash_key", [None, "10.0.0.1"])
def test_only_eligible_members_are_picked(kind, key, hash_key):
    balancer = make_balancer(kind, key)
    pool = [Member("down", 5, available=False), Member("zero", 0), Member("tried", 5),
            Member("ok", 1)]
    for _ in range(50):
        assert balancer.pick(pool, hash_key=hash_key, exclude=frozenset({"tried"})).id == "ok"


@pytest.mark.parametrize("kind, key", ALL_KINDS)
def test_exclude_walks_through_every_member_for_retries(kind, key):
    balancer = make_balancer(kind, key)
    pool = members(a=1, b=2, c=3)
    tried = set()
    for _ in range(3):
        chosen = balancer.pick(pool, hash_key="198.51.100.7", exclude=tried)
        assert chosen is not None and chosen.id not in tried
        tried.add(chosen.id)
    assert tried == {"a", "b", "c"}
    assert balancer.pick(pool, hash_key="198.51.100.7", exclude=tried) is None


# --- smooth weighted round robin -------------------------------------------------------

def test_wrr_is_smooth_like_nginx():
    assert picks(SmoothWeightedRoundRobin(), members(a=3, b=1), 8) == list("aabaaaba")
    # nginx's own documented example: weights 5, 1, 1 -> a a b a c a a
    assert picks(SmoothWeightedRoundRobin(), members(a=5, b=1, c=1), 7) == list("aabacaa")


def test_wrr_ratios_are_exact_over_full_cycles():
    counts = Counter(picks(SmoothWeightedRoundRobin(), members(a=3, b=1), 4000))
    assert counts == {"a": 3000, "b": 1000}
    counts = Counter(picks(SmoothWeightedRoundRobin(), members(a=7, b=2, c=1, d=0), 1000))
    assert counts == {"a": 700, "b": 200, "c": 100}


def test_wrr_every_window_of_one_cycle_is_exact():
    sequence = picks(SmoothWeightedRoundRobin(), members(a=5, b=3, c=2), 100)
    for start in range(0, 100, 10):
        assert Counter(sequence[start:start + 10]) == {"a": 5, "b": 3, "c": 2}


def test_wrr_survives_a_changing_member_list():
    balancer = SmoothWeightedRoundRobin()
    pool = members(a=1, b=1)
    assert picks(balancer, pool, 3) == ["a", "b", "a"]
    grown = pool + [Member("c", 1)]  # c starts at score 0; a and b keep theirs
    assert Counter(picks(balancer, grown, 300)) == {"a": 100, "b": 100, "c": 100}
    shrunk = [Member("c", 1), Member("d", 3)]  # a and b vanish and are forgotten
    assert Counter(picks(balancer, shrunk, 400)) == {"c": 100, "d": 300}
    assert set(balancer._score) == {"c", "d"}


def test_wrr_down_member_keeps_its_place_and_others_share():
    balancer = SmoothWeightedRoundRobin()
    pool = members(a=1, b=1, c=2)
    pool[2].available = False
    assert Counter(picks(balancer, pool, 100)) == {"a": 50, "b": 50}
    pool[2].available = True
    assert Counter(picks(balancer, pool, 400)) == {"a": 100, "b": 100, "c": 200}


def test_wrr_forgets_ids_that_are_listed_no_more():
    balancer = SmoothWeightedRoundRobin()
    for generation in range(100):
        pool = [Member(f"m{generation}-{i}") for i in range(3)]
        balancer.pick(pool)
    assert len(balancer._score) <= 3


# --- least connections -----------------------------------------------------------------

def test_least_conn_prefers_lowest_active_per_weight():
    pool = [Member("a", 1, active=3), Member("b", 2, active=5), Member("c", 4, active=9)]
    # per weight: a 3.0, b 2.5, c 2.25
    assert LeastConnections().pick(pool).id == "c"


def test_least_conn_spreads_held_connections_by_weight():
    balancer = LeastConnections()
    pool = members(a=1, b=1, c=2)
    for _ in range(400):
        balancer.pick(pool).active += 1
    assert [m.active for m in pool] == [100, 100, 200]


def test_least_conn_equal_members_take_turns():
    balancer = LeastConnections()
    pool = members(a=1, b=1, c=1)  # short connections: active stays 0
    assert picks(balancer, pool, 9) == list("abcabcabc")


def test_least_conn_turns_skip_ineligible_members():
    balancer = LeastConnections()
    pool = members(a=1, b=1, c=1, d=1)
    pool[1].available = False
    assert Counter(picks(balancer, pool, 200, exclude={"d"})) == {"a": 100, "c": 100}


def test_least_conn_releases_go_to_the_least_loaded():
    balancer = LeastConnections()
    pool = [Member("a", active=10), Member("b", active=10), Member("c", active=2)]
    assert picks(balancer, pool, 1) == ["c"]


# --- consistent hashing ----------------------------------------------------------------

def _assignment(balancer, pool, keys, **kwargs):
    return {k: balancer.pick(pool, hash_key=k, **kwargs).id for k in keys}


KEYS = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(10_000)]


def test_hash_same_key_same_member():
    balancer = ConsistentHash("src")
    pool = members(a=1, b=1, c=1)
    assert len({balancer.pick(pool, hash_key="203.0.113.9").id for _ in range(20)}) == 1


def test_hash_is_stable_across_processes():
    # Python's hash() is salted per process; workers must agree on placement.
    code = (
        "from dynproxy.core.balance import ConsistentHash, stable_hash64\n"
        "from types import SimpleNamespace as M\n"
        "pool = [M(id=f'm{i}', weight=1, available=True, active=0) for i in range(10)]\n"
        "b = ConsistentHash('src')\n"
        "print(stable_hash64('x'), [b.pick(pool, hash_key=f'k{i}').id for i in range(50)])\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    pool = [Member(f"m{i}") for i in range(10)]
    balancer = ConsistentHash("src")
    local = [balancer.pick(pool, hash_key=f"k{i}").id for i in range(50)]
    assert outputs.pop() == f"{stable_hash64('x')} {local}\n"


def test_hash_known_value():
    # blake2b, 8-byte digest, little endian: pinned so a change of hash is noticed
    assert stable_hash64("") == int.from_bytes(bytes.fromhex("e4a6a0577479b2b4"), "little")


def test_hash_spreads_keys_evenly():
    counts = Counter(_assignment(ConsistentHash("src"), members(**{f"m{i}": 1 for i in range(10)}),
                                 KEYS).values())
    assert len(counts) == 10
    assert all(600 <= n <= 1400 for n in counts.values()), counts


def test_hash_follows_weights():
    counts = Counter(_assignment(ConsistentHash("src"), members(a=3, b=1), KEYS).values())
    assert 2.4 <= counts["a"] / counts["b"] <= 3.6, counts


def test_hash_large_weights_keep_the_ring_bounded():
    balancer = ConsistentHash("src")
    balancer.pick(members(a=1000, b=500, c=1), hash_key="x")
    assert len(balancer._ring) == 160 + 80 + 1


def test_removing_one_member_moves_only_its_keys():
    pool = [Member(f"m{i}") for i in range(10)]
    before = _assignment(ConsistentHash("src"), pool, KEYS)
    removed = "m3"
    after = _assignment(ConsistentHash("src"), [m for m in pool if m.id != removed], KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == removed for k in moved)  # nobody else's clients moved
    assert len(moved) == sum(1 for k in KEYS if before[k] == removed)
    assert 600 <= len(moved) <= 1400  # about a tenth


def test_member_going_down_moves_only_its_keys_and_they_come_back():
    balancer = ConsistentHash("src")
    pool = [Member(f"m{i}") for i in range(10)]
    before = _assignment(balancer, pool, KEYS)
    pool[7].available = False
    during = _assignment(balancer, pool, KEYS)
    moved = {k for k in KEYS if before[k] != during[k]}
    assert moved == {k for k in KEYS if before[k] == "m7"}
    assert "m7" not in during.values()
    pool[7].available = True
    assert _assignment(balancer, pool, KEYS) == before


def test_adding_one_member_takes_keys_only_for_itself():
    pool = [Member(f"m{i}") for i in range(10)]
    before = _assignment(ConsistentHash("src"), pool, KEYS)
    after = _assignment(ConsistentHash("src"), pool + [Member("m10")], KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "m10" for k in moved)
    assert 500 <= len(moved) <= 1300  # about an eleventh


def test_down_member_and_exclude_agree():
    balancer = ConsistentHash("src")
    pool = [Member(f"m{i}") for i in range(5)]
    excluded = _assignment(balancer, pool, KEYS[:2000], exclude={"m2"})
    pool[2].available = False
    assert _assignment(balancer, pool, KEYS[:2000]) == excluded


def test_hash_ring_is_rebuilt_only_when_ids_or_weights_change():
    balancer = ConsistentHash("src")
    pool = members(a=1, b=1)
    balancer.pick(pool, hash_key="k")
    ring = balancer._ring
    pool[0].active, pool[1].available = 5, False  # not part of the ring
    balancer.pick([Member("a"), Member("b")], hash_key="k")  # new objects, same ids
    assert balancer._ring is ring
    balancer.pick(members(a=1, b=2), hash_key="k")
    assert balancer._ring is not ring
    assert len(balancer._ring) == 80 + 160


def test_hash_without_key_falls_back_to_wrr():
    balancer = ConsistentHash("sni")
    assert Counter(picks(balancer, members(a=3, b=1), 400)) == {"a": 300, "b": 100}


def test_hash_weight_zero_member_owns_no_keys():
    pool = members(a=1, b=0, c=1)
    assert "b" not in set(_assignment(ConsistentHash("src"), pool, KEYS[:2000]).values())


def test_hash_placement_ignores_member_order():
    pool = [Member(f"m{i}") for i in range(10)]
    before = _assignment(ConsistentHash("src"), pool, KEYS[:2000])
    assert _assignment(ConsistentHash("src"), pool[::-1], KEYS[:2000]) == before
