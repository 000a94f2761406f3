"""Authentication cores: credential validation, password hashing and tokens.

* :mod:`controller.auth.validation`: ``validate_credentials`` / ``normalize_email``
* :mod:`controller.auth.passwords`: ``PasswordHasher`` (argon2id, off the event loop)
* :mod:`controller.auth.tokens`: ``TokenService`` (EdDSA JWTs, access vs refresh)

These are pure logic (no gRPC, no database); the AuthService builds on them.
"""

from controller.auth.passwords import PasswordHasher
from controller.auth.tokens import Claims, IssuedToken, TokenService
from controller.auth.validation import normalize_email, validate_credentials

__all__ = [
    "Claims",
    "IssuedToken",
    "PasswordHasher",
    "TokenService",
    "normalize_email",
    "validate_credentials",
]
