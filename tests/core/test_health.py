"""Health hysteresis: rise/fall counting, transitions, reasons, jittered intervals."""

import random

import pytest

from dynproxy.core.health import HealthState, Transition, jittered_interval


def feed(state, results):
    """Record results ("+" ok, "-" failure); return the transitions, None where none."""
    return [state.record(r == "+", f"r{i}") for i, r in enumerate(results)]


def test_defaults():
    state = HealthState()
    assert (state.rise, state.fall, state.up, state.consecutive) == (2, 3, True, 0)
    assert state.reason == "initial state"
    assert HealthState(initially_up=False).up is False


def test_goes_down_after_fall_failures_in_a_row():
    state = HealthState(rise=2, fall=3)
    out = feed(state, "---")
    assert out == [None, None, Transition(False, "r2")]
    assert state.up is False and state.reason == "r2" and state.consecutive == 0


def test_comes_back_after_rise_successes_in_a_row():
    state = HealthState(rise=2, fall=3, initially_up=False)
    assert feed(state, "++") == [None, Transition(True, "r1")]
    assert state.up is True


def test_a_success_resets_the_failure_run():
    state = HealthState(rise=2, fall=3)
    assert feed(state, "--+--+--") == [None] * 8
    assert state.up is True
    assert state.consecutive == 2


def test_a_failure_resets_the_success_run():
    state = HealthState(rise=3, fall=1, initially_up=False)
    assert feed(state, "++-++-") == [None] * 6
    assert state.record(True) is None and state.record(True) is None
    assert state.record(True) == Transition(True, "3 consecutive successful checks")


def test_consecutive_counts_progress_towards_a_flip():
    state = HealthState(rise=2, fall=3)
    assert [state.record(ok) or state.consecutive for ok in (True, False, False)] == [0, 1, 2]
    state.record(False)
    assert state.consecutive == 0  # flipped
    state.record(False)
    assert state.consecutive == 0  # agrees with "down"
    state.record(True)
    assert state.consecutive == 1


def test_transition_only_once_per_flip():
    state = HealthState(rise=1, fall=1)
    out = feed(state, "---+++-")
    assert [t.up if t else None for t in out] == [False, None, None, True, None, None, False]


def test_empty_reason_says_how_many_in_a_row():
    state = HealthState(fall=3)
    for _ in range(2):
        state.record(False)
    transition = state.record(False)
    assert transition == Transition(False, "3 consecutive failed checks")
    assert state.reason == transition.reason


def test_failures_of_any_origin_count_towards_fall_in_record():
    state = HealthState(fall=2)
    assert state.record(False, "probe timed out") is None
    assert state.record(False, "connect refused (live traffic)") == Transition(
        False, "connect refused (live traffic)")


def test_truthy_results_are_booleans_in_transitions():
    state = HealthState(rise=1, fall=1)
    assert state.record(0) == Transition(False, "1 consecutive failed checks")
    assert state.record(1).up is True


def test_transition_is_frozen():
    with pytest.raises(AttributeError):
        Transition(True, "x").up = False


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rise": 0}, "rise must be an int >= 1, got 0"),
    ({"fall": -1}, "fall must be an int >= 1, got -1"),
    ({"fall": 2.0}, "got 2.0"),
    ({"rise": "2"}, "got '2'"),
])
def test_bad_thresholds(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        HealthState(**kwargs)


def test_repr_shows_state():
    state = HealthState(initially_up=False)
    assert repr(state) == ("HealthState(down, rise=2, fall=3, consecutive=0, "
                           "reason='initial state')")


class FixedRandom:
    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


@pytest.mark.parametrize("draw, expected", [(0.0, 9.0), (0.5, 10.0), (0.999999, 10.999998)])
def test_jitter_bounds(draw, expected):
    assert jittered_interval(10.0, FixedRandom(draw)) == pytest.approx(expected)


def test_jitter_spreads_within_ten_percent():
    rng = random.Random(7)
    values = [jittered_interval(2.0, rng) for _ in range(2000)]
    assert all(1.8 <= v < 2.2 for v in values)
    assert min(values) < 1.82 and max(values) > 2.18  # uses the whole range
    assert len(set(values)) > 1900


def test_jitter_default_rng():
    assert 0.9 <= jittered_interval(1.0) < 1.1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_jitter_rejects_bad_interval(bad):
    with pytest.raises(ValueError, match="interval must be > 0"):
        jittered_interval(bad, random.Random(1))
