"""retry_delay: exponential, capped, jittered, always within [minimum, maximum]."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwatchd.service.backoff import JITTER, retry_delay

attempts = st.integers(min_value=1, max_value=10_000)
bounds = st.tuples(st.floats(0.001, 1e5), st.floats(0.0, 1e6)).map(lambda pair: (pair[0], pair[0] + pair[1]))


@given(attempts, bounds, st.integers(0, 2**32))
def test_always_within_bounds(attempt: int, limits: tuple[float, float], seed: int) -> None:
    low, high = limits
    assert low <= retry_delay(attempt, low, high, random.Random(seed)) <= high


@given(attempts, bounds)
def test_non_decreasing_without_jitter(attempt: int, limits: tuple[float, float]) -> None:
    low, high = limits
    assert retry_delay(attempt, low, high, jitter=0) <= retry_delay(attempt + 1, low, high, jitter=0)


@given(attempts, bounds, st.integers(0, 2**32))
def test_jitter_stays_within_twenty_percent(attempt: int, limits: tuple[float, float], seed: int) -> None:
    low, high = limits
    plain = retry_delay(attempt, low, high, jitter=0)
    jittered = retry_delay(attempt, low, high, random.Random(seed))
    assert plain * (1 - JITTER) - 1e-9 <= jittered <= plain * (1 + JITTER) + 1e-9


def test_doubles_from_the_minimum_until_the_cap() -> None:
    assert [retry_delay(n, 60, 3600, jitter=0) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_non_decreasing_in_expectation() -> None:
    rng = random.Random(1)
    means = [statistics.fmean(retry_delay(n, 10, 1000, rng) for _ in range(4000)) for n in range(1, 10)]
    assert all(later >= earlier * 0.99 for earlier, later in zip(means, means[1:], strict=False))  # sampling noise
    # At the ends half of the jitter is clamped away: E = (bound + bound * (1 ± JITTER / 2)) / 2.
    assert means[0] == pytest.approx(10 * (1 + JITTER / 4), rel=0.01)
    assert means[-1] == pytest.approx(1000 * (1 - JITTER / 4), rel=0.01)
    assert means[3] == pytest.approx(80, rel=0.02)


def test_jitter_spreads_the_delays() -> None:
    rng = random.Random(7)
    values = {retry_delay(3, 60, 3600, rng) for _ in range(50)}
    assert len(values) > 40 and min(values) >= 240 * 0.8 and max(values) <= 240 * 1.2


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert retry_delay(10**9, 60, 3600, jitter=0) == 3600


@pytest.mark.parametrize(("attempt", "low", "high"), [(0, 1, 2), (-1, 1, 2), (1, 5, 4), (1, -1, 2)])
def test_bad_arguments_are_refused(attempt: int, low: float, high: float) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt, low, high)
