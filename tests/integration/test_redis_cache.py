"""The Redis cache against a real Redis, and its degraded mode when Redis is not there."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis.asyncio

from controller.cache import RedisCache, ResilientCache
from controller.cache.base import Cache, CacheUnavailable


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.redis
async def test_set_get_delete(redis_cache: RedisCache) -> None:
    assert isinstance(redis_cache, Cache)
    assert await redis_cache.ping()
    assert await redis_cache.get("k") is None
    await redis_cache.set("k", b"\x00binary\xff")
    assert await redis_cache.get("k") == b"\x00binary\xff"
    await redis_cache.delete("k")
    assert await redis_cache.get("k") is None
    await redis_cache.delete("k")


@pytest.mark.redis
async def test_entries_expire(redis_cache: RedisCache) -> None:
    await redis_cache.set("short", b"s", ttl_seconds=0.1)
    await redis_cache.set("long", b"l", ttl_seconds=60)
    # Redis holds each entry with its TTL in milliseconds (-2: already gone, on a slow machine)
    raw = redis_cache._client
    assert 0 < await raw.pttl(redis_cache._k("long")) <= 60_000
    assert await raw.pttl(redis_cache._k("short")) in (-2, *range(1, 101))
    deadline = asyncio.get_running_loop().time() + 10
    while await redis_cache.get("short") is not None:  # gone once its TTL passed
        assert asyncio.get_running_loop().time() < deadline, "the 0.1 s entry did not expire"
        await asyncio.sleep(0.05)
    assert await redis_cache.get("long") == b"l"


@pytest.mark.redis
async def test_incr_counts_in_a_fixed_window(redis_cache: RedisCache, redis_url: str) -> None:
    assert [await redis_cache.incr("rate", ttl_seconds=0.3) for _ in range(3)] == [1, 2, 3]
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        ttl_ms = await raw.pttl(redis_cache.key_prefix + "rate")
    finally:
        await raw.aclose()
    assert 0 < ttl_ms <= 300
    await asyncio.sleep(0.4)
    assert await redis_cache.get("rate") is None
    assert await redis_cache.incr("rate", ttl_seconds=60) == 1
    assert await redis_cache.incr("no-ttl") == 1
    assert await redis_cache.incr("no-ttl") == 2

    await redis_cache.set("text", b"abc")
    with pytest.raises(ValueError, match="not an integer"):
        await redis_cache.incr("text", ttl_seconds=10)


@pytest.mark.redis
async def test_concurrent_increments_are_all_counted(redis_cache: RedisCache) -> None:
    results = await asyncio.gather(*(redis_cache.incr("c", ttl_seconds=60) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))


@pytest.mark.redis
async def test_set_if_absent(redis_cache: RedisCache) -> None:
    results = await asyncio.gather(
        *(redis_cache.set_if_absent("lock", b"x", ttl_seconds=0.2) for _ in range(10))
    )
    assert results.count(True) == 1
    assert not await redis_cache.set_if_absent("lock", b"y", ttl_seconds=0.2)
    await asyncio.sleep(0.35)
    assert await redis_cache.set_if_absent("lock", b"z")
    assert await redis_cache.get("lock") == b"z"


@pytest.mark.redis
async def test_key_prefixes_isolate_caches(redis_url: str, redis_key_prefix: str) -> None:
    one = RedisCache(redis_url, key_prefix=redis_key_prefix + "one:")
    two = RedisCache(redis_url, key_prefix=redis_key_prefix + "two:")
    try:
        await one.set("k", b"1")
        assert await two.get("k") is None
    finally:
        await one.close()
        await two.close()


@pytest.mark.redis
async def test_resilient_cache_over_a_live_redis(redis_url: str, redis_key_prefix: str) -> None:
    cache = ResilientCache(RedisCache(redis_url, key_prefix=redis_key_prefix))
    try:
        await cache.set("k", b"v", ttl_seconds=10)
        assert await cache.get("k") == b"v"
        assert await cache.incr("n", ttl_seconds=10) == 1
        assert await cache.ping()
        assert not cache.degraded
    finally:
        await cache.close()


async def test_redis_cache_on_a_dead_port_raises_cache_unavailable() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{_closed_port()}/0")
    try:
        with pytest.raises(CacheUnavailable):
            await cache.get("k")
        with pytest.raises(CacheUnavailable):
            await cache.ping()
    finally:
        await cache.close()


async def test_resilient_cache_on_a_dead_port_never_fails_a_request() -> None:
    """A cache outage never fails a request that the store can answer."""
    cache = ResilientCache(RedisCache(f"redis://127.0.0.1:{_closed_port()}/0"))
    started = time.monotonic()
    try:
        assert await cache.get("k") is None
        await cache.set("k", b"v", ttl_seconds=5)
        await cache.delete("k")
        assert await cache.get("k") is None
        assert await cache.incr("rate", ttl_seconds=60) == 1  # process-local fallback
        assert await cache.incr("rate", ttl_seconds=60) == 2
        assert await cache.set_if_absent("once", b"x")
        assert not await cache.ping()
        assert cache.degraded
    finally:
        await cache.close()
    assert time.monotonic() - started < 5  # short timeouts: an outage costs little
