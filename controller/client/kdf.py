"""The client-side password derivation: what ``password_hash`` is.

The controller never sees a password. Every client (this CLI, the dashboard) sends
``password_hash`` = PBKDF2-HMAC-SHA-256 of the password, and the controller hashes
that again with argon2id. docs/auth.md is the normative description, with test
vectors; in short::

    email_n  = normalize_email(email)              # controller/auth/validation.py
    salt     = UTF-8("automator67/password/v1:" + email_n)
    password = UTF-8(NFC(password))
    hash     = base64(PBKDF2-HMAC-SHA-256(password, salt, 600000 iterations, 32 bytes))

>>> len(derive_password_hash("ada@example.com", "correct horse battery staple"))
44
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata

from controller.auth.validation import normalize_email

ITERATIONS = 600_000
"""PBKDF2 iterations: OWASP's recommendation for PBKDF2-HMAC-SHA-256 (2023)."""

SALT_PREFIX = "automator67/password/v1:"
"""Fixed application string before the normalised email; ``v1`` names this scheme."""

KEY_BYTES = 32
"""Output length: one SHA-256 block, 256 bits."""

MIN_PASSWORD_CHARS = 8
"""Shortest password ``a67 register`` accepts (NIST SP 800-63B's minimum)."""


def salt_for(email: str) -> bytes:
    """The salt for ``email``: the application string and the server's normal form of it."""
    return (SALT_PREFIX + normalize_email(email)).encode("utf-8")


def derive_password_hash(email: str, password: str, *, iterations: int = ITERATIONS) -> str:
    """``password_hash`` for ``email`` and ``password`` (standard base64 with padding, 44 characters)."""
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    key = hashlib.pbkdf2_hmac("sha256", secret, salt_for(email), iterations, dklen=KEY_BYTES)
    return base64.b64encode(key).decode("ascii")
