"""Node enrollment tokens: short-lived, bounded-use bearer tokens with which nodes register.

A signed-in user creates one (``NodeService.CreateEnrollmentToken``) and hands it to
the agent (``a67 agent --token …``); the agent presents it once in ``RegisterNode``.

* Format: ``a67e_`` followed by 43 url-safe base64 characters (256 random bits).
  The prefix makes leaked tokens easy to find with secret scanners.
* Only ``SHA-256(token)`` (hex) is stored, in ``node_enrollment_tokens``; the token
  itself is shown once, in the create response, and never logged.
* Lifetime 60 s to 24 h (default 1 h); 1 to 100 uses (default 1).
* Using a token is one conditional ``UPDATE … SET uses = uses + 1 WHERE token_hash = :h
  AND uses < max_uses AND expires_at > :now`` whose row count decides: of any number of
  concurrent registrations with a 1-use token exactly one wins, on SQLite and
  PostgreSQL alike.
* Every failure (malformed, unknown, expired, used up) is the same
  :class:`~controller.errors.Unauthenticated` (reason ``ENROLLMENT_TOKEN_INVALID``), so a
  caller learns nothing about which tokens exist.

Example::

    tokens = EnrollmentTokens(store)
    issued = await tokens.create(user_id, ttl_seconds=600, max_uses=3)
    user_id = await tokens.consume(issued.token)
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.errors import FieldViolation, Unauthenticated, require_fields
from controller.store.db import Store
from controller.store.models import NodeEnrollmentToken, new_id

TOKEN_PREFIX = "a67e_"  # noqa: S105 - a public prefix, not a secret
TOKEN_RANDOM_BYTES = 32
"""256 bits of entropy; ``token_urlsafe`` encodes them as 43 characters."""

DEFAULT_TTL_SECONDS = 3600
MIN_TTL_SECONDS = 60
MAX_TTL_SECONDS = 86400
DEFAULT_MAX_USES = 1
MAX_USES = 100

REASON_INVALID = "ENROLLMENT_TOKEN_INVALID"
INVALID_MESSAGE = "The enrollment token is invalid, expired or used up"

_TOKEN_PATTERN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{22,128}")

Clock = Callable[[], float]


@dataclass(frozen=True)
class IssuedEnrollmentToken:
    """A newly created token: the only time the token itself is available."""

    token: str = field(repr=False)
    expires_at: datetime
    max_uses: int


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256 of its UTF-8 bytes, lower-case hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def invalid_token() -> Unauthenticated:
    """The one error for every unusable enrollment token."""
    return Unauthenticated(INVALID_MESSAGE, reason=REASON_INVALID)


def _well_formed(token: object) -> bool:
    return isinstance(token, str) and _TOKEN_PATTERN.fullmatch(token) is not None


class EnrollmentTokens:
    """Creates, checks and consumes node enrollment tokens."""

    def __init__(self, store: Store, clock: Clock = time.time) -> None:
        self._store = store
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def create(
        self, user_id: str, ttl_seconds: int = DEFAULT_TTL_SECONDS, max_uses: int = DEFAULT_MAX_USES
    ) -> IssuedEnrollmentToken:
        """Create a token for ``user_id``'s nodes.

        ``ttl_seconds`` 0 means the default (3600), otherwise 60..86400; ``max_uses``
        0 means the default (1), otherwise 1..100. ``InvalidArgument`` with field
        violations on ``ttl_seconds`` / ``max_uses`` otherwise.
        """
        ttl_seconds = ttl_seconds or DEFAULT_TTL_SECONDS
        max_uses = max_uses or DEFAULT_MAX_USES
        violations: list[FieldViolation] = []
        if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
            violations.append(
                FieldViolation(
                    "ttl_seconds", f"must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS} seconds"
                )
            )
        if not 1 <= max_uses <= MAX_USES:
            violations.append(FieldViolation("max_uses", f"must be between 1 and {MAX_USES}"))
        require_fields(violations, "The enrollment token request is invalid")

        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)
        now = self._now()
        expires_at = now + timedelta(seconds=ttl_seconds)
        async with self._store.session() as session:
            session.add(
                NodeEnrollmentToken(
                    id=new_id(),
                    user_id=user_id,
                    token_hash=hash_token(token),
                    expires_at=expires_at,
                    max_uses=max_uses,
                    uses=0,
                    created_at=now,
                )
            )
        return IssuedEnrollmentToken(token=token, expires_at=expires_at, max_uses=max_uses)

    async def peek(self, token: str) -> str:
        """The user id of a usable token (well formed, known, unexpired, uses left), unconsumed.

        Raises the same ``Unauthenticated`` (``ENROLLMENT_TOKEN_INVALID``) for every failure.
        """
        if not _well_formed(token):
            raise invalid_token()
        now = self._now()
        async with self._store.session() as session:
            user_id = await session.scalar(
                select(NodeEnrollmentToken.user_id).where(
                    NodeEnrollmentToken.token_hash == hash_token(token),
                    NodeEnrollmentToken.uses < NodeEnrollmentToken.max_uses,
                    NodeEnrollmentToken.expires_at > now,
                )
            )
        if user_id is None:
            raise invalid_token()
        return str(user_id)

    async def consume(self, token: str, *, session: AsyncSession | None = None) -> str:
        """Use one of the token's uses and return its user id; atomic.

        With ``session``, the use is part of that session's transaction (so it is
        undone if the transaction rolls back, e.g. when the node insert fails).
        Raises the same ``Unauthenticated`` (``ENROLLMENT_TOKEN_INVALID``) for every failure.
        """
        if not _well_formed(token):
            raise invalid_token()
        if session is not None:
            user_id = await self._consume_in(session, token)
        else:
            async with self._store.session() as own:
                user_id = await self._consume_in(own, token)
        if user_id is None:
            raise invalid_token()
        return user_id

    async def _consume_in(self, session: AsyncSession, token: str) -> str | None:
        digest = hash_token(token)
        statement = (
            update(NodeEnrollmentToken)
            .where(
                NodeEnrollmentToken.token_hash == digest,
                NodeEnrollmentToken.uses < NodeEnrollmentToken.max_uses,
                NodeEnrollmentToken.expires_at > self._now(),
            )
            .values(uses=NodeEnrollmentToken.uses + 1)
            .execution_options(synchronize_session=False)
        )
        result = cast(CursorResult[Any], await session.execute(statement))
        if result.rowcount != 1:
            return None
        user_id = await session.scalar(
            select(NodeEnrollmentToken.user_id).where(NodeEnrollmentToken.token_hash == digest)
        )
        return None if user_id is None else str(user_id)

    async def purge_expired(self) -> int:
        """Delete tokens that expired; how many (housekeeping, safe to run any time)."""
        async with self._store.session() as session:
            result = cast(
                CursorResult[Any],
                await session.execute(
                    delete(NodeEnrollmentToken)
                    .where(NodeEnrollmentToken.expires_at <= self._now())
                    .execution_options(synchronize_session=False)
                ),
            )
        return result.rowcount


__all__ = [
    "DEFAULT_MAX_USES",
    "DEFAULT_TTL_SECONDS",
    "INVALID_MESSAGE",
    "MAX_TTL_SECONDS",
    "MAX_USES",
    "MIN_TTL_SECONDS",
    "REASON_INVALID",
    "TOKEN_PREFIX",
    "EnrollmentTokens",
    "IssuedEnrollmentToken",
    "hash_token",
    "invalid_token",
]
