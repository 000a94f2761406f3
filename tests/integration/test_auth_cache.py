"""Sessions and user records held in memory: no store round trip on the common path, and
revocations seen at once by this controller and, over the invalidation bus, by others.

Two "controllers" are two AuthService objects over one real store (SQLite and
PostgreSQL). They share an in-process bus (one MemoryCache) or a real Redis (one
RedisCache each). Time is an injected clock.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.api.context import Principal
from controller.auth.passwords import PasswordHasher
from controller.auth.service import SESSION_CACHE_SECONDS, AuthService
from controller.auth.session_cache import AuthCache, UserRecord
from controller.auth.tokens import TokenService
from controller.cache import RedisCache, ResilientCache
from controller.cache.base import Cache
from controller.cache.bus import RedisBus, invalidation_bus
from controller.cache.memory import MemoryCache
from controller.errors import Unauthenticated
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.repositories import AuthFailureRepository, RefreshTokenRepository, UserRepository
from tests.support import PASSWORD

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
# A hang guard only: every wait below ends as soon as the awaited event happens.
HANG_GUARD_SECONDS = 15.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingSessions(RefreshTokenRepository):
    """The real repository, counting session-state reads."""

    reads = 0

    async def is_family_revoked(self, family_id: str) -> bool:
        self.reads += 1
        return await super().is_family_revoked(family_id)


class CountingUsers(UserRepository):
    """The real repository, counting reads by id."""

    reads = 0

    async def get(self, user_id: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await super().get(user_id)


@dataclass
class Node:
    auth: AuthService
    sessions: CountingSessions
    users: CountingUsers


@dataclass
class Rig:
    store: Store
    clock: Clock
    tokens: TokenService
    make: Callable[[Cache], Node]


@pytest.fixture
async def rig(store_url: str) -> AsyncIterator[Rig]:
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    clock = Clock()
    key = Ed25519PrivateKey.generate()
    tokens = TokenService(key, "k1", {"k1": key.public_key()}, "iss", "aud", 3600, 7 * 86400, clock)
    hasher = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)

    def make(cache: Cache) -> Node:
        sessions, users = CountingSessions(store), CountingUsers(store)
        auth = AuthService(
            users=users,
            refresh_tokens=sessions,
            failures=AuthFailureRepository(store),
            tokens=tokens,
            passwords=hasher,
            cache=cache,
            clock=clock,
        )
        return Node(auth, sessions, users)

    try:
        yield Rig(store, clock, tokens, make)
    finally:
        await store.close()


async def _principal(node: Node, token: str) -> Principal:
    return await node.auth.authenticate(token)


async def test_the_common_path_reads_nothing_from_the_store(rig: Rig) -> None:
    node = rig.make(MemoryCache(clock=rig.clock))
    session = await node.auth.register("ada@example.com", PASSWORD)
    principal = await _principal(node, session.access.token)
    record = await node.auth.current_user(principal.user_id)
    assert isinstance(record, UserRecord)
    assert record.email == "ada@example.com"
    reads = (node.sessions.reads, node.users.reads)
    assert reads == (1, 1)
    for _ in range(50):
        principal = await _principal(node, session.access.token)
        assert await node.auth.current_user(principal.user_id) == record
    assert (node.sessions.reads, node.users.reads) == reads


async def test_logout_on_one_controller_ends_the_session_on_the_other_at_once(rig: Rig) -> None:
    shared = MemoryCache(clock=rig.clock)  # one in-process bus for both
    a, b = rig.make(shared), rig.make(shared)
    session = await a.auth.register("ada@example.com", PASSWORD)
    principal = await _principal(b, session.access.token)  # b now trusts the session
    await a.auth.logout(principal)
    with pytest.raises(Unauthenticated) as info:
        await _principal(b, session.access.token)
    assert info.value.reason == "SESSION_REVOKED"
    with pytest.raises(Unauthenticated):
        await _principal(a, session.access.token)


async def test_refresh_reuse_revokes_everywhere(rig: Rig) -> None:
    shared = MemoryCache(clock=rig.clock)
    a, b = rig.make(shared), rig.make(shared)
    session = await a.auth.register("ada@example.com", PASSWORD)
    await _principal(b, session.access.token)
    await a.auth.refresh(session.refresh.token)
    with pytest.raises(Unauthenticated):
        await b.auth.refresh(session.refresh.token)  # reuse: the family is revoked
    with pytest.raises(Unauthenticated) as info:
        await _principal(a, session.access.token)
    assert info.value.reason == "SESSION_REVOKED"


async def test_a_change_nobody_announced_is_seen_when_the_entry_expires(rig: Rig) -> None:
    node = rig.make(MemoryCache(clock=rig.clock))
    session = await node.auth.register("ada@example.com", PASSWORD)
    principal = await _principal(node, session.access.token)
    # Revoked in the store behind the controller's back (e.g. a controller without a shared bus).
    await RefreshTokenRepository(rig.store).revoke_family(
        principal.session_id, "test", datetime.fromtimestamp(rig.clock.now, UTC)
    )
    rig.clock.now += SESSION_CACHE_SECONDS - 1
    await _principal(node, session.access.token)  # still trusted: the documented bound
    rig.clock.now += 1
    with pytest.raises(Unauthenticated):
        await _principal(node, session.access.token)


async def test_a_login_elsewhere_refreshes_the_user_record(rig: Rig) -> None:
    shared = MemoryCache(clock=rig.clock)
    a, b = rig.make(shared), rig.make(shared)
    session = await a.auth.register("ada@example.com", PASSWORD)
    before = await b.auth.current_user(session.user_id)
    assert before is not None
    assert before.last_login is None
    rig.clock.now += 60
    await a.auth.login("ada@example.com", PASSWORD)
    after = await b.auth.current_user(session.user_id)
    assert after is not None
    assert after.last_login is not None
    assert after.last_login.replace(tzinfo=UTC).timestamp() == pytest.approx(rig.clock.now)


def test_a_read_that_overlaps_an_invalidation_is_not_cached() -> None:
    clock = Clock()
    cache = AuthCache(clock=clock)
    generation = cache.generation  # a store read starts ...
    cache._on_message("session-revoked:s1")  # ... a revocation arrives meanwhile ...
    cache.remember_session("s1", False, generation)  # ... and the stale "open" comes back
    assert cache.session_revoked("s1") is True
    generation = cache.generation
    cache._on_message("user-changed:u1")
    cache.remember_user(UserRecord("u1", "a@example.com", None, None, False, True), generation)
    assert cache.user("u1") is None


# --- over Redis -------------------------------------------------------------------------------


@pytest.mark.redis
async def test_a_revocation_reaches_another_controller_over_redis(
    rig: Rig, redis_url: str, redis_key_prefix: str
) -> None:
    cache_a = ResilientCache(RedisCache(redis_url, key_prefix=redis_key_prefix))
    cache_b = ResilientCache(RedisCache(redis_url, key_prefix=redis_key_prefix))
    try:
        a, b = rig.make(cache_a), rig.make(cache_b)
        bus_a, bus_b = invalidation_bus(cache_a), invalidation_bus(cache_b)
        assert isinstance(bus_a, RedisBus)
        assert isinstance(bus_b, RedisBus)
        await asyncio.wait_for(asyncio.gather(bus_a.wait_live(), bus_b.wait_live()), HANG_GUARD_SECONDS)
        heard = asyncio.Event()
        bus_b.subscribe(lambda message: heard.set(), lambda: None)

        session = await a.auth.register("ada@example.com", PASSWORD)
        principal = await _principal(b, session.access.token)
        reads = b.sessions.reads
        await _principal(b, session.access.token)
        assert b.sessions.reads == reads  # b trusts its memory ...

        await a.auth.logout(principal)
        await asyncio.wait_for(heard.wait(), HANG_GUARD_SECONDS)  # ... until the message arrives
        with pytest.raises(Unauthenticated) as info:
            await _principal(b, session.access.token)
        assert info.value.reason == "SESSION_REVOKED"
        assert b.sessions.reads == reads  # known from the message, not from the store
    finally:
        await cache_a.close()
        await cache_b.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_without_a_live_bus_every_call_asks_the_store(rig: Rig) -> None:
    cache = ResilientCache(RedisCache(f"redis://127.0.0.1:{_closed_port()}/0"))
    try:
        node = rig.make(cache)
        bus = invalidation_bus(cache)
        assert not bus.live
        session = await node.auth.register("ada@example.com", PASSWORD)
        for _ in range(3):
            await _principal(node, session.access.token)
        assert node.sessions.reads == 3
        assert await node.auth.current_user(session.user_id) is not None
        assert await node.auth.current_user(session.user_id) is not None
        assert node.users.reads == 2
    finally:
        await cache.close()
