"""Exponential backoff with full jitter: bounds, growth, cap, reset, distribution."""

from __future__ import annotations

import random
import statistics

import pytest

from controller.agent.backoff import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS, Backoff


def test_defaults_follow_design_decision_2() -> None:
    assert (DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS) == (0.5, 300.0)
    backoff = Backoff()
    assert (backoff.base, backoff.cap, backoff.attempt) == (0.5, 300.0, 0)


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [
        (0, 0.5),
        (1, 1.0),
        (2, 2.0),
        (5, 16.0),
        (9, 256.0),
        (10, 300.0),
        (11, 300.0),
        (64, 300.0),
        (10**6, 300.0),
    ],
)
def test_ceiling_doubles_from_base_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert Backoff().ceiling(attempt) == ceiling


def test_every_delay_is_within_zero_and_its_ceiling_and_attempts_count() -> None:
    backoff = Backoff(rng=random.Random(1))
    for attempt in range(200):
        ceiling = backoff.ceiling()
        assert ceiling == min(300.0, 0.5 * 2**attempt)
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        assert backoff.attempt == attempt + 1


def test_retries_go_on_for_ever_without_overflow() -> None:
    backoff = Backoff(rng=random.Random(2), attempt=5000)
    assert 0.0 <= backoff.next_delay() <= 300.0
    assert backoff.attempt == 5001


def test_reset_starts_again_from_base() -> None:
    backoff = Backoff(rng=random.Random(3))
    for _ in range(12):
        backoff.next_delay()
    assert backoff.ceiling() == 300.0
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.ceiling() == 0.5
    assert backoff.next_delay() <= 0.5


def test_same_seed_replays_the_same_delays() -> None:
    first = Backoff(rng=random.Random(42))
    second = Backoff(rng=random.Random(42))
    assert [first.next_delay() for _ in range(20)] == [second.next_delay() for _ in range(20)]


def test_full_jitter_is_uniform_over_the_whole_window() -> None:
    """At the cap, delays spread evenly over [0, 300]: mean 150, every decile populated."""
    rng = random.Random(7)
    samples = []
    for _ in range(20_000):
        backoff = Backoff(rng=rng, attempt=20)
        samples.append(backoff.next_delay())
    assert min(samples) >= 0.0
    assert max(samples) <= 300.0
    assert statistics.fmean(samples) == pytest.approx(150.0, rel=0.02)
    # Uniform on [0, c]: standard deviation c / sqrt(12).
    assert statistics.pstdev(samples) == pytest.approx(300.0 / 12**0.5, rel=0.02)
    deciles = [0] * 10
    for sample in samples:
        deciles[min(9, int(sample // 30))] += 1
    assert all(abs(count - 2000) < 200 for count in deciles), deciles
    # Full (not "equal") jitter: a good share of retries come early.
    assert sum(1 for s in samples if s < 30.0) > 1500


@pytest.mark.parametrize(
    ("base", "cap"),
    [
        pytest.param(0.0, 1.0, id="zero-base"),
        pytest.param(-1.0, 1.0, id="negative-base"),
        pytest.param(2.0, 1.0, id="cap-below-base"),
    ],
)
def test_invalid_parameters_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base=base, cap=cap)


def test_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().ceiling(-1)


def test_docstring_example() -> None:
    import doctest

    import controller.agent.backoff as module

    assert doctest.testmod(module).failed == 0
