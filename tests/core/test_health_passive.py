"""Live-traffic health (`health.passive_fall`): its own count, apart from the active
checks' rise/fall, in HealthState and in a Topology's members."""

from __future__ import annotations

import pytest

from dynproxy.core.health import HealthState, Transition
from dynproxy.core.topology import Topology
from dynproxy.lang import load_text


def passive(state: HealthState, results: str, passive_fall: int) -> list:
    return [state.record_passive(r == "+", passive_fall, "refused") for r in results]


@pytest.mark.parametrize("passive_fall", [1, 2, 5])
def test_exactly_passive_fall_failures_mark_down(passive_fall):
    state = HealthState(rise=2, fall=3)
    out = passive(state, "-" * passive_fall, passive_fall)
    assert out[:-1] == [None] * (passive_fall - 1)
    assert out[-1] == Transition(False, f"{passive_fall} consecutive failure"
                                        f"{'s' if passive_fall > 1 else ''} in live traffic, "
                                        "the last: refused")
    assert not state.up and state.passive_failures == 0


def test_zero_never_marks_down_but_still_counts():
    state = HealthState(fall=1)
    assert passive(state, "-" * 50, 0) == [None] * 50
    assert state.up and state.passive_failures == 50


def test_a_success_resets_the_count():
    state = HealthState()
    assert passive(state, "--+--", 3) == [None] * 5
    assert state.up and state.passive_failures == 2
    assert state.record_passive(False, 3) is not None


def test_passive_and_active_counts_do_not_mix():
    state = HealthState(rise=2, fall=3)
    state.record(False, "probe")
    state.record(False, "probe")  # two active failures: one more flips it
    assert passive(state, "-", 3) == [None]  # a live failure is not the third
    assert state.up and (state.consecutive, state.passive_failures) == (2, 1)
    assert state.record(True) is None  # an active success resets only the active count
    assert (state.consecutive, state.passive_failures) == (0, 1)
    assert passive(state, "--", 3)[-1] is not None  # 3 live failures in a row: down


def test_a_live_success_brings_back_only_when_allowed():
    state = HealthState(rise=3)
    passive(state, "-", 1)
    assert state.record_passive(True, 1, may_rise=False) is None and not state.up
    assert state.record_passive(True, 1, "connected") == Transition(True, "connected")
    assert state.up


def test_failures_while_down_count_nothing():
    state = HealthState()
    passive(state, "-", 1)
    assert passive(state, "---", 1) == [None] * 3
    assert state.passive_failures == 0 and not state.up


def test_an_active_flip_resets_the_live_count():
    state = HealthState(rise=1, fall=1)
    passive(state, "--", 3)
    state.record(False)
    assert (state.up, state.passive_failures) == (False, 0)


RULES = """
backend a 127.0.0.1:9001
backend b 127.0.0.1:9002
pool checked { member a
               health tcp every 2s rise 2 fall 5 }
default -> lb(a, b)
"""


def test_members_go_down_after_passive_fall_whatever_the_pool_fall():
    rules = load_text(RULES)
    topo = Topology(rules.backends, rules.pools)
    a, b = topo.members["a"], topo.members["b"]
    assert (a.health.fall, a.actively_checked, b.actively_checked) == (5, True, False)
    for member in (a, b):
        assert member.record_passive(False, 2, "refused") is None
        assert member.record_passive(False, 2, "refused").up is False
        assert not member.available
    # the unchecked one is tried again after its rest; a success brings it back at once
    b.retry_at = 0.0
    assert b.available and b.record_passive(True, 2, "connected").up is True
    # the checked one waits for its checks (rise 2 from the active side)
    assert a.record_passive(True, 2, "connected") is None and not a.health.up
    a.record(True)
    assert a.record(True).up is True
