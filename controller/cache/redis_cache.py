"""Redis-backed cache (``redis.asyncio``) for controllers that share state (spec §7).

Timeouts are short (0.5 s by default) and a failed command is retried once at most,
so an outage costs a request milliseconds, not seconds. Unreachable Redis raises
:class:`~controller.cache.base.CacheUnavailable`; wrap the cache in
:class:`~controller.cache.ResilientCache` (``open_cache`` does) to turn that into misses.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from controller.cache.base import CacheUnavailable, check_ttl
from controller.cache.bus import CHANNEL, RedisBus

# INCR, and start the TTL when the counter is created: one atomic step.
_INCR_WITH_TTL = """
local value = redis.call('INCR', KEYS[1])
if value == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return value
"""


def _ms(ttl_seconds: float) -> int:
    return max(1, math.ceil(ttl_seconds * 1000))


class RedisCache:
    """A :class:`~controller.cache.base.Cache` on Redis; every key is stored as ``key_prefix + key``."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "",
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
    ) -> None:
        self._prefix = key_prefix
        self._url = url
        self._bus: RedisBus | None = None
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._incr_script = self._client.register_script(_INCR_WITH_TTL)

    @property
    def key_prefix(self) -> str:
        """What every key is prefixed with in Redis."""
        return self._prefix

    def invalidation_bus(self) -> RedisBus:
        """Pub/sub on ``<key_prefix>a67:invalidate`` of this Redis (see :mod:`controller.cache.bus`)."""
        if self._bus is None:
            self._bus = RedisBus(self._url, self._prefix + CHANNEL)
        return self._bus

    def _k(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._client.get(self._k(key))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc
        if value is None:
            return None
        return value if isinstance(value, bytes) else str(value).encode()

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        check_ttl(ttl_seconds)
        try:
            await self._client.set(self._k(key), value, px=None if ttl_seconds is None else _ms(ttl_seconds))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc

    async def delete(self, key: str) -> None:
        try:
            await self._client.delete(self._k(key))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc

    async def incr(self, key: str, ttl_seconds: float | None = None) -> int:
        check_ttl(ttl_seconds)
        try:
            if ttl_seconds is None:
                return int(await self._client.incr(self._k(key)))
            return int(await self._incr_script(keys=[self._k(key)], args=[_ms(ttl_seconds)]))
        except ResponseError as exc:
            raise ValueError(f"the value under {key!r} is not an integer") from exc
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float | None = None) -> bool:
        check_ttl(ttl_seconds)
        try:
            stored = await self._client.set(
                self._k(key), value, nx=True, px=None if ttl_seconds is None else _ms(ttl_seconds)
            )
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc
        return bool(stored)

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()
        await self._client.aclose()


__all__ = ["RedisCache"]
