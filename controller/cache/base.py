"""The cache interface (spec §7): bytes under string keys, with optional TTLs.

The cache is never the only copy of anything that matters: every caller can answer
from the store on a miss. Two implementations: :class:`~controller.cache.memory.MemoryCache`
(in-process, the embedded default) and :class:`~controller.cache.redis_cache.RedisCache`;
:class:`~controller.cache.ResilientCache` turns an outage of the latter into misses.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class CacheUnavailable(Exception):
    """The cache backend cannot be reached (raised by backends, absorbed by ResilientCache)."""


@runtime_checkable
class Cache(Protocol):
    """An async key/value cache. TTLs are in seconds (fractions allowed); None means no expiry."""

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value and TTL."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        ...

    async def incr(self, key: str, ttl_seconds: float | None = None) -> int:
        """Add 1 to the integer under ``key`` (absent counts as 0) and return the new value.

        ``ttl_seconds`` applies when the counter is created (value 1) and is not extended
        by later increments: a fixed window, as rate limits need.
        """
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True if this call stored it."""
        ...

    async def ping(self) -> bool:
        """True if the backend answers (backends may raise when it does not)."""
        ...

    async def close(self) -> None:
        """Release connections; the cache is unusable afterwards."""
        ...


def check_ttl(ttl_seconds: float | None) -> None:
    """Refuse a TTL that is not positive (None, meaning no expiry, is fine)."""
    if ttl_seconds is not None and not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive or None, not {ttl_seconds!r}")


__all__ = ["Cache", "CacheUnavailable", "check_ttl"]
