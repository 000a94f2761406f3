"""The vault: a keyring of master keys and envelope encryption of secrets.

Later parts of the controller store OAuth tokens, database credentials and
deployment env values with it, each bound to its owner and purpose::

    from controller.vault import Keyring, Vault

    vault = Vault(Keyring.parse(settings.master_keys))
    token = vault.encrypt_str(dsn, owner=f"user:{user_id}", purpose="database.dsn")
    dsn = vault.decrypt_str(token, owner=f"user:{user_id}", purpose="database.dsn")

Errors all derive from :class:`VaultError`: :class:`MalformedCiphertext`,
:class:`UnknownKeyError` (names the missing key id) and :class:`DecryptionError`
(altered token or wrong owner/purpose, deliberately not saying which). They are
internal errors: callers translate them, and never show a token to a user.
"""

from controller.vault.envelope import (
    FORMAT_VERSION,
    DecryptionError,
    MalformedCiphertext,
    UnknownKeyError,
    Vault,
    VaultError,
)
from controller.vault.keyring import KEY_ID_PATTERN, KEY_SIZE, Keyring, validate_key_id

__all__ = [
    "FORMAT_VERSION",
    "KEY_ID_PATTERN",
    "KEY_SIZE",
    "DecryptionError",
    "Keyring",
    "MalformedCiphertext",
    "UnknownKeyError",
    "Vault",
    "VaultError",
    "validate_key_id",
]
