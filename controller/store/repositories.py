"""Repositories over the :class:`~controller.store.db.Store` used by the auth service.

Each method is one unit of work (its own transaction) and takes and returns plain
values or model objects detached from their session. Other subsystems add their own
repositories in their own modules, in the same style.

Races are settled by the database, never by read-then-write in Python: unique
constraints for sign-up, and a single conditional ``UPDATE`` whose row count tells
the winner for refresh-token rotation and for the reservation of a login attempt
(:meth:`AuthFailureRepository.reserve_attempt`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError

from controller.errors import AlreadyExists
from controller.store.db import Store
from controller.store.models import (
    AuthFailure,
    RefreshToken,
    RefreshTokenFamily,
    User,
    new_id,
    normalise_email,
    utcnow,
)
from controller.store.paging import execute_update


class UserRepository:
    """Accounts."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(self, email: str, password_hash: str, *, now: datetime | None = None) -> User:
        """Create an account; ``AlreadyExists`` (``EMAIL_TAKEN``) if the email is in use.

        Race-safe: of two concurrent sign-ups with one email, the unique constraint
        lets exactly one through.
        """
        user = User(
            id=new_id(),
            email=normalise_email(email),
            password_hash=password_hash,
            created_at=now or utcnow(),
            mfa_enabled=False,
            active=True,
        )
        try:
            async with self._store.session() as session:
                session.add(user)
        except IntegrityError as exc:
            raise AlreadyExists("An account with this email already exists", reason="EMAIL_TAKEN") from exc
        return user

    async def get_by_email(self, email: str) -> User | None:
        """The account with this email (compared normalised), or None."""
        async with self._store.session() as session:
            result = await session.execute(select(User).where(User.email == normalise_email(email)))
            return result.scalar_one_or_none()

    async def get(self, user_id: str) -> User | None:
        """The account with this id, or None."""
        async with self._store.session() as session:
            return await session.get(User, user_id)

    async def touch_last_login(self, user_id: str, when: datetime) -> bool:
        """Record a successful login; False if there is no such user."""
        async with self._store.session() as session:
            changed = await execute_update(
                session, update(User).where(User.id == user_id).values(last_login=when)
            )
        return changed == 1

    async def update_password_hash(self, user_id: str, new_hash: str) -> bool:
        """Replace the password hash (e.g. a rehash with new parameters); False if no such user."""
        async with self._store.session() as session:
            changed = await execute_update(
                session, update(User).where(User.id == user_id).values(password_hash=new_hash)
            )
        return changed == 1


class ConsumeOutcome(enum.StrEnum):
    """What happened to a refresh token presented for rotation."""

    OK = "ok"
    """It was valid and unused; it is now used, and replaced by the new token."""
    REUSED = "reused"
    """It had been used before: a replay, so the caller should revoke its family."""
    UNKNOWN = "unknown"
    """No such token was ever issued (or it was deleted)."""
    FAMILY_REVOKED = "family_revoked"
    """Its family was revoked (logout, reuse detected, password change)."""


@dataclass(frozen=True)
class ConsumeResult:
    """The outcome of :meth:`RefreshTokenRepository.consume`, with whose token it was."""

    outcome: ConsumeOutcome
    family_id: str | None = None
    user_id: str | None = None
    expires_at: datetime | None = None

    @property
    def ok(self) -> bool:
        """Whether the token was consumed by this call."""
        return self.outcome is ConsumeOutcome.OK


class RefreshTokenRepository:
    """Refresh tokens, rotated on every use, grouped in families (one per login)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create_family(self, user_id: str, *, now: datetime | None = None) -> str:
        """Start a new family for a login and return its id."""
        family = RefreshTokenFamily(id=new_id(), user_id=user_id, created_at=now or utcnow())
        async with self._store.session() as session:
            session.add(family)
        return family.id

    async def add_token(
        self, jti: str, family_id: str, user_id: str, issued_at: datetime, expires_at: datetime
    ) -> None:
        """Record an issued refresh token."""
        async with self._store.session() as session:
            session.add(
                RefreshToken(
                    jti=jti,
                    family_id=family_id,
                    user_id=user_id,
                    issued_at=issued_at,
                    expires_at=expires_at,
                )
            )

    async def consume(self, jti: str, replaced_by: str, now: datetime) -> ConsumeResult:
        """Mark token ``jti`` used (replaced by ``replaced_by``) if, and only if, it is unused.

        Atomic: a single conditional ``UPDATE … WHERE used_at IS NULL`` whose row count
        decides, so of any number of concurrent calls for one token exactly one gets
        ``ok``; the others get ``reused``. Expiry is not checked here: the result
        carries ``expires_at`` for the caller (which also verified the token's ``exp``).
        """
        family_live = exists().where(
            RefreshTokenFamily.id == RefreshToken.family_id, RefreshTokenFamily.revoked_at.is_(None)
        )
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(RefreshToken)
                .where(RefreshToken.jti == jti, RefreshToken.used_at.is_(None), family_live)
                .values(used_at=now, replaced_by=replaced_by),
            )
            row = (
                await session.execute(
                    select(
                        RefreshToken.family_id,
                        RefreshToken.user_id,
                        RefreshToken.expires_at,
                        RefreshToken.used_at,
                        RefreshTokenFamily.revoked_at,
                    )
                    .join(RefreshTokenFamily, RefreshTokenFamily.id == RefreshToken.family_id)
                    .where(RefreshToken.jti == jti)
                )
            ).one_or_none()
        if row is None:
            return ConsumeResult(ConsumeOutcome.UNKNOWN)
        family_id, user_id, expires_at, used_at, revoked_at = row
        if changed == 1:
            outcome = ConsumeOutcome.OK
        elif used_at is not None:
            outcome = ConsumeOutcome.REUSED
        elif revoked_at is not None:
            outcome = ConsumeOutcome.FAMILY_REVOKED
        else:  # pragma: no cover - the UPDATE matched nothing yet the token is unused and live
            outcome = ConsumeOutcome.REUSED
        return ConsumeResult(outcome, family_id=family_id, user_id=user_id, expires_at=expires_at)

    async def revoke_family(self, family_id: str, reason: str, now: datetime) -> bool:
        """Revoke a family (idempotent: the first reason is kept); True if this call revoked it."""
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(RefreshTokenFamily)
                .where(RefreshTokenFamily.id == family_id, RefreshTokenFamily.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason),
            )
        return changed == 1

    async def revoke_all_for_user(self, user_id: str, reason: str, now: datetime) -> int:
        """Revoke every live family of a user (e.g. after a password change); how many."""
        async with self._store.session() as session:
            return await execute_update(
                session,
                update(RefreshTokenFamily)
                .where(RefreshTokenFamily.user_id == user_id, RefreshTokenFamily.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason),
            )

    async def is_family_revoked(self, family_id: str) -> bool:
        """Whether the family is revoked; an unknown family counts as revoked."""
        async with self._store.session() as session:
            result = await session.execute(
                select(RefreshTokenFamily.revoked_at).where(RefreshTokenFamily.id == family_id)
            )
            row = result.one_or_none()
        return row is None or row[0] is not None


@dataclass(frozen=True)
class AttemptReservation:
    """The answer of :meth:`AuthFailureRepository.reserve_attempt`."""

    granted: bool
    """Whether the caller may check the credentials now (the attempt is counted)."""
    attempts: int
    """Attempts counted in the current window, this one included when granted."""
    locked_until: datetime | None
    """When refused because of a lock: when it ends (None if refused under contention)."""


class AuthFailureRepository:
    """Failed-login counters in fixed windows, keyed by e.g. ``login:<email>``."""

    _TRIES = 5
    """How often an upsert is retried after losing an insert race (each retry then updates)."""

    _RESERVE_TRIES = 12
    """How often a reservation is retried after losing a compare-and-set race. Every
    lost race means another caller's reservation was counted, so after a few losses
    the key is normally locked; if not, the caller is refused (fail closed)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def reserve_attempt(
        self,
        key: str,
        now: datetime,
        *,
        window_seconds: float,
        lock_seconds: Callable[[int], float],
    ) -> AttemptReservation:
        """Count one attempt for ``key`` *before* its credentials are checked, unless locked.

        The attempt is counted as a failure up front (the caller resets the key on
        success), and the lock that the new count calls for (``lock_seconds(count)``
        seconds, 0 for none) is set in the same statement. Atomic: a single
        conditional ``UPDATE … WHERE failures = <the count read> AND (locked_until IS
        NULL OR locked_until <= now)`` whose row count decides, as for refresh-token
        rotation; a caller that loses the race reads again. So reservations of one
        key are serialised: the k-th granted one in a window sets the count to k and,
        when ``lock_seconds(k) > 0``, the lock that refuses every reservation after it
        until it ends, however many requests arrive at once.

        A window starts at the first attempt and lasts ``window_seconds``; the first
        attempt after it starts a new one at 1.
        """
        cutoff = now - timedelta(seconds=window_seconds)

        def lock_at(attempts: int) -> datetime | None:
            seconds = lock_seconds(attempts)
            return now + timedelta(seconds=seconds) if seconds > 0 else None

        not_locked = or_(AuthFailure.locked_until.is_(None), AuthFailure.locked_until <= now)
        attempts = 0
        for _ in range(self._RESERVE_TRIES):
            row = await self.get(key)
            if row is None:
                try:
                    async with self._store.session() as session:
                        session.add(
                            AuthFailure(key=key, failures=1, window_started_at=now, locked_until=lock_at(1))
                        )
                        await session.flush()
                except IntegrityError:
                    continue  # someone else's first attempt: read it and count on it
                return AttemptReservation(granted=True, attempts=1, locked_until=None)
            if row.locked_until is not None and row.locked_until > now:
                return AttemptReservation(granted=False, attempts=row.failures, locked_until=row.locked_until)
            if row.window_started_at <= cutoff:
                # The window is over: start a new one, if nobody did meanwhile.
                attempts = 1
                statement = (
                    update(AuthFailure)
                    .where(
                        AuthFailure.key == key,
                        AuthFailure.failures == row.failures,
                        AuthFailure.window_started_at <= cutoff,
                        not_locked,
                    )
                    .values(failures=1, window_started_at=now, locked_until=lock_at(1))
                )
            else:
                attempts = row.failures + 1
                statement = (
                    update(AuthFailure)
                    .where(
                        AuthFailure.key == key,
                        AuthFailure.failures == row.failures,
                        AuthFailure.window_started_at > cutoff,
                        not_locked,
                    )
                    .values(failures=attempts, locked_until=lock_at(attempts))
                )
            async with self._store.session() as session:
                changed = await execute_update(session, statement)
            if changed == 1:
                return AttemptReservation(granted=True, attempts=attempts, locked_until=None)
        return AttemptReservation(granted=False, attempts=attempts, locked_until=None)

    async def record_failure(self, key: str, now: datetime, window_seconds: float) -> int:
        """Count one failure for ``key`` and return the failures in the current window.

        A window starts at the first failure and lasts ``window_seconds``; a failure
        after it starts a new window at 1. Concurrent calls are all counted.
        """
        cutoff = now - timedelta(seconds=window_seconds)
        for _ in range(self._TRIES):
            try:
                async with self._store.session() as session:
                    # 1. In the current window: count it.
                    if await execute_update(
                        session,
                        update(AuthFailure)
                        .where(AuthFailure.key == key, AuthFailure.window_started_at > cutoff)
                        .values(failures=AuthFailure.failures + 1),
                    ):
                        failures = await session.scalar(
                            select(AuthFailure.failures).where(AuthFailure.key == key)
                        )
                        return int(failures or 0)
                    # 2. The window is over: start a new one.
                    if await execute_update(
                        session,
                        update(AuthFailure)
                        .where(AuthFailure.key == key, AuthFailure.window_started_at <= cutoff)
                        .values(failures=1, window_started_at=now),
                    ):
                        return 1
                    # 3. First failure for this key.
                    session.add(AuthFailure(key=key, failures=1, window_started_at=now))
                    await session.flush()
                    return 1
            except IntegrityError:
                continue  # someone inserted the row meanwhile: count on it
        raise RuntimeError(f"could not record an authentication failure after {self._TRIES} tries")

    async def lock(self, key: str, until: datetime, now: datetime) -> None:
        """Lock ``key`` until ``until`` (creating its counter if there is none)."""
        for _ in range(self._TRIES):
            try:
                async with self._store.session() as session:
                    if not await execute_update(
                        session, update(AuthFailure).where(AuthFailure.key == key).values(locked_until=until)
                    ):
                        session.add(
                            AuthFailure(key=key, failures=0, window_started_at=now, locked_until=until)
                        )
                        await session.flush()
                    return
            except IntegrityError:
                continue
        raise RuntimeError(f"could not lock {key!r} after {self._TRIES} tries")

    async def reset(self, key: str) -> None:
        """Forget ``key``'s failures and lock (after a successful login)."""
        async with self._store.session() as session:
            await session.execute(
                delete(AuthFailure).where(AuthFailure.key == key).execution_options(synchronize_session=False)
            )

    async def get(self, key: str) -> AuthFailure | None:
        """The counter of ``key``, or None."""
        async with self._store.session() as session:
            return await session.get(AuthFailure, key)


__all__ = [
    "AttemptReservation",
    "AuthFailureRepository",
    "ConsumeOutcome",
    "ConsumeResult",
    "RefreshTokenRepository",
    "UserRepository",
]
