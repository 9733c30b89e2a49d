"""Exponential backoff: ceilings, caps, jitter ranges, validation."""

import random

import pytest

from dynproxy.core.backoff import ExponentialBackoff


class FixedRandom:
    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


def test_ceiling_doubles_from_base_up_to_cap():
    backoff = ExponentialBackoff(base=0.5, cap=10.0, jitter="none")
    assert [backoff.compute(n) for n in range(8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_huge_failure_counts_stay_at_cap():
    backoff = ExponentialBackoff(base=0.1, cap=30.0, jitter="none")
    assert backoff.compute(10_000) == 30.0
    assert backoff.compute(10**18) == 30.0


def test_cap_equal_to_base():
    backoff = ExponentialBackoff(base=2.0, cap=2.0, jitter="none")
    assert [backoff.compute(n) for n in (1, 2, 50)] == [2.0, 2.0, 2.0]


def test_cap_not_a_power_of_two_multiple():
    backoff = ExponentialBackoff(base=1.0, cap=5.0, jitter="none")
    assert [backoff.compute(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize("draw, expected", [(0.0, 0.0), (0.5, 2.0), (0.75, 3.0)])
def test_full_jitter_is_uniform_below_the_ceiling(draw, expected):
    backoff = ExponentialBackoff(base=1.0, cap=60.0, jitter="full")
    assert backoff.compute(3, FixedRandom(draw)) == expected  # ceiling 4


@pytest.mark.parametrize("draw, expected", [(0.0, 2.0), (0.5, 3.0), (0.75, 3.5)])
def test_equal_jitter_keeps_half_the_ceiling(draw, expected):
    backoff = ExponentialBackoff(base=1.0, cap=60.0, jitter="equal")
    assert backoff.compute(3, FixedRandom(draw)) == expected


def test_jitter_ranges_with_a_real_rng():
    rng = random.Random(42)
    full = ExponentialBackoff(0.2, 5.0, "full")
    equal = ExponentialBackoff(0.2, 5.0, "equal")
    for failures in range(1, 12):
        top = min(5.0, 0.2 * 2 ** (failures - 1))
        fulls = [full.compute(failures, rng) for _ in range(200)]
        equals = [equal.compute(failures, rng) for _ in range(200)]
        assert all(0 <= d < top for d in fulls) and max(fulls) > top * 0.9
        assert all(top / 2 <= d < top for d in equals) and min(equals) < top * 0.55


def test_default_jitter_is_full_and_default_rng_works():
    backoff = ExponentialBackoff(1.0, 8.0)
    assert backoff.jitter == "full"
    assert 0.0 <= backoff.compute(2) < 2.0


def test_no_failures_no_wait():
    for jitter in ("full", "equal", "none"):
        assert ExponentialBackoff(1.0, 8.0, jitter).compute(0, FixedRandom(0.9)) == 0.0


def test_is_stateless():
    backoff = ExponentialBackoff(1.0, 8.0, "none")
    assert [backoff.compute(3) for _ in range(3)] == [4.0, 4.0, 4.0]


def test_repr():
    assert repr(ExponentialBackoff(0.5, 30, "equal")) == (
        "ExponentialBackoff(base=0.5, cap=30, jitter='equal')")


@pytest.mark.parametrize("args, fragment", [
    ((0, 1.0), "base must be > 0 seconds, got 0"),
    ((-1.0, 1.0), "got -1.0"),
    ((float("nan"), 1.0), "got nan"),
    ((2.0, 1.0), "cap must be finite and >= base \\(2.0\\), got 1.0"),
    ((1.0, float("inf")), "got inf"),
    ((1.0, 2.0, "decorrelated"), "'decorrelated'"),
])
def test_bad_settings(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        ExponentialBackoff(*args)


def test_negative_failures_is_an_error():
    with pytest.raises(ValueError, match="failures must be >= 0, got -1"):
        ExponentialBackoff(1.0, 2.0).compute(-1)
