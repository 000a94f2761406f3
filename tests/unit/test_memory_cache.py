"""The in-process TTL cache, the resilient wrapper's degraded mode, and ``open_cache``."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.cache import CacheUnavailable, MemoryCache, RedisCache, ResilientCache, open_cache
from controller.cache.base import Cache


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> MemoryCache:
    return MemoryCache(clock=clock)


def test_memory_cache_satisfies_the_protocol(cache: MemoryCache) -> None:
    assert isinstance(cache, Cache)


async def test_set_get_delete(cache: MemoryCache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", b"v1")
    assert await cache.get("k") == b"v1"
    await cache.set("k", b"v2")
    assert await cache.get("k") == b"v2"
    await cache.delete("k")
    assert await cache.get("k") is None
    await cache.delete("k")  # absent: no error


async def test_entries_expire_by_the_injected_clock(cache: MemoryCache, clock: FakeClock) -> None:
    await cache.set("short", b"s", ttl_seconds=1.5)
    await cache.set("forever", b"f")

    clock.advance(1.499)
    assert await cache.get("short") == b"s"
    clock.advance(0.001)
    assert await cache.get("short") is None
    clock.advance(10**6)
    assert await cache.get("forever") == b"f"


async def test_set_replaces_the_ttl(cache: MemoryCache, clock: FakeClock) -> None:
    await cache.set("k", b"1", ttl_seconds=1)
    await cache.set("k", b"2")
    clock.advance(5)
    assert await cache.get("k") == b"2"


async def test_incr_counts_in_a_fixed_window(cache: MemoryCache, clock: FakeClock) -> None:
    assert [await cache.incr("rate", ttl_seconds=60) for _ in range(3)] == [1, 2, 3]
    clock.advance(59)
    assert await cache.incr("rate", ttl_seconds=60) == 4  # later increments do not extend the window
    clock.advance(1)
    assert await cache.get("rate") is None
    assert await cache.incr("rate", ttl_seconds=60) == 1
    assert await cache.get("rate") == b"1"


async def test_incr_without_ttl_and_on_existing_values(cache: MemoryCache, clock: FakeClock) -> None:
    await cache.set("n", b"41", ttl_seconds=10)
    assert await cache.incr("n") == 42
    clock.advance(10)
    assert await cache.get("n") is None  # the existing TTL is kept

    assert await cache.incr("plain") == 1
    clock.advance(10**6)
    assert await cache.incr("plain") == 2

    await cache.set("text", b"abc")
    with pytest.raises(ValueError, match="not an integer"):
        await cache.incr("text")


async def test_set_if_absent(cache: MemoryCache, clock: FakeClock) -> None:
    assert await cache.set_if_absent("lock", b"a", ttl_seconds=5)
    assert not await cache.set_if_absent("lock", b"b", ttl_seconds=5)
    assert await cache.get("lock") == b"a"
    clock.advance(5)
    assert await cache.set_if_absent("lock", b"c", ttl_seconds=5)
    assert await cache.get("lock") == b"c"


async def test_concurrent_increments_are_all_counted(cache: MemoryCache) -> None:
    async def bump() -> int:
        await asyncio.sleep(0)
        return await cache.incr("c", ttl_seconds=60)

    results = await asyncio.gather(*(bump() for _ in range(100)))
    assert sorted(results) == list(range(1, 101))


async def test_concurrent_set_if_absent_has_one_winner(cache: MemoryCache) -> None:
    results = await asyncio.gather(
        *(asyncio.to_thread(lambda: asyncio.run(cache.set_if_absent("once", b"x"))) for _ in range(8))
    )
    assert results.count(True) == 1


async def test_least_recently_used_entries_are_evicted(clock: FakeClock) -> None:
    cache = MemoryCache(clock=clock, max_entries=3)
    for key in ("a", "b", "c"):
        await cache.set(key, key.encode())
    assert await cache.get("a") == b"a"  # "a" is now the most recently used

    await cache.set("d", b"d")

    assert len(cache) == 3
    assert await cache.get("b") is None
    assert [await cache.get(k) for k in ("a", "c", "d")] == [b"a", b"c", b"d"]


async def test_bad_ttls_and_sizes_are_refused(cache: MemoryCache) -> None:
    for ttl in (0, -1.0):
        with pytest.raises(ValueError, match="positive"):
            await cache.set("k", b"v", ttl_seconds=ttl)
        with pytest.raises(ValueError, match="positive"):
            await cache.incr("k", ttl_seconds=ttl)
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCache(max_entries=0)


async def test_ping_and_close(cache: MemoryCache) -> None:
    await cache.set("k", b"v")
    assert await cache.ping()
    await cache.close()
    assert len(cache) == 0


# --- ResilientCache over a backend that is down -------------------------------------------------


class DownCache:
    """A backend whose every call fails as an unreachable Redis would."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    async def _fail(self) -> None:
        self.calls += 1
        raise CacheUnavailable("redis: ConnectionError")

    async def get(self, key: str) -> bytes | None:
        await self._fail()
        return None

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        await self._fail()

    async def delete(self, key: str) -> None:
        await self._fail()

    async def incr(self, key: str, ttl_seconds: float | None = None) -> int:
        await self._fail()
        return 0

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float | None = None) -> bool:
        await self._fail()
        return False

    async def ping(self) -> bool:
        await self._fail()
        return False

    async def close(self) -> None:
        self.closed = True


async def test_resilient_cache_turns_an_outage_into_misses(clock: FakeClock) -> None:
    down = DownCache()
    cache = ResilientCache(down, clock=clock)

    assert await cache.get("k") is None
    await cache.set("k", b"v", ttl_seconds=10)
    await cache.delete("k")
    assert not await cache.ping()
    assert cache.degraded
    assert down.calls == 4

    # Counters and once-only guards fall back to this process's memory.
    assert [await cache.incr("rate", ttl_seconds=60) for _ in range(3)] == [1, 2, 3]
    clock.advance(60)
    assert await cache.incr("rate", ttl_seconds=60) == 1
    assert await cache.set_if_absent("once", b"x", ttl_seconds=5)
    assert not await cache.set_if_absent("once", b"x", ttl_seconds=5)

    await cache.close()
    assert down.closed


async def test_resilient_cache_warns_at_most_every_30_seconds(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ResilientCache(DownCache(), clock=clock)
    caplog.set_level(logging.WARNING, logger="controller.cache")

    for _ in range(5):
        await cache.get("k")
    clock.advance(29.9)
    await cache.set("k", b"v")
    assert len(caplog.records) == 1
    assert "cache is unavailable" in caplog.records[0].getMessage()

    clock.advance(0.1)
    await cache.get("k")
    assert len(caplog.records) == 2


async def test_resilient_cache_passes_through_a_healthy_backend(cache: MemoryCache) -> None:
    resilient = ResilientCache(cache)
    await resilient.set("k", b"v")
    assert await resilient.get("k") == b"v"
    assert await resilient.incr("n") == 1
    assert await cache.get("n") == b"1"  # counted in the backend, not the fallback
    assert await resilient.ping()
    assert not resilient.degraded
    assert isinstance(resilient, Cache)


async def test_resilient_cache_does_not_hide_programming_errors(cache: MemoryCache) -> None:
    await cache.set("text", b"abc")
    with pytest.raises(ValueError, match="not an integer"):
        await ResilientCache(cache).incr("text")


# --- open_cache -------------------------------------------------------------------------------


async def test_open_cache_by_url() -> None:
    memory = open_cache("memory://")
    assert isinstance(memory, MemoryCache)

    remote = open_cache("redis://127.0.0.1:6379/0")
    try:
        assert isinstance(remote, ResilientCache)
        assert isinstance(remote.inner, RedisCache)
    finally:
        await remote.close()

    with pytest.raises(ValueError, match="memory:// or redis://"):
        open_cache("memcached://localhost")
