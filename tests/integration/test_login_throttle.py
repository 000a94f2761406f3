"""Login throttling under concurrency, on SQLite and PostgreSQL, with an injected clock.

The password hasher counts the verifications that really ran, so a burst of
parallel wrong-password logins must not get more password checks than the throttle
allows (finding 1 of the attack run: 35-40 of 40 were checked).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.auth.passwords import PasswordHasher
from controller.auth.service import (
    THROTTLE_FREE_FAILURES,
    THROTTLE_MAX_DELAY_SECONDS,
    AuthService,
    throttle_delay,
)
from controller.auth.tokens import TokenService
from controller.cache.memory import MemoryCache
from controller.errors import ResourceExhausted, Unauthenticated
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.repositories import AuthFailureRepository, RefreshTokenRepository, UserRepository
from tests.support import PASSWORD

WRONG = "W" * 44
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingHasher(PasswordHasher):
    """argon2id at cheap parameters that counts every verification (real or dummy)."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=64, parallelism=1)
        self.verifications = 0

    async def verify(self, stored_hash: str, secret: str) -> bool:
        self.verifications += 1
        return await super().verify(stored_hash, secret)

    async def dummy_verify(self, secret: str | None = None) -> None:
        self.verifications += 1
        await super().dummy_verify(secret)


@dataclass
class Harness:
    auth: AuthService
    hasher: CountingHasher
    failures: AuthFailureRepository
    clock: Clock


@pytest.fixture
async def harness(store_url: str) -> AsyncIterator[Harness]:
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    clock = Clock()
    key = Ed25519PrivateKey.generate()
    tokens = TokenService(key, "k1", {"k1": key.public_key()}, "iss", "aud", 3600, 7 * 86400, clock)
    hasher = CountingHasher()
    failures = AuthFailureRepository(store)
    auth = AuthService(
        users=UserRepository(store),
        refresh_tokens=RefreshTokenRepository(store),
        failures=failures,
        tokens=tokens,
        passwords=hasher,
        cache=MemoryCache(clock=clock),
        clock=clock,
    )
    try:
        yield Harness(auth, hasher, failures, clock)
    finally:
        await store.close()


async def _burst(auth: AuthService, email: str, count: int) -> list[BaseException]:
    results = await asyncio.gather(*(auth.login(email, WRONG) for _ in range(count)), return_exceptions=True)
    assert all(isinstance(r, BaseException) for r in results), "a wrong password signed in"
    return [r for r in results if isinstance(r, BaseException)]


@pytest.mark.parametrize("account_exists", [True, False], ids=["known-account", "unknown-email"])
async def test_a_burst_of_50_parallel_wrong_logins_gets_at_most_the_free_password_checks(
    harness: Harness, account_exists: bool
) -> None:
    email = "ada@example.com" if account_exists else "nobody@example.com"
    await harness.auth.register("ada@example.com", PASSWORD)
    harness.hasher.verifications = 0

    errors = await _burst(harness.auth, email, 50)

    checked = harness.hasher.verifications
    assert 1 <= checked <= THROTTLE_FREE_FAILURES, f"{checked} passwords were checked in one burst"
    refused = [e for e in errors if isinstance(e, ResourceExhausted)]
    rejected = [e for e in errors if isinstance(e, Unauthenticated)]
    assert len(rejected) == checked  # exactly the checked ones got "wrong password"
    assert len(refused) == 50 - checked
    assert {e.reason for e in refused} == {"LOGIN_THROTTLED"}
    assert all(e.retry_after is not None and 0 < e.retry_after <= 1.0 for e in refused)
    row = await harness.failures.get(f"login:{email}")
    assert row is not None
    assert row.failures == checked

    # Still locked at the same instant: no further check.
    with pytest.raises(ResourceExhausted):
        await harness.auth.login("ada@example.com" if account_exists else email, PASSWORD)
    assert harness.hasher.verifications == checked


async def test_the_right_password_works_once_the_lock_is_over_and_resets_the_count(harness: Harness) -> None:
    await harness.auth.register("ada@example.com", PASSWORD)
    await _burst(harness.auth, "ada@example.com", 50)

    harness.clock.now += THROTTLE_MAX_DELAY_SECONDS + 1  # past any lock
    session = await harness.auth.login("ada@example.com", PASSWORD)
    assert session.user_id
    assert await harness.failures.get("login:ada@example.com") is None

    # The count starts again: the next wrong password is checked and rejected, not refused.
    before = harness.hasher.verifications
    with pytest.raises(Unauthenticated):
        await harness.auth.login("ada@example.com", WRONG)
    assert harness.hasher.verifications == before + 1


async def test_backoff_doubles_from_the_fifth_failure_and_refusals_are_not_checked(harness: Harness) -> None:
    await harness.auth.register("ada@example.com", PASSWORD)
    harness.hasher.verifications = 0
    for _ in range(THROTTLE_FREE_FAILURES):
        with pytest.raises(Unauthenticated):
            await harness.auth.login("ada@example.com", WRONG)
    assert harness.hasher.verifications == THROTTLE_FREE_FAILURES

    for delay in (1.0, 2.0, 4.0, 8.0):
        # Locked for `delay` seconds from the last checked failure.
        harness.clock.now += delay / 2
        with pytest.raises(ResourceExhausted) as info:
            await harness.auth.login("ada@example.com", PASSWORD)
        assert info.value.retry_after == pytest.approx(delay / 2)
        checked = harness.hasher.verifications
        harness.clock.now += delay / 2
        with pytest.raises(Unauthenticated):  # the lock is over: one more check
            await harness.auth.login("ada@example.com", WRONG)
        assert harness.hasher.verifications == checked + 1

    row = await harness.failures.get("login:ada@example.com")
    assert row is not None
    assert row.locked_until == datetime.fromtimestamp(harness.clock.now, UTC) + timedelta(seconds=16)


def test_throttle_delay_is_1_2_4_seconds_up_to_15_minutes() -> None:
    assert [throttle_delay(n) for n in range(1, THROTTLE_FREE_FAILURES)] == [0.0] * (
        THROTTLE_FREE_FAILURES - 1
    )
    assert [throttle_delay(THROTTLE_FREE_FAILURES + k) for k in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert throttle_delay(THROTTLE_FREE_FAILURES + 10) == THROTTLE_MAX_DELAY_SECONDS
    assert throttle_delay(10_000) == THROTTLE_MAX_DELAY_SECONDS


async def test_a_new_window_starts_after_the_window_is_over(harness: Harness) -> None:
    await harness.auth.register("ada@example.com", PASSWORD)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await harness.auth.login("ada@example.com", WRONG)
    harness.clock.now += 15 * 60 + 1
    with pytest.raises(Unauthenticated):
        await harness.auth.login("ada@example.com", WRONG)
    row = await harness.failures.get("login:ada@example.com")
    assert row is not None
    assert (row.failures, row.locked_until) == (1, None)
    assert row.window_started_at == datetime.fromtimestamp(harness.clock.now, UTC)
