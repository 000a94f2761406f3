"""Multi-factor sign-in: TOTP authenticators (RFC 6238, pyotp) and one-time recovery codes.

Life cycle of a user's authenticator:

1. :meth:`MfaService.enroll` makes a fresh random secret (160 bits, base32), keeps it
   vault-encrypted (owner ``user:<id>``, purpose :data:`TOTP_PURPOSE`) and returns it
   once, with its ``otpauth://`` URI. MFA is not on yet.
2. :meth:`MfaService.confirm` checks a first code; in one transaction it marks the
   authenticator confirmed, turns ``users.mfa_enabled`` on and stores the SHA-256 of
   :data:`RECOVERY_CODES` fresh recovery codes, which it returns (shown once).
3. From then on a correct password only earns a *challenge* (:meth:`start_challenge`:
   random, stored hashed, single-use, :data:`CHALLENGE_TTL_SECONDS`), which a code
   turns into a session (``AuthService.verify_mfa``).
4. :meth:`MfaService.disable` needs a current code (or a recovery code).

Single use: a TOTP code is accepted for its time step (±1 step of clock skew) only if
that step is later than the last accepted one, decided by one conditional UPDATE, so a
code (or an older one) replayed within its window fails, even concurrently. A recovery
code is consumed by one conditional UPDATE too. Throttling is the caller's
(``AuthService``: the same per-account reservation as passwords).

Secrets and codes never reach logs or error messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyotp
from sqlalchemy import delete, select, update

from controller.errors import FailedPrecondition
from controller.store.db import Store
from controller.store.models import MfaChallenge, MfaRecoveryCode, User, UserMfa, new_id
from controller.store.paging import execute_update
from controller.vault import Vault

TOTP_PURPOSE = "mfa-totp"
"""Vault purpose of a TOTP secret (owner ``user:<id>``)."""

TOTP_INTERVAL = 30
"""Seconds per TOTP time step (RFC 6238 default)."""

TOTP_DIGITS = 6

TOTP_SKEW_STEPS = 1
"""Steps of clock skew accepted either side of now."""

RECOVERY_CODES = 10
"""Recovery codes issued on confirmation."""

CHALLENGE_TTL_SECONDS = 300.0
"""How long a sign-in challenge (the password step's proof) may be completed."""

DEFAULT_ISSUER = "Automator67"


def user_owner(user_id: str) -> str:
    """The vault owner of a user's TOTP secret."""
    return f"user:{user_id}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalise_recovery_code(code: str) -> str:
    """Recovery codes compare without case, spaces or dashes."""
    return "".join(ch for ch in code.lower() if ch.isalnum())


def new_recovery_code() -> str:
    """``xxxxx-xxxxx``: 50 random bits in lower-case base32."""
    raw = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:10]
    return f"{raw[:5]}-{raw[5:]}"


def looks_like_totp(code: str) -> bool:
    return len(code) == TOTP_DIGITS and code.isascii() and code.isdigit()


@dataclass(frozen=True)
class Enrollment:
    """What :meth:`MfaService.enroll` returns (shown to the user once)."""

    secret: str
    otpauth_uri: str

    def __repr__(self) -> str:  # never print the secret
        return "Enrollment(secret=<redacted>)"


class MfaService:
    """TOTP enrolment, verification, recovery codes and sign-in challenges."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        *,
        clock: Callable[[], float] = time.time,
        issuer: str = DEFAULT_ISSUER,
        challenge_ttl_seconds: float = CHALLENGE_TTL_SECONDS,
    ) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._issuer = issuer
        self._challenge_ttl = challenge_ttl_seconds

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    # -- enrolment ------------------------------------------------------------

    async def enroll(self, user_id: str, email: str) -> Enrollment:
        """A fresh secret for ``user_id`` (replacing an unconfirmed one); refused when MFA is on."""
        secret = pyotp.random_base32(32)
        sealed = self._vault.encrypt_str(secret, owner=user_owner(user_id), purpose=TOTP_PURPOSE)
        async with self._store.session() as session:
            existing = await session.get(UserMfa, user_id, with_for_update=True)
            if existing is not None and existing.confirmed_at is not None:
                raise FailedPrecondition(
                    "Multi-factor sign-in is already on; disable it first to enrol another authenticator",
                    reason="MFA_ALREADY_ENABLED",
                )
            if existing is not None:
                await session.delete(existing)
                await session.flush()
            session.add(UserMfa(user_id=user_id, secret_encrypted=sealed, created_at=self._now()))
        uri = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL).provisioning_uri(
            name=email, issuer_name=self._issuer
        )
        return Enrollment(secret=secret, otpauth_uri=uri)

    async def confirm(self, user_id: str, code: str) -> list[str] | None:
        """Turn MFA on with a first valid code; the recovery codes, or None if the code is wrong."""
        row = await self._get(user_id)
        if row is None:
            raise FailedPrecondition(
                "No authenticator is being enrolled: call EnrollMfa first", reason="MFA_NOT_ENROLLED"
            )
        if row.confirmed_at is not None:
            raise FailedPrecondition("Multi-factor sign-in is already on", reason="MFA_ALREADY_ENABLED")
        step = self._matching_step(row, code, reason="confirm enrolment")
        if step is None:
            return None
        codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]
        now = self._now()
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(UserMfa)
                .where(
                    UserMfa.user_id == user_id,
                    UserMfa.confirmed_at.is_(None),
                    UserMfa.last_used_step < step,
                    UserMfa.secret_encrypted == row.secret_encrypted,
                )
                .values(confirmed_at=now, last_used_step=step),
            )
            if changed != 1:
                return None  # replayed, or enrolment replaced meanwhile
            await session.execute(
                delete(MfaRecoveryCode)
                .where(MfaRecoveryCode.user_id == user_id)
                .execution_options(synchronize_session=False)
            )
            for code_text in codes:
                session.add(
                    MfaRecoveryCode(
                        id=new_id(),
                        user_id=user_id,
                        code_hash=_sha256(normalise_recovery_code(code_text)),
                        created_at=now,
                    )
                )
            await session.execute(update(User).where(User.id == user_id).values(mfa_enabled=True))
        return codes

    async def disable(self, user_id: str) -> None:
        """Forget the authenticator and recovery codes; MFA off (the caller checked a code)."""
        async with self._store.session() as session:
            for model in (MfaRecoveryCode, MfaChallenge, UserMfa):
                await session.execute(
                    delete(model).where(model.user_id == user_id).execution_options(synchronize_session=False)
                )
            await session.execute(update(User).where(User.id == user_id).values(mfa_enabled=False))

    async def is_enabled(self, user_id: str) -> bool:
        row = await self._get(user_id)
        return row is not None and row.confirmed_at is not None

    # -- codes ------------------------------------------------------------------

    async def use_code(self, user_id: str, code: str, *, reason: str) -> bool:
        """Whether ``code`` is a current TOTP code not used before (and now it is)."""
        row = await self._get(user_id)
        if row is None or row.confirmed_at is None:
            return False
        step = self._matching_step(row, code, reason=reason)
        if step is None:
            return False
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(UserMfa)
                .where(
                    UserMfa.user_id == user_id,
                    UserMfa.confirmed_at.is_not(None),
                    UserMfa.last_used_step < step,
                )
                .values(last_used_step=step),
            )
        return changed == 1

    async def use_recovery_code(self, user_id: str, code: str) -> bool:
        """Whether ``code`` is one of the user's unused recovery codes (and now it is used)."""
        normalised = normalise_recovery_code(code)
        if not normalised or len(normalised) > 64:
            return False
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(MfaRecoveryCode)
                .where(
                    MfaRecoveryCode.user_id == user_id,
                    MfaRecoveryCode.code_hash == _sha256(normalised),
                    MfaRecoveryCode.used_at.is_(None),
                )
                .values(used_at=self._now()),
            )
        return changed == 1

    async def recovery_codes_left(self, user_id: str) -> int:
        async with self._store.session() as session:
            rows = await session.execute(
                select(MfaRecoveryCode.id).where(
                    MfaRecoveryCode.user_id == user_id, MfaRecoveryCode.used_at.is_(None)
                )
            )
            return len(rows.all())

    def _matching_step(self, row: UserMfa, code: str, *, reason: str) -> int | None:
        code = code.strip().replace(" ", "")
        if not looks_like_totp(code):
            return None
        from controller.vault.audit import audit_context

        with audit_context(reason=f"mfa: {reason}"):
            secret = self._vault.decrypt_str(
                row.secret_encrypted, owner=user_owner(row.user_id), purpose=TOTP_PURPOSE
            )
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL)
        now_step = int(self._clock()) // TOTP_INTERVAL
        found: int | None = None
        for step in range(now_step - TOTP_SKEW_STEPS, now_step + TOTP_SKEW_STEPS + 1):
            if hmac.compare_digest(totp.generate_otp(step), code):
                found = step
        return found

    async def _get(self, user_id: str) -> UserMfa | None:
        async with self._store.session() as session:
            return await session.get(UserMfa, user_id)

    # -- sign-in challenges -------------------------------------------------------

    async def start_challenge(self, user_id: str) -> str:
        """A fresh single-use challenge for the second step of a sign-in."""
        token = "a67m_" + secrets.token_urlsafe(32)
        now = self._now()
        async with self._store.session() as session:
            session.add(
                MfaChallenge(
                    id=new_id(),
                    token_hash=_sha256(token),
                    user_id=user_id,
                    created_at=now,
                    expires_at=now + timedelta(seconds=self._challenge_ttl),
                )
            )
        return token

    async def challenge_user(self, token: str) -> str | None:
        """The user of a live (unused, unexpired) challenge, or None."""
        if not token or len(token) > 256:
            return None
        async with self._store.session() as session:
            row = (
                await session.execute(select(MfaChallenge).where(MfaChallenge.token_hash == _sha256(token)))
            ).scalar_one_or_none()
        if row is None or row.used_at is not None or row.expires_at <= self._now():
            return None
        return row.user_id

    async def consume_challenge(self, token: str) -> bool:
        """Spend a challenge; False if it was spent (or expired) meanwhile."""
        now = self._now()
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(MfaChallenge)
                .where(
                    MfaChallenge.token_hash == _sha256(token),
                    MfaChallenge.used_at.is_(None),
                    MfaChallenge.expires_at > now,
                )
                .values(used_at=now),
            )
            # Expired challenges are of no use to anyone: drop them as we go.
            await session.execute(
                delete(MfaChallenge)
                .where(MfaChallenge.expires_at <= now - timedelta(seconds=self._challenge_ttl))
                .execution_options(synchronize_session=False)
            )
        return changed == 1


__all__ = [
    "CHALLENGE_TTL_SECONDS",
    "RECOVERY_CODES",
    "TOTP_PURPOSE",
    "Enrollment",
    "MfaService",
    "new_recovery_code",
    "normalise_recovery_code",
]
