"""Access and refresh tokens: EdDSA (Ed25519) JWTs with a ``kid``, verified strictly.

Two token kinds that cannot stand in for each other (RFC 8725 §3.11):

=========  ===============  ===============  ============
kind       header ``typ``   ``token_use``    lifetime
=========  ===============  ===============  ============
access     ``at+jwt``       ``access``       1 hour
refresh    ``rt+jwt``       ``refresh``      7 days
=========  ===============  ===============  ============

Claims: ``iss``, ``aud``, ``sub`` (user id), ``sid`` (session = refresh-token
family id), ``iat``, ``nbf``, ``exp`` (integer seconds), ``jti`` (uuid4) and
``token_use``.

Verification: canonical base64url segments only; the algorithm allow-list is
``["EdDSA"]`` (so ``alg: none`` and HS256 key-confusion fail before any key is
touched); the ``kid`` must be a plain identifier and name one of the
verification keys; then the signature, the token kind, ``iss``, ``aud``, every
required claim and the times, against the injected clock with a leeway of 0 by
default. PyJWT only checks the signature here; every claim check is ours, so
tests move time by replacing the clock.

Every failure raises :class:`controller.errors.Unauthenticated` with the reason
``TOKEN_EXPIRED``, ``TOKEN_INVALID`` or ``TOKEN_WRONG_TYPE`` and a message for
people that never echoes the token.

Example::

    service = TokenService(private_key, "k-abc", {"k-abc": private_key.public_key()},
                           issuer="automator67-controller", audience="automator67-api",
                           access_ttl=3600, refresh_ttl=7 * 24 * 3600)
    issued = service.issue_access(user_id, session_id)
    claims = service.verify_access(issued.token)       # Claims(user_id=..., ...)
    service.verify_refresh(issued.token)               # Unauthenticated: TOKEN_WRONG_TYPE
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controller.errors import Unauthenticated

if TYPE_CHECKING:
    from controller.config import Settings
    from controller.keys import KeyMaterial

TokenKind = Literal["access", "refresh"]

ALGORITHM = "EdDSA"
"""The only signing algorithm issued or accepted."""

TYP = {"access": "at+jwt", "refresh": "rt+jwt"}
"""Header ``typ`` per token kind."""

REASON_EXPIRED = "TOKEN_EXPIRED"
REASON_INVALID = "TOKEN_INVALID"
REASON_WRONG_TYPE = "TOKEN_WRONG_TYPE"

MAX_TOKEN_LENGTH = 8192
"""Longer bearer values are rejected without parsing."""

MAX_LEEWAY_SECONDS = 300.0
"""Upper bound for the configurable clock-skew leeway."""

KID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a ``kid`` may look like."""

REQUIRED_CLAIMS = ("iss", "aud", "sub", "sid", "iat", "nbf", "exp", "jti", "token_use")

VERIFIED_CACHE_SIZE = 20_000
"""Access tokens whose signature and claims were verified, remembered by their exact text."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_MAX_ID_LENGTH = 256


@dataclass(frozen=True)
class IssuedToken:
    """A freshly signed token and what the caller needs to report about it."""

    token: str
    jti: str
    expires_at: float
    """Expiry as seconds since the epoch (the ``exp`` claim)."""
    expires_in: int
    """Lifetime in seconds from issue (what ``Login`` returns as ``expires_in``)."""

    def __repr__(self) -> str:  # never print the token itself
        return (
            f"IssuedToken(jti={self.jti!r}, expires_at={self.expires_at!r}, expires_in={self.expires_in!r})"
        )


@dataclass(frozen=True)
class Claims:
    """The verified content of a token."""

    user_id: str
    session_id: str
    jti: str
    issued_at: float
    expires_at: float
    not_before: float = field(default=0.0, compare=False, repr=False)
    """``nbf``: kept so that a remembered token's times can be re-checked."""


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _canonical_segments(token: str) -> bool:
    """Three base64url segments, each in its one canonical spelling (no malleable bits)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return False
    for part in parts:
        if _SEGMENT.fullmatch(part) is None or len(part) % 4 == 1:
            return False
        try:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            return False
        if _b64e(raw) != part:
            return False
    return True


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate claim")
        result[key] = value
    return result


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID_LENGTH


class TokenService:
    """Issues and verifies access and refresh tokens."""

    def __init__(
        self,
        signing_key: Ed25519PrivateKey,
        key_id: str,
        verification_keys: Mapping[str, Ed25519PublicKey],
        issuer: str,
        audience: str,
        access_ttl: float,
        refresh_ttl: float,
        clock: Callable[[], float] = time.time,
        *,
        leeway: float = 0.0,
    ) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError("signing_key must be an Ed25519 private key")
        if KID_PATTERN.fullmatch(key_id) is None:
            raise ValueError("key_id must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
        keys = dict(verification_keys)
        for kid, public in keys.items():
            if KID_PATTERN.fullmatch(kid) is None:
                raise ValueError(f"verification key id {kid!r} is not a plain identifier")
            if not isinstance(public, Ed25519PublicKey):
                raise TypeError(f"verification key {kid!r} must be an Ed25519 public key")
        keys.setdefault(key_id, signing_key.public_key())
        if not issuer or not audience:
            raise ValueError("issuer and audience must not be empty")
        if access_ttl <= 0 or refresh_ttl <= 0:
            raise ValueError("token lifetimes must be positive")
        if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
            raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY_SECONDS:g} seconds")
        self._signing_key = signing_key
        self._key_id = key_id
        self._keys: dict[str, Ed25519PublicKey] = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl: dict[TokenKind, int] = {"access": int(access_ttl), "refresh": int(refresh_ttl)}
        self._clock = clock
        self._leeway = float(leeway)
        self._jws = jwt.PyJWS(algorithms=[ALGORITHM])
        # Exact token text -> its verified claims. A token is added only after every
        # check passed; a hit re-checks only the times (against the clock, as on a miss).
        self._verified: dict[str, Claims] = {}

    @classmethod
    def from_key_material(
        cls,
        material: KeyMaterial,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        leeway: float = 0.0,
    ) -> TokenService:
        """Build from :func:`controller.keys.load_key_material` output and the settings."""
        return cls(
            material.jwt_signing_key,
            material.jwt_key_id,
            material.verification_keys,
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.access_token_ttl_seconds,
            settings.refresh_token_ttl_seconds,
            clock,
            leeway=leeway,
        )

    @property
    def key_id(self) -> str:
        """The ``kid`` of tokens issued now."""
        return self._key_id

    @property
    def access_ttl(self) -> int:
        """Access-token lifetime in seconds."""
        return self._ttl["access"]

    @property
    def refresh_ttl(self) -> int:
        """Refresh-token lifetime in seconds."""
        return self._ttl["refresh"]

    # -- issuing ------------------------------------------------------------

    def issue_access(self, user_id: str, session_id: str) -> IssuedToken:
        """A signed access token for ``user_id`` in session ``session_id``."""
        return self._issue("access", user_id, session_id)

    def issue_refresh(self, user_id: str, session_id: str) -> IssuedToken:
        """A signed refresh token for ``user_id``; ``session_id`` names its rotation family."""
        return self._issue("refresh", user_id, session_id)

    def _issue(self, kind: TokenKind, user_id: str, session_id: str) -> IssuedToken:
        if not _is_id(user_id) or not _is_id(session_id):
            raise ValueError(f"user_id and session_id must be non-empty strings of at most {_MAX_ID_LENGTH}")
        now = math.floor(self._clock())
        ttl = self._ttl[kind]
        jti = str(uuid.uuid4())
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": user_id,
            "sid": session_id,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": jti,
            "token_use": kind,
        }
        token = jwt.encode(
            payload,
            self._signing_key,
            algorithm=ALGORITHM,
            headers={"kid": self._key_id, "typ": TYP[kind]},
        )
        return IssuedToken(token=token, jti=jti, expires_at=float(now + ttl), expires_in=ttl)

    # -- verifying ----------------------------------------------------------

    def verify_access(self, token: str) -> Claims:
        """The claims of a valid access token; raises ``Unauthenticated`` otherwise.

        The signature and the claims of one token never change, so they are checked
        once: the verified claims are remembered under the token's exact text
        (:data:`VERIFIED_CACHE_SIZE` at most, oldest forgotten first) and a later call
        with the same text only re-checks the times against the clock.
        """
        claims = self._verified.get(token) if isinstance(token, str) else None
        if claims is not None:
            self._check_times(claims, "access")
            return claims
        claims = self._verify(token, "access")
        verified = self._verified
        verified[token] = claims
        if len(verified) > VERIFIED_CACHE_SIZE:
            del verified[next(iter(verified))]
        return claims

    def verify_refresh(self, token: str) -> Claims:
        """The claims of a valid refresh token; raises ``Unauthenticated`` otherwise."""
        return self._verify(token, "refresh")

    def _verify(self, token: str, kind: TokenKind) -> Claims:
        def invalid(cause: str) -> Unauthenticated:
            return Unauthenticated(
                f"The {kind} token is not valid ({cause}); sign in again", reason=REASON_INVALID
            )

        if not isinstance(token, str) or not token:
            raise invalid("no token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise invalid("too long")
        if not _canonical_segments(token):
            raise invalid("not a well-formed JWT")

        try:
            header = self._jws.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid("not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise invalid("signing algorithm not allowed")
        if "crit" in header or "b64" in header:
            raise invalid("unsupported header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str) or KID_PATTERN.fullmatch(kid) is None:
            raise invalid("missing or malformed key id")
        public_key = self._keys.get(kid)
        if public_key is None:
            raise invalid("signed with an unknown key")

        try:
            decoded = self._jws.decode_complete(
                token, key=public_key, algorithms=[ALGORITHM], options={"verify_signature": True}
            )
        except jwt.InvalidSignatureError:
            raise invalid("signature does not verify") from None
        except jwt.PyJWTError:
            raise invalid("not a well-formed JWT") from None

        try:
            payload = json.loads(decoded["payload"], object_pairs_hook=_reject_duplicates)
        except (ValueError, RecursionError):
            raise invalid("unreadable claims") from None
        if not isinstance(payload, dict):
            raise invalid("unreadable claims")

        missing = [name for name in REQUIRED_CLAIMS if name not in payload]
        if missing:
            raise invalid(f"missing claim {missing[0]!r}")

        self._check_kind(header.get("typ"), payload.get("token_use"), kind, invalid)

        if payload["iss"] != self._issuer:
            raise invalid("wrong issuer")
        audience = payload["aud"]
        if isinstance(audience, list):
            if self._audience not in audience or not all(isinstance(a, str) for a in audience):
                raise invalid("wrong audience")
        elif audience != self._audience:
            raise invalid("wrong audience")
        for name in ("sub", "sid", "jti"):
            if not _is_id(payload[name]):
                raise invalid(f"malformed claim {name!r}")
        for name in ("iat", "nbf", "exp"):
            if not _is_number(payload[name]):
                raise invalid(f"malformed claim {name!r}")

        issued_at = float(payload["iat"])
        expires_at = float(payload["exp"])
        if expires_at <= issued_at:
            raise invalid("expires before it was issued")
        claims = Claims(
            user_id=payload["sub"],
            session_id=payload["sid"],
            jti=payload["jti"],
            issued_at=issued_at,
            expires_at=expires_at,
            not_before=float(payload["nbf"]),
        )
        self._check_times(claims, kind)
        return claims

    def _check_times(self, claims: Claims, kind: TokenKind) -> None:
        """``iat``, ``nbf`` and ``exp`` against the clock (with the leeway)."""
        now = self._clock()
        if claims.issued_at > now + self._leeway:
            raise Unauthenticated(
                f"The {kind} token is not valid (issued in the future); sign in again", reason=REASON_INVALID
            )
        if claims.not_before > now + self._leeway:
            raise Unauthenticated(
                f"The {kind} token is not valid (not valid yet); sign in again", reason=REASON_INVALID
            )
        if now >= claims.expires_at + self._leeway:
            hint = "refresh it or sign in again" if kind == "access" else "sign in again"
            raise Unauthenticated(f"The {kind} token has expired; {hint}", reason=REASON_EXPIRED)

    @staticmethod
    def _check_kind(
        typ: object,
        token_use: object,
        kind: TokenKind,
        invalid: Callable[[str], Unauthenticated],
    ) -> None:
        if typ == TYP[kind] and token_use == kind:
            return
        other: TokenKind = "refresh" if kind == "access" else "access"
        if typ == TYP[other] or token_use == other:
            raise Unauthenticated(
                f"A {other} token was presented where an {kind} token is required"
                if kind == "access"
                else f"An {other} token was presented where a {kind} token is required",
                reason=REASON_WRONG_TYPE,
            )
        raise invalid("unknown token type")

    def __repr__(self) -> str:
        return f"TokenService(kid={self._key_id!r}, issuer={self._issuer!r}, audience={self._audience!r})"
