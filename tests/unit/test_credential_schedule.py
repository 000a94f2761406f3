"""Pure parts of the provider-token life cycle: the schedule, the backoff, the rate limit,
the providers' configuration."""

from __future__ import annotations

import random

import pytest

from controller.credentials.providers import ADAPTERS, PROVIDERS, parse_provider_config
from controller.credentials.refresher import RateLimiter
from controller.credentials.states import MAX_BACKOFF_SECONDS, refresh_time, retry_time
from tests.credentials.support import FakeClock


def test_refresh_time_is_a_share_of_the_lifetime_with_jitter() -> None:
    rng = random.Random(1)
    times = [refresh_time(1000.0, 4600.0, 0.75, 0.1, rng) for _ in range(2000)]
    assert min(times) >= 1000 + 0.65 * 3600
    assert max(times) <= 1000 + 0.85 * 3600
    assert max(times) - min(times) > 0.18 * 3600  # spread over nearly the whole band
    assert refresh_time(1000.0, 4600.0, 0.75, 0.0, rng) == 1000 + 0.75 * 3600
    assert refresh_time(1000.0, 900.0, 0.75, 0.1, rng) == 1000.0  # already expired: now


def test_retry_backs_off_and_stays_before_the_expiry() -> None:
    rng = random.Random(2)
    delays = [retry_time(0.0, n, 5.0, None, rng) for n in range(1, 12)]
    for n, delay in enumerate(delays[:6]):
        assert 0.8 * 5 * 2**n <= delay <= 1.2 * 5 * 2**n
    assert max(delays) <= 1.2 * MAX_BACKOFF_SECONDS
    assert retry_time(0.0, 8, 5.0, 100.0, rng) == 50.0  # half the time left
    assert retry_time(0.0, 8, 5.0, 1.5, rng) == 1.0  # at least a second
    assert retry_time(200.0, 1, 5.0, 100.0, rng) > 200.0  # past expiry: plain backoff


async def test_rate_limiter_spaces_starts_on_the_injected_clock() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(10.0, clock, clock.sleep)
    starts = []
    for _ in range(25):
        await limiter.wait()
        starts.append(clock())
    assert starts[:3] == pytest.approx([0.0, 0.1, 0.2])
    assert starts[-1] == pytest.approx(2.4)


def test_one_adapter_per_provider_and_config_checks() -> None:
    assert set(ADAPTERS) == set(PROVIDERS)
    parsed = parse_provider_config(
        '{"flyio": {"token_url": "https://fly.example/token", "client_id": "c", "client_secret": "hush-42"}}'
    )
    assert parsed["flyio"].token_url == "https://fly.example/token"
    assert parsed["flyio"].client_secret == "hush-42"
    assert "hush-42" not in repr(parsed["flyio"])
    assert parse_provider_config("") == {}
    for bad in (
        "[]",
        "{not json",
        '{"heroku": {"token_url": "https://x"}}',
        '{"render": {"token_url": "ftp://x"}}',
        '{"render": {"token_url": "https://x", "extra": 1}}',
        '{"render": {"token_url": "https://x", "client_secret_file": "/nonexistent/secret"}}',
    ):
        with pytest.raises(ValueError, match="A67_PROVIDER_OAUTH"):
            parse_provider_config(bad)
