"""Chunk encryption: AES-256-GCM under the file's own data key, before bytes leave the controller.

Each file version gets a fresh random 256-bit data key, wrapped by the vault
(:class:`controller.vault.Vault`, bound to the owner and the key id) and kept in the
file's ``encryption`` column; only the wrapped form is ever stored. A chunk is sealed
as ``nonce[12] | ciphertext | tag[16]`` with a random nonce and the associated data
``a67-chunk-v1|<chunk id>|<index>``: a copy moved to another chunk id or index does
not open. Nodes hold and serve these sealed bytes only.

>>> key = new_data_key()
>>> sealed = seal_chunk(key, "c1", 0, b"hello")
>>> open_chunk(key, "c1", 0, sealed)
b'hello'
>>> len(sealed) == len(b"hello") + OVERHEAD_BYTES
True
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALGORITHM = "AES-256-GCM"
"""``encryption.algorithm`` of every stored file."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
"""Bytes a sealed chunk has beyond its plaintext."""

KEY_PURPOSE = "storage.file-key"
"""The vault purpose of wrapped file keys (with the key id appended)."""


class ChunkIntegrityError(Exception):
    """A sealed chunk did not authenticate (altered, or another chunk's bytes)."""


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _aad(chunk_id: str, index: int) -> bytes:
    return f"a67-chunk-v1|{chunk_id}|{index}".encode()


def seal_chunk(key: bytes, chunk_id: str, index: int, plaintext: bytes) -> bytes:
    """``nonce | ciphertext | tag`` of ``plaintext`` (run it in a worker thread for big chunks)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(chunk_id, index))


def open_chunk(key: bytes, chunk_id: str, index: int, sealed: bytes) -> bytes:
    """The plaintext of a sealed chunk; :class:`ChunkIntegrityError` if it does not authenticate."""
    if len(sealed) < OVERHEAD_BYTES:
        raise ChunkIntegrityError(f"chunk {chunk_id} is too short to be sealed")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(chunk_id, index))
    except InvalidTag:
        raise ChunkIntegrityError(f"chunk {chunk_id} does not authenticate") from None


def key_owner(user_id: str) -> str:
    """The vault owner of a user's file keys."""
    return f"user:{user_id}"


def key_purpose(key_id: str) -> str:
    """The vault purpose of one file key (binds the wrapped key to its id)."""
    return f"{KEY_PURPOSE}:{key_id}"
