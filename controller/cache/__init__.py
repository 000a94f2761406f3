"""Caches behind one interface, and the rule that a cache outage never fails a request.

* :func:`open_cache` turns ``settings.cache_url`` into a cache: ``memory://`` gives the
  in-process :class:`MemoryCache`; ``redis://`` / ``rediss://`` give a
  :class:`RedisCache` wrapped in a :class:`ResilientCache`.
* :class:`ResilientCache` never raises for a backend outage. While the backend is
  down, ``get`` misses, ``set``/``delete`` do nothing, and ``incr``/``set_if_absent``
  fall back to a process-local :class:`MemoryCache` (so rate limits and once-only
  guards keep working, per process, instead of failing or letting everything
  through). It logs one warning per ``warn_interval`` seconds (30 by default) and
  one line when the backend is back.

A cache outage never fails a request that the store can answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from controller.cache.base import Cache, CacheUnavailable, check_ttl
from controller.cache.bus import InvalidationBus, LocalBus, RedisBus, invalidation_bus
from controller.cache.memory import MemoryCache
from controller.cache.redis_cache import RedisCache

log = logging.getLogger(__name__)

_T = TypeVar("_T")

CACHE_ERRORS: tuple[type[BaseException], ...] = (CacheUnavailable, RedisError, OSError)
"""What counts as a cache outage (``TimeoutError`` is an ``OSError``)."""


class ResilientCache:
    """Wraps a :class:`Cache` so that its outages degrade to misses instead of errors."""

    def __init__(
        self,
        inner: Cache,
        *,
        clock: Callable[[], float] = time.monotonic,
        warn_interval: float = 30.0,
        fallback: MemoryCache | None = None,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._warn_interval = warn_interval
        self._fallback = fallback or MemoryCache(clock=clock, max_entries=10_000)
        self._last_warning: float | None = None
        self._degraded = False

    @property
    def inner(self) -> Cache:
        """The wrapped cache."""
        return self._inner

    @property
    def degraded(self) -> bool:
        """Whether the last call found the backend unavailable."""
        return self._degraded

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._degraded = True
        now = self._clock()
        if self._last_warning is None or now - self._last_warning >= self._warn_interval:
            self._last_warning = now
            log.warning(
                "the cache is unavailable (%s failed: %s); serving without it",
                operation,
                exc.__cause__ or exc,
            )

    def _succeeded(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("the cache is available again")

    async def _call(self, operation: str, call: Awaitable[_T]) -> tuple[bool, _T | None]:
        try:
            result = await call
        except CACHE_ERRORS as exc:
            self._failed(operation, exc)
            return False, None
        self._succeeded()
        return True, result

    async def get(self, key: str) -> bytes | None:
        _, value = await self._call("get", self._inner.get(key))
        return value

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        check_ttl(ttl_seconds)
        await self._call("set", self._inner.set(key, value, ttl_seconds))

    async def delete(self, key: str) -> None:
        await self._call("delete", self._inner.delete(key))

    async def incr(self, key: str, ttl_seconds: float | None = None) -> int:
        check_ttl(ttl_seconds)
        ok, value = await self._call("incr", self._inner.incr(key, ttl_seconds))
        if ok and value is not None:
            return value
        return await self._fallback.incr(key, ttl_seconds)

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float | None = None) -> bool:
        check_ttl(ttl_seconds)
        ok, stored = await self._call("set_if_absent", self._inner.set_if_absent(key, value, ttl_seconds))
        if ok and stored is not None:
            return stored
        return await self._fallback.set_if_absent(key, value, ttl_seconds)

    def invalidation_bus(self) -> InvalidationBus:
        """The wrapped cache's bus (see :mod:`controller.cache.bus`)."""
        return invalidation_bus(self._inner)

    async def ping(self) -> bool:
        """True if the backend answers; False (never an error) if it does not."""
        ok, answered = await self._call("ping", self._inner.ping())
        return ok and bool(answered)

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._fallback.close()


def open_cache(url: str, *, key_prefix: str = "") -> Cache:
    """The cache for ``url``: ``memory://`` or ``redis://host:port/db`` (``rediss://`` for TLS).

    Nothing connects yet: Redis is reached on first use, and an outage then degrades
    to misses (see :class:`ResilientCache`).
    """
    if url.startswith("memory://"):
        return MemoryCache()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return ResilientCache(RedisCache(url, key_prefix=key_prefix))
    raise ValueError(f"unsupported cache URL {url.split('://', 1)[0]!r}: use memory:// or redis://")


__all__ = [
    "CACHE_ERRORS",
    "Cache",
    "CacheUnavailable",
    "InvalidationBus",
    "LocalBus",
    "MemoryCache",
    "RedisBus",
    "RedisCache",
    "ResilientCache",
    "invalidation_bus",
    "open_cache",
]
