"""In-process TTL cache: the embedded default, also the fallback for counters in an outage.

Entries expire by an injected clock (``time.monotonic`` by default), so tests drive
time directly. Expired entries are dropped when touched; past ``max_entries`` the
least recently used entries are evicted, so memory stays bounded. Every operation
holds one ``threading.Lock`` briefly and never awaits while holding it, so the cache
is safe across tasks and threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from controller.cache.base import check_ttl
from controller.cache.bus import LocalBus

_Entry = tuple[bytes, float | None]


class MemoryCache:
    """A bounded, LRU-evicting TTL cache held in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._bus: LocalBus | None = None

    def invalidation_bus(self) -> LocalBus:
        """The in-process bus of everything sharing this cache (see :mod:`controller.cache.bus`)."""
        if self._bus is None:
            self._bus = LocalBus()
        return self._bus

    def __len__(self) -> int:
        """How many entries are held (expired ones not yet purged included)."""
        with self._lock:
            return len(self._entries)

    def _deadline(self, ttl_seconds: float | None) -> float | None:
        check_ttl(ttl_seconds)
        return None if ttl_seconds is None else self._clock() + ttl_seconds

    def _live(self, key: str) -> _Entry | None:
        """The live entry under ``key`` (marked recently used), purging it if expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _store(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._live(key)
            return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        deadline = self._deadline(ttl_seconds)
        with self._lock:
            self._store(key, (bytes(value), deadline))

    async def delete(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    async def incr(self, key: str, ttl_seconds: float | None = None) -> int:
        deadline = self._deadline(ttl_seconds)
        with self._lock:
            entry = self._live(key)
            if entry is None:
                self._store(key, (b"1", deadline))
                return 1
            try:
                value = int(entry[0]) + 1
            except ValueError:
                raise ValueError(f"the value under {key!r} is not an integer") from None
            self._store(key, (str(value).encode(), entry[1]))
            return value

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float | None = None) -> bool:
        deadline = self._deadline(ttl_seconds)
        with self._lock:
            if self._live(key) is not None:
                return False
            self._store(key, (bytes(value), deadline))
            return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()


__all__ = ["MemoryCache"]
