"""Key material bootstrap: development keys generated once (0600), production refuses without keys."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controller.auth.tokens import TokenService
from controller.config import Settings
from controller.errors import FailedPrecondition
from controller.keys import JWT_KEY_FILE, MASTER_KEYS_FILE, jwt_key_id, load_key_material
from controller.vault import Keyring, Vault


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_pem(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def dev(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def test_development_generates_keys_once_with_0600(dev: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="controller.keys")
    material = load_key_material(dev)

    keys_dir = dev.keys_dir
    assert mode(keys_dir) == 0o700
    assert mode(keys_dir / MASTER_KEYS_FILE) == 0o600
    assert mode(keys_dir / JWT_KEY_FILE) == 0o600
    # No temporary files are left behind.
    assert sorted(p.name for p in keys_dir.iterdir()) == sorted([MASTER_KEYS_FILE, JWT_KEY_FILE])

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (
        f"generated development keys in {keys_dir} (0600); set A67_ENVIRONMENT=production with "
        "A67_MASTER_KEYS and A67_JWT_PRIVATE_KEY_FILE for real deployments"
    )
    # No key bytes in the log.
    spec = (keys_dir / MASTER_KEYS_FILE).read_text().strip()
    assert spec.split(":", 1)[1] not in caplog.text
    assert "PRIVATE KEY" not in caplog.text

    assert material.keyring.key_ids == ("k1",)
    assert material.jwt_key_id == jwt_key_id(material.jwt_signing_key.public_key())
    assert set(material.verification_keys) == {material.jwt_key_id}
    assert "PRIVATE" not in repr(material)


def test_second_load_reuses_the_same_keys(dev: Settings, caplog: pytest.LogCaptureFixture) -> None:
    first = load_key_material(dev)
    token = Vault(first.keyring).encrypt(b"kept", owner="o", purpose="p")

    caplog.clear()
    caplog.set_level(logging.INFO, logger="controller.keys")
    second = load_key_material(dev)
    assert second.keyring == first.keyring
    assert second.jwt_key_id == first.jwt_key_id
    assert Vault(second.keyring).decrypt(token, owner="o", purpose="p") == b"kept"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert str(dev.keys_dir) in infos[0]

    # Tokens signed before a restart verify after it.
    before = TokenService.from_key_material(first, dev).issue_access("u", "s").token
    assert TokenService.from_key_material(second, dev).verify_access(before).user_id == "u"


def test_loose_permissions_are_tightened(dev: Settings) -> None:
    load_key_material(dev)
    (dev.keys_dir / MASTER_KEYS_FILE).chmod(0o644)
    dev.keys_dir.chmod(0o755)
    load_key_material(dev)
    assert mode(dev.keys_dir / MASTER_KEYS_FILE) == 0o600


def test_files_are_created_0600_even_with_a_permissive_umask(dev: Settings) -> None:
    old = os.umask(0)
    try:
        load_key_material(dev)
    finally:
        os.umask(old)
    assert mode(dev.keys_dir) == 0o700
    assert mode(dev.keys_dir / MASTER_KEYS_FILE) == 0o600
    assert mode(dev.keys_dir / JWT_KEY_FILE) == 0o600


def test_production_without_keys_refuses(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, environment="production")
    with pytest.raises(FailedPrecondition) as info:
        load_key_material(settings)
    assert info.value.reason == "MISSING_KEY_MATERIAL"
    assert "A67_MASTER_KEYS" in info.value.message
    assert "A67_JWT_PRIVATE_KEY_FILE" in info.value.message
    assert not settings.keys_dir.exists()  # nothing generated in production


def test_production_with_only_master_keys_refuses(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, environment="production", master_keys=Keyring.generate("k1").to_spec()
    )
    with pytest.raises(FailedPrecondition, match="A67_JWT_PRIVATE_KEY_FILE") as info:
        load_key_material(settings)
    assert info.value.reason == "MISSING_KEY_MATERIAL"
    assert "A67_MASTER_KEYS is not set" not in info.value.message


def test_production_with_missing_jwt_file_refuses(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        environment="production",
        master_keys=Keyring.generate("k1").to_spec(),
        jwt_private_key_file=str(tmp_path / "nope.pem"),
    )
    with pytest.raises(FailedPrecondition, match="does not exist") as info:
        load_key_material(settings)
    assert info.value.reason == "MISSING_KEY_MATERIAL"


def test_production_with_keys_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ring = Keyring.generate("k1").rotate()
    key = Ed25519PrivateKey.generate()
    pem = write_pem(tmp_path / "jwt.pem", key)
    settings = Settings(
        data_dir=tmp_path / "data",
        environment="production",
        master_keys=ring.to_spec(),
        jwt_private_key_file=str(pem),
    )
    material = load_key_material(settings)
    assert material.keyring == ring
    assert material.jwt_key_id == jwt_key_id(key.public_key())
    assert not settings.keys_dir.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_explicit_master_keys_win_over_generated_ones(dev: Settings) -> None:
    generated = load_key_material(dev).keyring
    explicit = Keyring.generate("prod1")
    material = load_key_material(dev.with_overrides(master_keys=explicit.to_spec()))
    assert material.keyring == explicit
    assert material.keyring != generated


def test_explicit_jwt_key_wins(dev: Settings, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = write_pem(tmp_path / "mine.pem", key)
    material = load_key_material(dev.with_overrides(jwt_private_key_file=str(pem)))
    assert material.jwt_key_id == jwt_key_id(key.public_key())
    assert not (dev.keys_dir / JWT_KEY_FILE).exists()


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("k1:c2hvcnQ=", "exactly 32 bytes, not 5"),
        ("K1:AAAA", "invalid key id"),
        ("garbage", "key_id:base64key"),
    ],
)
def test_invalid_master_keys(dev: Settings, spec: str, fragment: str) -> None:
    with pytest.raises(FailedPrecondition, match="A67_MASTER_KEYS") as info:
        load_key_material(dev.with_overrides(master_keys=spec))
    assert info.value.reason == "INVALID_KEY_MATERIAL"
    assert fragment in info.value.message


def test_jwt_file_of_the_wrong_kind(dev: Settings, tmp_path: Path) -> None:
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(FailedPrecondition, match="Ed25519") as info:
        load_key_material(dev.with_overrides(jwt_private_key_file=str(ec_pem)))
    assert info.value.reason == "INVALID_KEY_MATERIAL"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(FailedPrecondition, match="not an unencrypted PEM private key"):
        load_key_material(dev.with_overrides(jwt_private_key_file=str(junk)))


def test_concurrent_generation_never_overwrites(dev: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file that appears between the existence check and the write (another process
    # starting at the same time) wins; ours is discarded and theirs is used.
    from controller import keys

    theirs = Keyring.generate("k1")
    dev.keys_dir.mkdir(parents=True, mode=0o700)
    path = dev.keys_dir / MASTER_KEYS_FILE
    original = keys._write_new_secret_file

    def racing(target: Path, data: bytes) -> bool:
        if target.name == MASTER_KEYS_FILE and not target.exists():
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, theirs.to_spec().encode())
            os.close(fd)
        return original(target, data)

    monkeypatch.setattr(keys, "_write_new_secret_file", racing)
    material = load_key_material(dev)
    assert material.keyring == theirs
    assert path.read_text().strip() == theirs.to_spec()


def test_key_id_is_the_rfc8037_thumbprint_shortened() -> None:
    # RFC 8037 appendix A.2/A.3: this public key's JWK thumbprint.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))
    assert jwt_key_id(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"[:16]


def test_key_id_is_a_short_stable_thumbprint() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    kid = jwt_key_id(key.public_key())
    assert kid == jwt_key_id(key.public_key())
    assert len(kid) == 16
    assert kid.replace("-", "").replace("_", "").isalnum()
    assert kid != jwt_key_id(Ed25519PrivateKey.generate().public_key())
