"""UDP session table: lookup, activity order, LRU eviction at capacity, idle expiry."""

import random

import pytest

from dynproxy.core.udp_sessions import SessionTable

A = ("192.0.2.1", 1000)
B = ("192.0.2.2", 2000)
C = ("2001:db8::3", 3000, 0, 0)
D = ("192.0.2.4", 4000)


def test_add_get_len_contains():
    table = SessionTable(capacity=4, idle_timeout=30.0)
    assert len(table) == 0 and table.get(A) is None and A not in table
    assert table.add(A, "sess-a", now=0.0) is None
    assert table.get(A) == "sess-a" and A in table and len(table) == 1
    assert table.get(B) is None


def test_adding_an_existing_address_is_an_error():
    table = SessionTable(4, 30.0)
    table.add(A, "one", 0.0)
    with pytest.raises(ValueError, match=r"\('192.0.2.1', 1000\) already exists"):
        table.add(A, "two", 1.0)
    assert table.get(A) == "one"


def test_full_table_evicts_least_recently_active():
    table = SessionTable(capacity=3, idle_timeout=30.0)
    for now, addr in enumerate((A, B, C)):
        table.add(addr, addr[1], float(now))
    assert table.touch(A, 5.0) is True  # A is now the most recent; B the oldest
    assert table.add(D, 4000, 6.0) == (B, 2000)
    assert len(table) == 3 and B not in table
    assert table.add(B, 2000, 7.0) == (C, 3000)


def test_capacity_one():
    table = SessionTable(1, 30.0)
    assert table.add(A, 1, 0.0) is None
    assert table.add(B, 2, 0.0) == (A, 1)
    assert list(table.pop_all()) == [(B, 2)]


def test_expire_removes_only_sessions_idle_longer_than_the_timeout():
    table = SessionTable(10, idle_timeout=30.0)
    table.add(A, "a", 0.0)
    table.add(B, "b", 10.0)
    table.add(C, "c", 20.0)
    table.touch(A, 25.0)
    assert table.expire(30.0) == []
    assert table.expire(40.0) == []  # B idle exactly 30 s: not longer than the timeout
    assert table.expire(40.5) == [(B, "b")]
    assert table.expire(100.0) == [(C, "c"), (A, "a")]  # in order of last activity
    assert len(table) == 0 and table.expire(1000.0) == []


def test_touch_unknown_session_has_no_effect():
    table = SessionTable(4, 30.0)
    assert table.touch(A, 1.0) is False
    assert len(table) == 0 and A not in table
    table.add(A, "a", 0.0)
    table.expire(31.0)
    assert table.touch(A, 32.0) is False  # a late reply does not resurrect it
    assert A not in table


def test_touch_keeps_a_session_alive():
    table = SessionTable(4, 10.0)
    table.add(A, "a", 0.0)
    for now in range(5, 100, 5):
        table.touch(A, float(now))
        assert table.expire(float(now) + 9.0) == []
    assert table.expire(200.0) == [(A, "a")]


def test_expire_cost_is_proportional_to_what_expires():
    table = SessionTable(20_000, 60.0)
    for i in range(20_000):
        table.add(("10.0.0.1", i), i, float(i) / 1000)  # one per millisecond
    seen = []
    real_items = table._last_active.items

    class Spy:
        """Counts how often expire() looks at the head of the activity order."""

        def __init__(self, od):
            self.od = od

        def __bool__(self):
            return bool(self.od)

        def items(self):
            seen.append(1)
            return real_items()

        def __delitem__(self, key):
            del self.od[key]

    table._last_active = Spy(table._last_active)
    expired = table.expire(60.0 + 0.0095)  # sessions 0..9 are idle > 60 s
    assert [v for _, v in expired] == list(range(10))
    assert len(seen) == 11  # ten removed, one look at the first survivor


def test_next_expiry():
    table = SessionTable(4, 30.0)
    assert table.next_expiry() is None
    table.add(A, "a", 5.0)
    table.add(B, "b", 7.0)
    assert table.next_expiry() == 35.0
    table.touch(A, 8.0)
    assert table.next_expiry() == 37.0
    table.remove(B)
    assert table.next_expiry() == 38.0


def test_remove():
    table = SessionTable(4, 30.0)
    table.add(A, "a", 0.0)
    table.add(B, "b", 1.0)
    assert table.remove(A) == "a"
    assert table.remove(A) is None
    assert A not in table and len(table) == 1
    assert table.expire(100.0) == [(B, "b")]


def test_pop_all_empties_oldest_first():
    table = SessionTable(4, 30.0)
    table.add(A, "a", 0.0)
    table.add(B, "b", 1.0)
    table.touch(A, 2.0)
    assert table.pop_all() == [(B, "b"), (A, "a")]
    assert len(table) == 0 and table.next_expiry() is None


def test_random_operations_agree_with_a_simple_model():
    rng = random.Random(1234)
    table = SessionTable(capacity=8, idle_timeout=5.0)
    model = {}  # addr -> [value, last_active, order]
    clock = 0.0
    for step in range(5000):
        clock += rng.random()
        addr = ("10.0.0.1", rng.randrange(20))
        op = rng.random()
        if op < 0.4:
            if addr in model:
                continue
            evicted = table.add(addr, step, clock)
            if len(model) == 8:
                oldest = min(model, key=lambda a: model[a][2])
                assert evicted == (oldest, model.pop(oldest)[0])
            else:
                assert evicted is None
            model[addr] = [step, clock, step]
        elif op < 0.7:
            assert table.touch(addr, clock) is (addr in model)
            if addr in model:
                model[addr][1:] = [clock, step]
        elif op < 0.8:
            assert table.remove(addr) == model.pop(addr, [None])[0]
        else:
            gone = sorted((m[2], a, m[0]) for a, m in model.items() if clock - m[1] > 5.0)
            assert table.expire(clock) == [(a, v) for _, a, v in gone]
            for _, a, _ in gone:
                del model[a]
        assert len(table) == len(model)
        assert all(table.get(a) == m[0] for a, m in model.items())


@pytest.mark.parametrize("capacity, timeout, fragment", [
    (0, 1.0, "capacity must be an int >= 1, got 0"),
    (1.5, 1.0, "got 1.5"),
    (10, 0, "idle timeout must be > 0 seconds, got 0"),
    (10, -3.0, "got -3.0"),
    (10, float("nan"), "got nan"),
])
def test_bad_settings(capacity, timeout, fragment):
    with pytest.raises(ValueError, match=fragment):
        SessionTable(capacity, timeout)
