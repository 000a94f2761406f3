"""Password hashing: argon2id at OWASP's parameters, off the event loop.

The client sends ``password_hash`` (its own salted hash). That value *is* the
password as far as the server is concerned, so it is slow-hashed again here with
argon2id (m=19456 KiB, t=2, p=1: the OWASP Password Storage Cheat Sheet minimum)
and stored in PHC format, which records the parameters so that hashes made with
weaker ones can be upgraded on the next login (:meth:`PasswordHasher.needs_rehash`).

Hashing takes tens of milliseconds of CPU, so every call runs in a worker thread
(``asyncio.to_thread``); argon2 releases the GIL meanwhile, so the event loop keeps
serving. Comparison of the derived hashes is constant-time (inside libargon2).

Example::

    hasher = PasswordHasher()
    stored = await hasher.hash(password_hash)
    if user is None:
        await hasher.dummy_verify()          # same cost as a wrong password
        raise Unauthenticated(...)
    if not await hasher.verify(user.password_hash, password_hash):
        raise Unauthenticated(...)
    if hasher.needs_rehash(user.password_hash):
        user.password_hash = await hasher.hash(password_hash)
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

log = logging.getLogger(__name__)

OWASP_TIME_COST = 2
"""argon2id iterations (OWASP minimum with 19 MiB)."""

OWASP_MEMORY_COST = 19456
"""argon2id memory in KiB (19 MiB)."""

OWASP_PARALLELISM = 1
"""argon2id lanes."""

MAX_SECRET_LENGTH = 1024
"""Longest secret accepted, in characters (the same cap as request validation)."""

# A hash of a random value nobody knows, at the OWASP parameters: verifying
# anything against it costs what a real verification costs and always fails.
_OWASP_DUMMY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$NAbhwffLNhE9HS1WvuwjxQ$CIC//8ZqoO1VK0LxlPsDjDz2nhqsDOir39K+qzzQ17o"
)


class PasswordHasher:
    """argon2id hashing and verification that never blocks the event loop.

    The defaults are OWASP's parameters; tests may pass cheaper ones.
    """

    def __init__(
        self,
        *,
        time_cost: int = OWASP_TIME_COST,
        memory_cost: int = OWASP_MEMORY_COST,
        parallelism: int = OWASP_PARALLELISM,
        max_secret_length: int = MAX_SECRET_LENGTH,
    ) -> None:
        if max_secret_length <= 0:
            raise ValueError("max_secret_length must be positive")
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=argon2.Type.ID,
        )
        self.max_secret_length = max_secret_length
        owasp = (time_cost, memory_cost, parallelism) == (
            OWASP_TIME_COST,
            OWASP_MEMORY_COST,
            OWASP_PARALLELISM,
        )
        self._dummy_hash: str | None = _OWASP_DUMMY_HASH if owasp else None

    @property
    def parameters(self) -> tuple[int, int, int]:
        """``(time_cost, memory_cost_kib, parallelism)`` used for new hashes."""
        return (self._hasher.time_cost, self._hasher.memory_cost, self._hasher.parallelism)

    def _check_length(self, secret: str) -> None:
        if not isinstance(secret, str):
            raise TypeError("the secret must be a string")
        if not secret:
            raise ValueError("the secret must not be empty")
        if len(secret) > self.max_secret_length:
            raise ValueError(f"the secret is longer than {self.max_secret_length} characters")

    async def hash(self, secret: str) -> str:
        """The PHC string (``$argon2id$v=19$m=19456,t=2,p=1$…``) of ``secret``.

        Raises ``ValueError`` for an empty secret or one over ``max_secret_length``
        (never truncates).
        """
        self._check_length(secret)
        return await asyncio.to_thread(self._hasher.hash, secret)

    async def verify(self, stored_hash: str, secret: str) -> bool:
        """Whether ``secret`` matches ``stored_hash``; never raises for a mismatch.

        A secret that is empty or too long does not match, but still costs one
        verification, so the answer takes the same time.
        """
        try:
            self._check_length(secret)
        except (TypeError, ValueError):
            await self.dummy_verify()
            return False
        return await asyncio.to_thread(self._verify_sync, stored_hash, secret)

    def _verify_sync(self, stored_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, secret)
        except VerifyMismatchError:
            return False
        except InvalidHashError:
            log.error("a stored password hash is not a valid argon2 hash; treating it as a mismatch")
            return False
        except VerificationError:
            return False

    async def dummy_verify(self, secret: str | None = None) -> None:
        """Spend the time of one verification, for logins with an unknown email.

        Verifies ``secret`` (or a fixed value) against a precomputed hash of a
        random value, made with this hasher's parameters (computed once on first
        use when they are not the defaults). Always fails, never raises.
        """
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(self._hasher.hash, secrets.token_urlsafe(32))
        candidate = secret if isinstance(secret, str) and 0 < len(secret) <= self.max_secret_length else None
        await asyncio.to_thread(self._verify_sync, self._dummy_hash, candidate or "not-the-password")

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with other parameters (or is unreadable)."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError):
            return True

    def __repr__(self) -> str:
        t, m, p = self.parameters
        return f"PasswordHasher(argon2id, m={m}, t={t}, p={p})"
