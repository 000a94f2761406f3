"""Vault: keyring parsing and envelope encryption (round trip, AAD, tampering, rotation)."""

from __future__ import annotations

import base64
import re

import pytest

from controller.vault import (
    DecryptionError,
    Keyring,
    MalformedCiphertext,
    UnknownKeyError,
    Vault,
    VaultError,
)

OWNER = "user:42"
PURPOSE = "oauth.github"


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture
def vault() -> Vault:
    return Vault(Keyring.generate("k1"))


# -- keyring ----------------------------------------------------------------


def test_keyring_parse_round_trip() -> None:
    ring = Keyring.generate("k1").rotate()
    spec = ring.to_spec()
    again = Keyring.parse(spec)
    assert again == ring
    assert again.key_ids == ("k1", "k2")
    assert again.primary_id == "k2"


def test_keyring_parse_accepts_urlsafe_unpadded_and_spaces() -> None:
    key = bytes(range(32))
    std = base64.b64encode(key).decode()
    url = base64.urlsafe_b64encode(key).decode().rstrip("=")
    ring = Keyring.parse(f" a:{std} , b_2:{url} ")
    assert ring.get("a") == key
    assert ring.get("b_2") == key
    assert ring.primary_id == "b_2"


KEY_B64 = base64.b64encode(b"\x07" * 32).decode()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (f"k1:{KEY_B64},", "entry 2 is empty"),
        ("k1", "entry 1 must look like"),
        (f"K1:{KEY_B64}", "invalid key id"),
        (f"{'a' * 33}:{KEY_B64}", "invalid key id"),
        (f"k 1:{KEY_B64}", "invalid key id"),
        ("k1:", "no key material"),
        ("k1:!!!!", "not valid base64"),
        (f"k1:{base64.b64encode(b'x' * 16).decode()}", "exactly 32 bytes, not 16"),
        (f"k1:{base64.b64encode(b'x' * 33).decode()}", "exactly 32 bytes, not 33"),
        (f"k1:{KEY_B64},k1:{KEY_B64}", "repeats key id 'k1'"),
    ],
)
def test_keyring_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        Keyring.parse(spec)
    assert KEY_B64 not in str(info.value)


def test_keyring_errors_never_show_key_bytes() -> None:
    secret = base64.b64encode(b"secret-key-material-0123456789ab" + b"!").decode()  # 33 bytes
    with pytest.raises(ValueError, match="k1") as info:
        Keyring.parse(f"k1:{secret}")
    assert secret not in str(info.value)
    ring = Keyring.parse(f"k1:{KEY_B64}")
    assert KEY_B64 not in repr(ring)
    assert "\\x07" not in repr(ring)
    assert KEY_B64 not in repr(Vault(ring))


def test_keyring_add_rotate_remove() -> None:
    ring = Keyring.generate("k1")
    bigger = ring.add("later", b"\x01" * 32)
    assert ring.key_ids == ("k1",)  # immutable
    assert bigger.primary_id == "later"
    rotated = bigger.rotate()
    assert rotated.primary_id == "k2"
    assert rotated.rotate().primary_id == "k3"
    assert rotated.remove("k1").key_ids == ("later", "k2")
    with pytest.raises(ValueError, match="duplicate key id 'k1'"):
        ring.add("k1", b"\x01" * 32)
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        ring.add("k9", b"short")
    with pytest.raises(ValueError, match="at least one key"):
        ring.remove("k1")
    with pytest.raises(KeyError):
        ring.remove("nope")


def test_generated_keys_differ() -> None:
    assert Keyring.generate("k1").primary_key != Keyring.generate("k1").primary_key


# -- envelope ---------------------------------------------------------------


def test_round_trip_bytes_and_text(vault: Vault) -> None:
    token = vault.encrypt(b"\x00\xffbinary", owner=OWNER, purpose=PURPOSE)
    assert vault.decrypt(token, owner=OWNER, purpose=PURPOSE) == b"\x00\xffbinary"
    text = vault.encrypt_str("pässwörd ✓", owner=OWNER, purpose=PURPOSE)
    assert vault.decrypt_str(text, owner=OWNER, purpose=PURPOSE) == "pässwörd ✓"


def test_token_format_is_compact_ascii(vault: Vault) -> None:
    token = vault.encrypt(b"hello", owner=OWNER, purpose=PURPOSE)
    assert re.fullmatch(r"a67v1:k1:[A-Za-z0-9_-]+", token)
    assert token.isascii()
    assert vault.key_id_of(token) == "k1"
    assert not vault.needs_rewrap(token)
    # 12 (wrap nonce) + 48 (wrapped DEK) + 12 (nonce) + 5 + 16 (tag)
    assert len(_b64d(token.split(":")[2])) == 12 + 48 + 12 + 5 + 16


def test_empty_plaintext(vault: Vault) -> None:
    token = vault.encrypt(b"", owner=OWNER, purpose=PURPOSE)
    assert vault.decrypt(token, owner=OWNER, purpose=PURPOSE) == b""
    assert (
        vault.decrypt_str(vault.encrypt_str("", owner=OWNER, purpose=PURPOSE), owner=OWNER, purpose=PURPOSE)
        == ""
    )


def test_same_plaintext_encrypts_differently(vault: Vault) -> None:
    a = vault.encrypt(b"same", owner=OWNER, purpose=PURPOSE)
    b = vault.encrypt(b"same", owner=OWNER, purpose=PURPOSE)
    assert a != b
    assert _b64d(a.split(":")[2])[:12] != _b64d(b.split(":")[2])[:12]


@pytest.mark.parametrize(
    ("owner", "purpose"),
    [
        ("user:43", PURPOSE),
        (OWNER, "oauth.gitlab"),
        ("user:43", "oauth.gitlab"),
        ("user:4", "2oauth.github"),  # same concatenation, different split
    ],
)
def test_wrong_associated_data_fails(vault: Vault, owner: str, purpose: str) -> None:
    token = vault.encrypt(b"secret", owner=OWNER, purpose=PURPOSE)
    with pytest.raises(DecryptionError) as info:
        vault.decrypt(token, owner=owner, purpose=purpose)
    # The message does not reveal which of owner/purpose/tampering it was.
    assert str(info.value) == str(DecryptionError())
    with pytest.raises(DecryptionError):
        vault.rewrap(token, owner=owner, purpose=purpose)


def test_owner_and_purpose_are_required(vault: Vault) -> None:
    with pytest.raises(ValueError, match="owner"):
        vault.encrypt(b"x", owner="", purpose=PURPOSE)
    with pytest.raises(ValueError, match="purpose"):
        vault.encrypt(b"x", owner=OWNER, purpose="")
    with pytest.raises(TypeError):
        vault.encrypt("text", owner=OWNER, purpose=PURPOSE)  # type: ignore[arg-type]


def test_every_bit_flip_in_the_blob_fails(vault: Vault) -> None:
    token = vault.encrypt(b"top secret value", owner=OWNER, purpose=PURPOSE)
    prefix, kid, body = token.split(":")
    blob = _b64d(body)
    # wrap nonce 0-11, wrapped DEK 12-59 (its tag 44-59), nonce 60-71, ciphertext, tag (last 16)
    for position in range(len(blob)):
        for bit in range(8):
            damaged = bytearray(blob)
            damaged[position] ^= 1 << bit
            forged = f"{prefix}:{kid}:{_b64e(bytes(damaged))}"
            with pytest.raises(DecryptionError):
                vault.decrypt(forged, owner=OWNER, purpose=PURPOSE)


def test_every_bit_flip_in_the_text_fails(vault: Vault) -> None:
    token = vault.encrypt(b"top secret value", owner=OWNER, purpose=PURPOSE)
    raw = token.encode("ascii")
    for position in range(len(raw)):
        for bit in range(7):  # stay in ASCII
            damaged = bytearray(raw)
            damaged[position] ^= 1 << bit
            with pytest.raises(VaultError):
                vault.decrypt(damaged.decode("ascii"), owner=OWNER, purpose=PURPOSE)


def test_truncated_and_extended_tokens_fail(vault: Vault) -> None:
    token = vault.encrypt(b"value", owner=OWNER, purpose=PURPOSE)
    prefix, kid, body = token.split(":")
    blob = _b64d(body)
    with pytest.raises(DecryptionError):
        vault.decrypt(f"{prefix}:{kid}:{_b64e(blob[:-1])}", owner=OWNER, purpose=PURPOSE)
    with pytest.raises(DecryptionError):
        vault.decrypt(f"{prefix}:{kid}:{_b64e(blob + b'x')}", owner=OWNER, purpose=PURPOSE)
    with pytest.raises(MalformedCiphertext, match="too short"):
        vault.decrypt(f"{prefix}:{kid}:{_b64e(blob[:87])}", owner=OWNER, purpose=PURPOSE)


def test_key_id_swap_fails_even_with_a_known_key() -> None:
    ring = Keyring.generate("k1").add("k2", Keyring.generate("x").primary_key)
    vault = Vault(ring)
    token = vault.encrypt(b"value", owner=OWNER, purpose=PURPOSE)
    assert token.startswith("a67v1:k2:")
    with pytest.raises(DecryptionError):
        vault.decrypt(token.replace("a67v1:k2:", "a67v1:k1:"), owner=OWNER, purpose=PURPOSE)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "not a vault ciphertext"),
        ("hello", "not a vault ciphertext"),
        ("a67v2:k1:AAAA", "unsupported vault ciphertext version 'a67v2'"),
        ("a67v1:K1:AAAA", "no valid key id"),
        ("a67v1:k1", "no valid key id"),
        ("a67v1:k1:", "not base64url"),
        ("a67v1:k1:AA==", "not base64url"),
        ("a67v1:k1:A+/A", "not base64url"),
        ("a67v1:k1:AB", "not canonical"),  # trailing bits set
        ("a67v1:k1:AAAA", "too short"),
    ],
)
def test_malformed_tokens(vault: Vault, token: str, message: str) -> None:
    with pytest.raises(MalformedCiphertext, match=re.escape(message)):
        vault.decrypt(token, owner=OWNER, purpose=PURPOSE)


def test_non_string_token_is_malformed(vault: Vault) -> None:
    with pytest.raises(MalformedCiphertext):
        vault.decrypt(b"a67v1:k1:AAAA", owner=OWNER, purpose=PURPOSE)  # type: ignore[arg-type]


def test_decrypt_str_of_binary_secret(vault: Vault) -> None:
    token = vault.encrypt(b"\xff\xfe", owner=OWNER, purpose=PURPOSE)
    with pytest.raises(MalformedCiphertext, match="binary"):
        vault.decrypt_str(token, owner=OWNER, purpose=PURPOSE)


def test_rotate_rewrap_and_retire() -> None:
    ring1 = Keyring.generate("k1")
    old_vault = Vault(ring1)
    old_a = old_vault.encrypt(b"alpha", owner=OWNER, purpose=PURPOSE)
    old_b = old_vault.encrypt(b"beta", owner=OWNER, purpose=PURPOSE)

    ring2 = ring1.rotate()
    vault = Vault(ring2)
    # Old tokens still decrypt after rotation; new ones use the new key.
    assert vault.decrypt(old_a, owner=OWNER, purpose=PURPOSE) == b"alpha"
    fresh = vault.encrypt(b"gamma", owner=OWNER, purpose=PURPOSE)
    assert vault.key_id_of(fresh) == "k2"
    assert vault.needs_rewrap(old_a)
    assert not vault.needs_rewrap(fresh)

    rewrapped = vault.rewrap(old_a, owner=OWNER, purpose=PURPOSE)
    assert vault.key_id_of(rewrapped) == "k2"
    assert not vault.needs_rewrap(rewrapped)
    assert vault.decrypt(rewrapped, owner=OWNER, purpose=PURPOSE) == b"alpha"
    # Only the wrapped data key changed: nonce + ciphertext + tag are the same bytes.
    assert _b64d(rewrapped.split(":")[2])[60:] == _b64d(old_a.split(":")[2])[60:]
    # Rewrapping a token already on the primary key is a no-op.
    assert vault.rewrap(rewrapped, owner=OWNER, purpose=PURPOSE) == rewrapped

    # Retire k1: the rewrapped token still decrypts, the other one names the missing key.
    retired = Vault(ring2.remove("k1"))
    assert retired.decrypt(rewrapped, owner=OWNER, purpose=PURPOSE) == b"alpha"
    assert retired.decrypt(fresh, owner=OWNER, purpose=PURPOSE) == b"gamma"
    with pytest.raises(UnknownKeyError) as info:
        retired.decrypt(old_b, owner=OWNER, purpose=PURPOSE)
    assert info.value.key_id == "k1"
    assert str(info.value) == "ciphertext was encrypted with key 'k1', which is not in the keyring"
    with pytest.raises(UnknownKeyError):
        retired.rewrap(old_b, owner=OWNER, purpose=PURPOSE)


def test_rewrap_rejects_a_damaged_payload() -> None:
    ring = Keyring.generate("k1")
    token = Vault(ring).encrypt(b"alpha", owner=OWNER, purpose=PURPOSE)
    prefix, kid, body = token.split(":")
    blob = bytearray(_b64d(body))
    blob[-1] ^= 1
    with pytest.raises(DecryptionError):
        Vault(ring.rotate()).rewrap(f"{prefix}:{kid}:{_b64e(bytes(blob))}", owner=OWNER, purpose=PURPOSE)


def test_unknown_key_for_a_vault_built_from_another_ring() -> None:
    token = Vault(Keyring.generate("k1")).encrypt(b"x", owner=OWNER, purpose=PURPOSE)
    with pytest.raises(DecryptionError):  # same id, different key bytes
        Vault(Keyring.generate("k1")).decrypt(token, owner=OWNER, purpose=PURPOSE)
    with pytest.raises(UnknownKeyError, match="'k1'"):
        Vault(Keyring.generate("other")).decrypt(token, owner=OWNER, purpose=PURPOSE)
