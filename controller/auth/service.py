"""Accounts and sessions: register, login, refresh rotation, logout (spec §5.1).

A *session* is a refresh-token family. Every refresh token is single-use: using
it consumes it atomically and issues its successor in the same family, so of
many concurrent refreshes with one token exactly one wins. Presenting a token
that was already used means it leaked: the whole family is revoked, and with it
every access token of the session (access tokens carry the family id as
``sid``, which :meth:`AuthService.authenticate` checks).

Failed logins are throttled per account (the normalised email, whether or not
an account exists, so throttling reveals nothing): from the
``THROTTLE_FREE_FAILURES``-th failure within ``THROTTLE_WINDOW_SECONDS`` on, the
account is locked for a delay that doubles with every further failure (1 s,
2 s, 4 s, …) up to ``THROTTLE_MAX_DELAY_SECONDS``; attempts while locked are
refused with ``RESOURCE_EXHAUSTED`` and ``RetryInfo``, without checking the
password. Locks and windows expire on their own, so an account is never locked
for ever.

The throttle holds under concurrency: every attempt first *reserves* its slot
(:meth:`AuthFailureRepository.reserve_attempt`: counted as a failure, and the
lock the new count calls for set, in one conditional UPDATE), and only a granted
attempt checks the password; a success then resets the count. So however many
requests arrive at once, at most ``THROTTLE_FREE_FAILURES`` passwords are checked
before the first lock, and one per lock after it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from controller.api.context import Principal
from controller.auth.mfa import Enrollment, MfaService, looks_like_totp
from controller.auth.passwords import PasswordHasher
from controller.auth.session_cache import AUTH_CACHE_SECONDS, AuthCache, UserRecord
from controller.auth.tokens import IssuedToken, TokenService
from controller.auth.validation import normalise_email, validate_credentials
from controller.cache.base import Cache
from controller.cache.bus import invalidation_bus
from controller.errors import (
    FailedPrecondition,
    FieldViolation,
    ResourceExhausted,
    Unauthenticated,
    require_fields,
)
from controller.store.repositories import AuthFailureRepository, RefreshTokenRepository, UserRepository

log = logging.getLogger(__name__)

# Failures allowed in a window before attempts are delayed.
THROTTLE_FREE_FAILURES = 5
# How long failures are remembered.
THROTTLE_WINDOW_SECONDS = 15 * 60
# Upper bound of the delay between attempts once throttled.
THROTTLE_MAX_DELAY_SECONDS = 15 * 60
# How long a checked session (or user record) stays trusted in memory before the store is
# asked again, unless an invalidation comes first (see controller/auth/session_cache.py).
SESSION_CACHE_SECONDS = AUTH_CACHE_SECONDS

INVALID_CREDENTIALS = "The email or password is not correct"


@dataclass(frozen=True)
class MfaRequired:
    """Login's answer for an account with MFA on: the password was right; a code must follow."""

    user_id: str
    challenge: str

    def __repr__(self) -> str:  # never print the challenge
        return f"MfaRequired(user_id={self.user_id!r})"


@dataclass(frozen=True)
class Session:
    """Tokens handed to a client after register, login or refresh."""

    user_id: str
    access: IssuedToken
    refresh: IssuedToken


class AuthService:
    """The account and session logic behind ``AuthService`` (transport-free)."""

    def __init__(
        self,
        *,
        users: UserRepository,
        refresh_tokens: RefreshTokenRepository,
        failures: AuthFailureRepository,
        tokens: TokenService,
        passwords: PasswordHasher,
        cache: Cache,
        clock: Callable[[], float] = time.time,
        auth_cache: AuthCache | None = None,
        auth_cache_seconds: float = SESSION_CACHE_SECONDS,
        mfa: MfaService | None = None,
    ) -> None:
        self.mfa = mfa
        self._users = users
        self._refresh_tokens = refresh_tokens
        self._failures = failures
        self._tokens = tokens
        self._passwords = passwords
        self._cache = cache
        self._clock = clock
        self._memory = (
            auth_cache
            if auth_cache is not None
            else AuthCache(bus=invalidation_bus(cache), ttl_seconds=auth_cache_seconds, clock=clock)
        )

    @property
    def auth_cache(self) -> AuthCache:
        """Session states and user records held in memory."""
        return self._memory

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def register(self, email: str, password_hash: str) -> Session:
        """Create an account and sign it in; ``AlreadyExists`` if the email is taken."""
        require_fields(validate_credentials(email, password_hash))
        stored = await self._passwords.hash(password_hash)
        user = await self._users.create(normalise_email(email), stored)
        log.info("registered user %s", user.id)
        return await self._start_session(user.id)

    async def login(self, email: str, password_hash: str) -> Session | MfaRequired:
        """Verify credentials and start a session; the same error for any mismatch.

        For an account with MFA on, a right password earns :class:`MfaRequired` (a
        single-use challenge for :meth:`verify_mfa`) instead, and the account's
        failure count is *not* reset: wrong codes count against the same throttle
        as wrong passwords, and only a complete sign-in resets it.
        """
        require_fields(validate_credentials(email, password_hash))
        normalised = normalise_email(email)
        key = f"login:{normalised}"
        await self._reserve_attempt(key)
        user = await self._users.get_by_email(normalised)
        if user is None or not user.active:
            await self._passwords.dummy_verify(password_hash)
            ok = False
        else:
            ok = await self._passwords.verify(user.password_hash, password_hash)
        if not ok or user is None:
            # Already counted by the reservation.
            raise Unauthenticated(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")
        if self._passwords.needs_rehash(user.password_hash):
            await self._users.update_password_hash(user.id, await self._passwords.hash(password_hash))
        if user.mfa_enabled:
            mfa = self._require_mfa()
            return MfaRequired(user_id=user.id, challenge=await mfa.start_challenge(user.id))
        await self._failures.reset(key)
        await self._users.touch_last_login(user.id, self._now())
        await self._memory.user_changed(user.id)
        return await self._start_session(user.id)

    # -- multi-factor sign-in ------------------------------------------------------

    def _require_mfa(self) -> MfaService:
        if self.mfa is None:
            raise FailedPrecondition(
                "Multi-factor sign-in is not configured on this controller", reason="MFA_UNAVAILABLE"
            )
        return self.mfa

    async def verify_mfa(self, challenge: str, code: str, recovery_code: str) -> Session:
        """Complete a sign-in with a challenge from :meth:`login` and a code.

        Every attempt reserves a slot of the account's login throttle first (so at
        most 5 codes, then one per lock, however many arrive at once); a wrong or
        replayed code is ``UNAUTHENTICATED`` (``INVALID_MFA_CODE``), and the challenge
        stays usable until it expires or a sign-in completes.
        """
        mfa = self._require_mfa()
        require_fields(_code_violations(code, recovery_code, challenge=challenge))
        user_id = await mfa.challenge_user(challenge)
        if user_id is None:
            raise Unauthenticated(
                "This sign-in challenge is not valid or has expired; sign in again",
                reason="MFA_CHALLENGE_INVALID",
            )
        user = await self._users.get(user_id)
        if user is None or not user.active:
            raise Unauthenticated("This account is not active", reason="ACCOUNT_INACTIVE")
        key = f"login:{user.email}"
        await self._reserve_attempt(key)
        if recovery_code:
            ok = await mfa.use_recovery_code(user.id, recovery_code)
        else:
            ok = await mfa.use_code(user.id, code, reason="sign-in")
        if not ok:
            raise Unauthenticated("The code is not correct or was already used", reason="INVALID_MFA_CODE")
        if not await mfa.consume_challenge(challenge):
            raise Unauthenticated(
                "This sign-in challenge was already used; sign in again", reason="MFA_CHALLENGE_INVALID"
            )
        await self._failures.reset(key)
        await self._users.touch_last_login(user.id, self._now())
        await self._memory.user_changed(user.id)
        return await self._start_session(user.id)

    async def enroll_mfa(self, user_id: str) -> Enrollment:
        """Start enrolling an authenticator (``FAILED_PRECONDITION`` if MFA is on)."""
        mfa = self._require_mfa()
        user = await self._users.get(user_id)
        if user is None:
            raise Unauthenticated("This account no longer exists", reason="ACCOUNT_INACTIVE")
        return await mfa.enroll(user.id, user.email)

    async def confirm_mfa(self, user_id: str, code: str) -> list[str]:
        """Turn MFA on with a first code (throttled); the recovery codes."""
        mfa = self._require_mfa()
        require_fields(_code_violations(code, ""))
        user = await self._users.get(user_id)
        if user is None:
            raise Unauthenticated("This account no longer exists", reason="ACCOUNT_INACTIVE")
        key = f"login:{user.email}"
        await self._reserve_attempt(key)
        codes = await mfa.confirm(user.id, code)
        if codes is None:
            raise Unauthenticated("The code is not correct or was already used", reason="INVALID_MFA_CODE")
        await self._failures.reset(key)
        await self._memory.user_changed(user.id)
        log.info("user %s turned multi-factor sign-in on", user.id)
        return codes

    async def disable_mfa(self, user_id: str, code: str, recovery_code: str) -> None:
        """Turn MFA off; needs a current code or a recovery code (throttled)."""
        mfa = self._require_mfa()
        require_fields(_code_violations(code, recovery_code))
        user = await self._users.get(user_id)
        if user is None:
            raise Unauthenticated("This account no longer exists", reason="ACCOUNT_INACTIVE")
        if not await mfa.is_enabled(user.id):
            raise FailedPrecondition("Multi-factor sign-in is not on", reason="MFA_NOT_ENABLED")
        key = f"login:{user.email}"
        await self._reserve_attempt(key)
        if recovery_code:
            ok = await mfa.use_recovery_code(user.id, recovery_code)
        else:
            ok = await mfa.use_code(user.id, code, reason="disable")
        if not ok:
            raise Unauthenticated("The code is not correct or was already used", reason="INVALID_MFA_CODE")
        await self._failures.reset(key)
        await mfa.disable(user.id)
        await self._memory.user_changed(user.id)
        log.info("user %s turned multi-factor sign-in off", user.id)

    async def refresh(self, refresh_token: str) -> Session:
        """Rotate a refresh token; reuse of a spent one revokes its session."""
        claims = self._tokens.verify_refresh(refresh_token)
        successor = self._tokens.issue_refresh(claims.user_id, claims.session_id)
        result = await self._refresh_tokens.consume(claims.jti, successor.jti, self._now())
        if result.outcome == "reused":
            await self._revoke_session(claims.session_id, "refresh token reuse")
            log.warning(
                "refresh token reuse for user %s: session %s revoked", claims.user_id, claims.session_id
            )
            raise Unauthenticated(
                "This refresh token was already used; the session has been ended for safety",
                reason="REFRESH_TOKEN_REUSED",
            )
        if result.outcome != "ok":
            raise Unauthenticated("This session has ended; sign in again", reason="SESSION_REVOKED")
        user = await self._users.get(claims.user_id)
        if user is None or not user.active:
            raise Unauthenticated("This account is not active", reason="ACCOUNT_INACTIVE")
        await self._refresh_tokens.add_token(
            successor.jti,
            claims.session_id,
            claims.user_id,
            self._now(),
            datetime.fromtimestamp(successor.expires_at, UTC),
        )
        access = self._tokens.issue_access(claims.user_id, claims.session_id)
        return Session(user_id=claims.user_id, access=access, refresh=successor)

    async def logout(self, principal: Principal) -> None:
        """End the caller's session."""
        await self._revoke_session(principal.session_id, "logout")

    async def authenticate(self, token: str) -> Principal:
        """Verify an access token and that its session is still open.

        The common path does no I/O: the token's signature is checked once per token
        (:meth:`TokenService.verify_access`) and the session's state comes from memory
        (:class:`~controller.auth.session_cache.AuthCache`); the store is asked when
        the state is not known here (first use, expired, or the bus is down).
        """
        claims = self._tokens.verify_access(token)
        revoked = self._memory.session_revoked(claims.session_id)
        if revoked is None:
            await self._memory.start()
            generation = self._memory.generation
            revoked = await self._refresh_tokens.is_family_revoked(claims.session_id)
            self._memory.remember_session(claims.session_id, revoked, generation)
        if revoked:
            raise Unauthenticated("This session has ended; sign in again", reason="SESSION_REVOKED")
        return Principal(user_id=claims.user_id, session_id=claims.session_id, token_id=claims.jti)

    async def current_user(self, user_id: str) -> UserRecord | None:
        """The account ``user_id`` (from memory when known there), or None if it does not exist."""
        record = self._memory.user(user_id)
        if record is not None:
            return record
        await self._memory.start()
        generation = self._memory.generation
        user = await self._users.get(user_id)
        if user is None:
            return None
        record = UserRecord(
            id=user.id,
            email=user.email,
            created_at=user.created_at,
            last_login=user.last_login,
            mfa_enabled=user.mfa_enabled,
            active=user.active,
        )
        self._memory.remember_user(record, generation)
        return record

    async def _start_session(self, user_id: str) -> Session:
        session_id = await self._refresh_tokens.create_family(user_id)
        refresh = self._tokens.issue_refresh(user_id, session_id)
        await self._refresh_tokens.add_token(
            refresh.jti, session_id, user_id, self._now(), datetime.fromtimestamp(refresh.expires_at, UTC)
        )
        access = self._tokens.issue_access(user_id, session_id)
        return Session(user_id=user_id, access=access, refresh=refresh)

    async def _revoke_session(self, session_id: str, reason: str) -> None:
        await self._refresh_tokens.revoke_family(session_id, reason, self._now())
        await self._memory.session_revoked_now(session_id)

    async def _reserve_attempt(self, key: str) -> None:
        """Count this attempt before the password is checked; ``ResourceExhausted`` if locked."""
        now = self._now()
        reservation = await self._failures.reserve_attempt(
            key, now, window_seconds=THROTTLE_WINDOW_SECONDS, lock_seconds=throttle_delay
        )
        if reservation.granted:
            return
        if reservation.locked_until is None:
            # Lost the race for a slot again and again: refuse rather than check unthrottled.
            wait = 1.0
        else:
            wait = max((reservation.locked_until - now).total_seconds(), 0.001)
        raise ResourceExhausted(
            f"Too many failed sign-in attempts for this account; try again in {max(wait, 1):.0f} s",
            reason="LOGIN_THROTTLED",
            retry_after=wait,
        )


def _code_violations(code: str, recovery_code: str, *, challenge: str | None = None) -> list[FieldViolation]:
    """Field violations of a code request: exactly one of a 6-digit code and a recovery code."""
    problems: dict[str, str] = {}
    if challenge is not None and not challenge:
        problems["mfa_challenge"] = "is required (LoginResponse.mfa_challenge)"
    if code and recovery_code:
        problems["recovery_code"] = "give either code or recovery_code, not both"
    elif not code and not recovery_code:
        problems["code"] = "is required (a 6-digit code from your authenticator, or recovery_code)"
    elif code and not looks_like_totp(code.strip().replace(" ", "")):
        problems["code"] = "must be the 6 digits your authenticator shows"
    elif recovery_code and len(recovery_code) > 64:
        problems["recovery_code"] = "is too long"
    return [FieldViolation(name, text) for name, text in problems.items()]


def throttle_delay(attempts: int) -> float:
    """Seconds an account is locked after its ``attempts``-th failure in a window (0: none).

    1 s at the ``THROTTLE_FREE_FAILURES``-th, then doubling, at most
    ``THROTTLE_MAX_DELAY_SECONDS``.
    """
    excess = attempts - THROTTLE_FREE_FAILURES
    if excess < 0:
        return 0.0
    return float(min(2 ** min(excess, 64), THROTTLE_MAX_DELAY_SECONDS))


def new_id() -> str:
    """A random identifier."""
    return str(uuid.uuid4())
