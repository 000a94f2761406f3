"""Node enrollment tokens on SQLite and PostgreSQL: hashing, limits, expiry, atomic consumption."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from controller.errors import InvalidArgument, Unauthenticated
from controller.nodes.enrollment import (
    INVALID_MESSAGE,
    REASON_INVALID,
    TOKEN_PREFIX,
    EnrollmentTokens,
)
from controller.store import Store, UserRepository
from controller.store.models import NodeEnrollmentToken, User


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def user(store: Store) -> User:
    return await UserRepository(store).create("owner@example.com", "hash")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens(store: Store, clock: FakeClock) -> EnrollmentTokens:
    return EnrollmentTokens(store, clock=clock)


async def assert_invalid(call: object) -> None:
    assert asyncio.iscoroutine(call)
    with pytest.raises(Unauthenticated) as info:
        await call
    assert info.value.reason == REASON_INVALID
    assert info.value.message == INVALID_MESSAGE


async def test_create_returns_a_prefixed_random_token_and_stores_only_its_hash(
    store: Store, tokens: EnrollmentTokens, user: User, clock: FakeClock
) -> None:
    issued = await tokens.create(user.id, ttl_seconds=600, max_uses=3)

    assert issued.token.startswith(TOKEN_PREFIX)
    body = issued.token[len(TOKEN_PREFIX) :]
    assert len(body) >= 22
    assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(body) * 6 >= 128  # bits of entropy
    assert issued.max_uses == 3
    assert issued.expires_at == datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=600)
    assert issued.token not in repr(issued)

    async with store.session() as session:
        rows = list((await session.execute(select(NodeEnrollmentToken))).scalars())
    [row] = rows
    assert row.user_id == user.id
    assert row.token_hash == hashlib.sha256(issued.token.encode()).hexdigest()
    assert row.max_uses == 3
    assert row.uses == 0
    assert abs((row.expires_at - issued.expires_at).total_seconds()) < 1e-3
    for value in vars(row).values():
        assert issued.token not in str(value)
        assert body not in str(value)

    other = await tokens.create(user.id)
    assert other.token != issued.token


async def test_defaults_for_zero(tokens: EnrollmentTokens, user: User, clock: FakeClock) -> None:
    issued = await tokens.create(user.id, ttl_seconds=0, max_uses=0)
    assert issued.max_uses == 1
    assert issued.expires_at == datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=3600)


@pytest.mark.parametrize(
    ("ttl", "uses", "fields"),
    [
        (59, 1, ["ttl_seconds"]),
        (86401, 1, ["ttl_seconds"]),
        (-1, 1, ["ttl_seconds"]),
        (3600, 101, ["max_uses"]),
        (3600, -5, ["max_uses"]),
        (10, 1000, ["ttl_seconds", "max_uses"]),
    ],
)
async def test_limits_are_invalid_argument(
    tokens: EnrollmentTokens, user: User, ttl: int, uses: int, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await tokens.create(user.id, ttl_seconds=ttl, max_uses=uses)
    assert [v.field for v in info.value.field_violations] == fields


@pytest.mark.parametrize(("ttl", "uses"), [(60, 1), (86400, 100)])
async def test_limits_are_inclusive(tokens: EnrollmentTokens, user: User, ttl: int, uses: int) -> None:
    issued = await tokens.create(user.id, ttl_seconds=ttl, max_uses=uses)
    assert await tokens.peek(issued.token) == user.id


async def test_peek_does_not_consume(tokens: EnrollmentTokens, user: User) -> None:
    issued = await tokens.create(user.id)
    for _ in range(3):
        assert await tokens.peek(issued.token) == user.id
    assert await tokens.consume(issued.token) == user.id
    await assert_invalid(tokens.peek(issued.token))
    await assert_invalid(tokens.consume(issued.token))


async def test_a_token_allows_exactly_max_uses(tokens: EnrollmentTokens, user: User) -> None:
    issued = await tokens.create(user.id, max_uses=3)
    for _ in range(3):
        assert await tokens.consume(issued.token) == user.id
    await assert_invalid(tokens.consume(issued.token))
    await assert_invalid(tokens.peek(issued.token))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a67e_",
        "a67e_short",
        "not-a-token",
        TOKEN_PREFIX + "A" * 43,  # well formed but never issued
        TOKEN_PREFIX + "A" * 500,
        TOKEN_PREFIX + "contains spaces and more text here",
        "a67e_" + "é" * 30,
    ],
)
async def test_unknown_and_malformed_tokens_get_the_same_error(
    tokens: EnrollmentTokens, user: User, token: str
) -> None:
    await tokens.create(user.id)
    await assert_invalid(tokens.peek(token))
    await assert_invalid(tokens.consume(token))


async def test_expiry_follows_the_injected_clock(
    tokens: EnrollmentTokens, user: User, clock: FakeClock
) -> None:
    issued = await tokens.create(user.id, ttl_seconds=60, max_uses=5)
    clock.advance(59.5)
    assert await tokens.peek(issued.token) == user.id
    assert await tokens.consume(issued.token) == user.id
    clock.advance(0.5)  # exactly at expiry: expired
    await assert_invalid(tokens.peek(issued.token))
    await assert_invalid(tokens.consume(issued.token))
    clock.advance(3600)
    await assert_invalid(tokens.consume(issued.token))


async def test_a_use_in_a_rolled_back_transaction_is_undone(
    store: Store, tokens: EnrollmentTokens, user: User
) -> None:
    issued = await tokens.create(user.id)

    class Boom(Exception):
        pass

    async def use_then_fail() -> None:
        async with store.session() as session:
            assert await tokens.consume(issued.token, session=session) == user.id
            raise Boom

    with pytest.raises(Boom):
        await use_then_fail()
    assert await tokens.consume(issued.token) == user.id


@pytest.mark.parametrize(("max_uses", "callers"), [(1, 20), (3, 20)])
async def test_concurrent_consumes_never_exceed_max_uses(
    tokens: EnrollmentTokens, user: User, max_uses: int, callers: int
) -> None:
    issued = await tokens.create(user.id, max_uses=max_uses)

    async def attempt() -> bool:
        try:
            await tokens.consume(issued.token)
        except Unauthenticated:
            return False
        return True

    results = await asyncio.gather(*(attempt() for _ in range(callers)))
    assert sum(results) == max_uses
    await assert_invalid(tokens.peek(issued.token))


async def test_purge_expired(store: Store, tokens: EnrollmentTokens, user: User, clock: FakeClock) -> None:
    short = await tokens.create(user.id, ttl_seconds=60)
    long = await tokens.create(user.id, ttl_seconds=7200)
    clock.advance(120)
    assert await tokens.purge_expired() == 1
    await assert_invalid(tokens.peek(short.token))
    assert await tokens.peek(long.token) == user.id
    async with store.session() as session:
        count = len(list((await session.execute(select(NodeEnrollmentToken.id))).scalars()))
    assert count == 1
