"""Sessions' revocation state and user records, in this controller's memory.

Every authenticated call needs its session's state (open or revoked) and
``GetCurrentUser`` the user record; both live in the store. Asking the store (or
Redis) on every call costs a round trip and, for the embedded store, a trip through
the store's worker thread. :class:`AuthCache` keeps both in memory instead:

* **entries expire** ``ttl_seconds`` (:data:`AUTH_CACHE_SECONDS`, 30 s)
  after they were read from the store, so state changed behind the controller's back
  (by hand in the store, or a message lost) is seen within that time;
* **invalidation** makes changes visible at once: a logout or a refresh-token reuse
  (which revoke the session) and a changed user record (sign-in time, password hash)
  are applied to this controller's memory and published on the cache's
  :mod:`invalidation bus <controller.cache.bus>`. With Redis as the cache every
  controller subscribed to it applies them within the pub/sub delivery time
  (milliseconds); while a controller's subscription is down it trusts nothing cached
  and asks the store on every call, and it forgets everything when it subscribes
  again. With the ``memory://`` cache there are no peers to tell: another controller
  sharing the store sees the change when its entry expires (at most ``ttl_seconds``);
* **a read cannot undo an invalidation**: a value read from the store is cached only
  if no invalidation arrived while it was being read (a generation counter), so a
  slow read that saw "open" just before a revocation is not cached over it;
* **revocation is final**: a revoked session stays revoked in memory (until evicted
  by size); only ``open`` states and user records expire.

Memory is bounded (``max_entries`` per kind, oldest evicted first). Times come from
an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from controller.cache.bus import InvalidationBus, LocalBus

AUTH_CACHE_SECONDS = 30.0
"""Default lifetime of a cached open session or user record (seconds)."""

MAX_ENTRIES = 100_000
"""Sessions (and, separately, users) held at most."""

_SESSION = "session-revoked:"
_USER = "user-changed:"


@dataclass(frozen=True)
class UserRecord:
    """What ``GetCurrentUser`` shows of an account: an immutable snapshot of the store's row."""

    id: str
    email: str
    created_at: datetime | None
    last_login: datetime | None
    mfa_enabled: bool
    active: bool


class AuthCache:
    """Session states and user records in memory, invalidated over a bus (see the module docstring)."""

    def __init__(
        self,
        *,
        bus: InvalidationBus | None = None,
        ttl_seconds: float = AUTH_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if not ttl_seconds >= 0:
            raise ValueError("ttl_seconds must not be negative")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._bus: InvalidationBus = bus if bus is not None else LocalBus()
        self._ttl = float(ttl_seconds)
        self._clock = clock
        self._max = max_entries
        # session id -> (revoked, expires at; None = never)
        self._sessions: dict[str, tuple[bool, float | None]] = {}
        self._users: dict[str, tuple[UserRecord, float]] = {}
        self._generation = 0
        self._started = False
        self._bus.subscribe(self._on_message, self.clear)

    @property
    def bus(self) -> InvalidationBus:
        return self._bus

    @property
    def generation(self) -> int:
        """Bumped by every invalidation: take it before a store read, pass it to ``remember_*``."""
        return self._generation

    async def start(self) -> None:
        """Start listening to the bus (idempotent, cheap after the first call)."""
        if not self._started:
            self._started = True
            await self._bus.start()

    # -- sessions ------------------------------------------------------------------

    def session_revoked(self, session_id: str) -> bool | None:
        """True (revoked), False (open) or None (not known here: ask the store)."""
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        revoked, expires_at = entry
        if revoked:
            return True
        if not self._bus.live or (expires_at is not None and self._clock() >= expires_at):
            return None
        return False

    def remember_session(self, session_id: str, revoked: bool, generation: int) -> None:
        """Cache what the store said, unless an invalidation arrived since ``generation``."""
        if generation != self._generation or not self._bus.live:
            return
        if revoked:
            self._put_session(session_id, True)
        elif self._ttl > 0:
            self._put_session(session_id, False)

    async def session_revoked_now(self, session_id: str) -> None:
        """This controller revoked ``session_id`` (already in the store): tell everyone."""
        self._revoke(session_id)
        await self._bus.publish(_SESSION + session_id)

    def _revoke(self, session_id: str) -> None:
        self._generation += 1
        self._put_session(session_id, True)

    def _put_session(self, session_id: str, revoked: bool) -> None:
        sessions = self._sessions
        sessions.pop(session_id, None)
        sessions[session_id] = (revoked, None if revoked else self._clock() + self._ttl)
        if len(sessions) > self._max:
            del sessions[next(iter(sessions))]

    # -- users ---------------------------------------------------------------------

    def user(self, user_id: str) -> UserRecord | None:
        """The cached record of ``user_id``, or None (ask the store)."""
        entry = self._users.get(user_id)
        if entry is None or not self._bus.live:
            return None
        if self._clock() >= entry[1]:
            del self._users[user_id]
            return None
        return entry[0]

    def remember_user(self, record: UserRecord, generation: int) -> None:
        """Cache a record read from the store, unless an invalidation arrived since ``generation``."""
        if generation != self._generation or not self._bus.live or self._ttl <= 0:
            return
        users = self._users
        users.pop(record.id, None)
        users[record.id] = (record, self._clock() + self._ttl)
        if len(users) > self._max:
            del users[next(iter(users))]

    async def user_changed(self, user_id: str) -> None:
        """This controller changed ``user_id``'s row (already in the store): tell everyone."""
        self._forget_user(user_id)
        await self._bus.publish(_USER + user_id)

    def _forget_user(self, user_id: str) -> None:
        self._generation += 1
        self._users.pop(user_id, None)

    # -- the bus -------------------------------------------------------------------

    def _on_message(self, message: str) -> None:
        if message.startswith(_SESSION):
            self._revoke(message[len(_SESSION) :])
        elif message.startswith(_USER):
            self._forget_user(message[len(_USER) :])

    def clear(self) -> None:
        """Forget everything (messages may have been missed)."""
        self._generation += 1
        self._sessions.clear()
        self._users.clear()

    def __len__(self) -> int:
        return len(self._sessions) + len(self._users)


__all__ = ["AUTH_CACHE_SECONDS", "AuthCache", "UserRecord"]
