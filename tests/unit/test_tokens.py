"""JWT access/refresh tokens: round trip, expiry on an injected clock, and forged tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.auth.tokens import Claims, TokenService
from controller.errors import Unauthenticated

ISSUER = "automator67-controller"
AUDIENCE = "automator67-api"
KID = "test-kid_1"
ACCESS_TTL = 3600
REFRESH_TTL = 7 * 24 * 3600
T0 = 1_750_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(key: Ed25519PrivateKey, clock: FakeClock) -> TokenService:
    return TokenService(key, KID, {KID: key.public_key()}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL, clock)


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return claims


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(unb64(token.split(".")[0]))
    return header


def valid_payload(kind: str = "access", /, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "sid": "session-1",
        "iat": int(T0),
        "nbf": int(T0),
        "exp": int(T0) + ACCESS_TTL,
        "jti": "5d2c6a47-2c1b-4a43-9a43-0c4b3f1e2a11",
        "token_use": kind,
    }
    for name, value in changes.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def sign(key: Ed25519PrivateKey, payload: dict[str, Any], **header: Any) -> str:
    headers = {"kid": KID, "typ": "at+jwt", **header}
    return jwt.encode(payload, key, algorithm="EdDSA", headers=headers)


def expect(reason: str, call: Any, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        call(token)
    assert info.value.reason == reason, info.value.message
    if len(token) > 8:
        assert token not in info.value.message
    for segment in token.split("."):
        if len(segment) > 8:
            assert segment not in info.value.message
    return info.value


# -- issuing and round trip ---------------------------------------------------


def test_access_round_trip(service: TokenService) -> None:
    issued = service.issue_access("user-1", "session-1")
    assert issued.expires_in == ACCESS_TTL
    assert issued.expires_at == int(T0) + ACCESS_TTL
    claims = service.verify_access(issued.token)
    assert claims == Claims(
        user_id="user-1",
        session_id="session-1",
        jti=issued.jti,
        issued_at=int(T0),
        expires_at=int(T0) + ACCESS_TTL,
    )
    assert issued.token not in repr(issued)


def test_token_shape(service: TokenService) -> None:
    access = service.issue_access("user-1", "session-1")
    refresh = service.issue_refresh("user-1", "session-1")
    assert header_of(access.token) == {"alg": "EdDSA", "kid": KID, "typ": "at+jwt"}
    assert header_of(refresh.token) == {"alg": "EdDSA", "kid": KID, "typ": "rt+jwt"}
    body = claims_of(access.token)
    assert set(body) == {"iss", "aud", "sub", "sid", "iat", "nbf", "exp", "jti", "token_use"}
    assert body["token_use"] == "access"
    assert claims_of(refresh.token)["token_use"] == "refresh"
    assert claims_of(refresh.token)["exp"] == int(T0) + REFRESH_TTL
    assert refresh.expires_in == REFRESH_TTL
    assert body["iss"] == ISSUER
    assert body["aud"] == AUDIENCE
    assert len(body["jti"]) == 36


def test_refresh_round_trip(service: TokenService) -> None:
    issued = service.issue_refresh("user-1", "family-9")
    claims = service.verify_refresh(issued.token)
    assert (claims.user_id, claims.session_id, claims.jti) == ("user-1", "family-9", issued.jti)


def test_every_token_has_a_fresh_jti(service: TokenService) -> None:
    jtis = {service.issue_access("u", "s").jti for _ in range(50)}
    assert len(jtis) == 50


def test_fractional_clock_floors_iat(key: Ed25519PrivateKey) -> None:
    clock = FakeClock(T0 + 0.75)
    service = TokenService(key, KID, {}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL, clock)
    issued = service.issue_access("u", "s")
    assert claims_of(issued.token)["iat"] == int(T0)
    assert service.verify_access(issued.token).issued_at == int(T0)


# -- time -------------------------------------------------------------------------


def test_expired_on_the_millisecond(service: TokenService, clock: FakeClock) -> None:
    issued = service.issue_access("user-1", "session-1")
    clock.advance(ACCESS_TTL - 0.001)
    service.verify_access(issued.token)
    clock.advance(0.001)
    error = expect("TOKEN_EXPIRED", service.verify_access, issued.token)
    assert "expired" in error.message


def test_refresh_expiry(service: TokenService, clock: FakeClock) -> None:
    issued = service.issue_refresh("user-1", "session-1")
    clock.advance(ACCESS_TTL * 2)
    service.verify_refresh(issued.token)  # a refresh token outlives an access token
    clock.advance(REFRESH_TTL)
    expect("TOKEN_EXPIRED", service.verify_refresh, issued.token)


def test_leeway(key: Ed25519PrivateKey, clock: FakeClock) -> None:
    service = TokenService(key, KID, {}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL, clock, leeway=5)
    issued = service.issue_access("u", "s")
    clock.advance(ACCESS_TTL + 4.999)
    service.verify_access(issued.token)
    clock.advance(0.001)
    expect("TOKEN_EXPIRED", service.verify_access, issued.token)
    with pytest.raises(ValueError, match="leeway"):
        TokenService(key, KID, {}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL, clock, leeway=3600)


def test_issued_in_the_future_or_not_yet_valid(service: TokenService, key: Ed25519PrivateKey) -> None:
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(iat=int(T0) + 10)))
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(nbf=int(T0) + 10)))
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(exp=int(T0))))


def test_pyjwt_own_clock_is_not_used(service: TokenService, clock: FakeClock) -> None:
    # Issued "in 2025" by the fake clock; real time is irrelevant either way.
    clock.now = 4_000_000_000.0
    issued = service.issue_access("u", "s")
    assert service.verify_access(issued.token).issued_at == 4_000_000_000


# -- type confusion ------------------------------------------------------------------


def test_access_token_used_as_refresh(service: TokenService) -> None:
    token = service.issue_access("user-1", "session-1").token
    error = expect("TOKEN_WRONG_TYPE", service.verify_refresh, token)
    assert "access token" in error.message
    assert "refresh token" in error.message


def test_refresh_token_used_as_access(service: TokenService) -> None:
    token = service.issue_refresh("user-1", "session-1").token
    expect("TOKEN_WRONG_TYPE", service.verify_access, token)


@pytest.mark.parametrize(
    ("typ", "token_use", "reason"),
    [
        ("rt+jwt", "access", "TOKEN_WRONG_TYPE"),  # mixed signals never pass
        ("at+jwt", "refresh", "TOKEN_WRONG_TYPE"),
        ("JWT", "access", "TOKEN_INVALID"),
        ("at+jwt", "id", "TOKEN_INVALID"),
        (None, "access", "TOKEN_INVALID"),
    ],
)
def test_typ_and_token_use_must_agree(
    service: TokenService, key: Ed25519PrivateKey, typ: str | None, token_use: str, reason: str
) -> None:
    token = sign(key, valid_payload(token_use=token_use), typ=typ)
    expect(reason, service.verify_access, token)


# -- forged tokens ----------------------------------------------------------------------


def test_alg_none_rejected(service: TokenService) -> None:
    header = b64json({"alg": "none", "typ": "at+jwt", "kid": KID})
    token = f"{header}.{b64json(valid_payload())}."
    expect("TOKEN_INVALID", service.verify_access, token)
    # Also with a junk signature and with other spellings of "none".
    for alg in ("none", "None", "NONE", "nOnE"):
        header = b64json({"alg": alg, "typ": "at+jwt", "kid": KID})
        expect("TOKEN_INVALID", service.verify_access, f"{header}.{b64json(valid_payload())}.{b64(b'x')}")


@pytest.mark.parametrize("encoding", ["pem", "raw", "der"])
def test_hs256_key_confusion_rejected(service: TokenService, key: Ed25519PrivateKey, encoding: str) -> None:
    public = key.public_key()
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }[encoding]
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'at+jwt', 'kid': KID})}.{b64json(valid_payload())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    expect("TOKEN_INVALID", service.verify_access, f"{signing_input}.{b64(signature)}")


def test_foreign_key_with_same_kid_rejected(service: TokenService) -> None:
    foreign = Ed25519PrivateKey.generate()
    error = expect("TOKEN_INVALID", service.verify_access, sign(foreign, valid_payload()))
    assert "signature" in error.message


def test_unknown_kid_rejected(service: TokenService, key: Ed25519PrivateKey) -> None:
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(), kid="other-kid"))


@pytest.mark.parametrize("kid", ["../../etc/passwd", "a" * 65, "", "kid with space", "k\u00e9y", 7, None])
def test_malformed_kid_rejected(service: TokenService, key: Ed25519PrivateKey, kid: Any) -> None:
    header = {"alg": "EdDSA", "typ": "at+jwt"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64json(header)}.{b64json(valid_payload())}"
    token = f"{signing_input}.{b64(key.sign(signing_input.encode()))}"
    expect("TOKEN_INVALID", service.verify_access, token)


def test_other_asymmetric_algorithms_rejected(service: TokenService) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(valid_payload(), ec_key, algorithm="ES256", headers={"kid": KID, "typ": "at+jwt"})
    expect("TOKEN_INVALID", service.verify_access, token)


def test_wrong_issuer_rejected(service: TokenService, key: Ed25519PrivateKey) -> None:
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(iss="someone-else")))


@pytest.mark.parametrize("aud", ["another-api", ["another-api"], [], 5])
def test_wrong_audience_rejected(service: TokenService, key: Ed25519PrivateKey, aud: Any) -> None:
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(aud=aud)))


def test_audience_list_containing_ours_accepted(service: TokenService, key: Ed25519PrivateKey) -> None:
    assert service.verify_access(sign(key, valid_payload(aud=["x", AUDIENCE]))).user_id == "user-1"


def test_tampered_payload_rejected(service: TokenService) -> None:
    token = service.issue_access("user-1", "session-1").token
    header, _, signature = token.split(".")
    body = claims_of(token)
    body["sub"] = "admin"
    expect("TOKEN_INVALID", service.verify_access, f"{header}.{b64json(body)}.{signature}")


def test_tampered_header_rejected(service: TokenService) -> None:
    token = service.issue_refresh("user-1", "session-1").token
    _, payload, signature = token.split(".")
    header = b64json({"alg": "EdDSA", "kid": KID, "typ": "at+jwt"})
    expect("TOKEN_INVALID", service.verify_access, f"{header}.{payload}.{signature}")


def test_every_character_change_rejected(service: TokenService) -> None:
    token = service.issue_access("user-1", "session-1").token
    alphabet = "AQgw-_"
    for position in range(len(token)):
        if token[position] == ".":
            continue
        replacement = next(c for c in alphabet if c != token[position])
        forged = token[:position] + replacement + token[position + 1 :]
        with pytest.raises(Unauthenticated):
            service.verify_access(forged)


def test_non_canonical_signature_encoding_rejected(service: TokenService) -> None:
    # An Ed25519 signature is 64 bytes = 86 base64url characters with 4 spare bits in
    # the last one; setting them decodes to the same bytes but is another token string.
    token = service.issue_access("user-1", "session-1").token
    head, signature = token.rsplit(".", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    twin = signature[:-1] + alphabet[last | 0b0001]
    if twin == signature:
        twin = signature[:-1] + alphabet[last & ~0b0001]
    assert unb64(twin) == unb64(signature)
    expect("TOKEN_INVALID", service.verify_access, f"{head}.{twin}")


@pytest.mark.parametrize("claim", ["jti", "sub", "sid", "iss", "aud", "exp", "iat", "nbf", "token_use"])
def test_missing_claim_rejected(service: TokenService, key: Ed25519PrivateKey, claim: str) -> None:
    error = expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(**{claim: None})))
    assert claim in error.message


@pytest.mark.parametrize(
    ("claim", "value"),
    [("jti", ""), ("jti", 5), ("sub", ""), ("sid", ["x"]), ("exp", "soon"), ("iat", True), ("nbf", None)],
)
def test_malformed_claim_rejected(
    service: TokenService, key: Ed25519PrivateKey, claim: str, value: Any
) -> None:
    payload = valid_payload()
    payload[claim] = value
    expect("TOKEN_INVALID", service.verify_access, sign(key, payload))


def test_duplicate_claims_rejected(service: TokenService, key: Ed25519PrivateKey) -> None:
    body = json.dumps(valid_payload(), separators=(",", ":"))[:-1] + ',"sub":"admin"}'
    signing_input = f"{b64json({'alg': 'EdDSA', 'typ': 'at+jwt', 'kid': KID})}.{b64(body.encode())}"
    token = f"{signing_input}.{b64(key.sign(signing_input.encode()))}"
    expect("TOKEN_INVALID", service.verify_access, token)


def test_crit_header_rejected(service: TokenService, key: Ed25519PrivateKey) -> None:
    expect("TOKEN_INVALID", service.verify_access, sign(key, valid_payload(), crit=["exp"]))


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "..", "not a token at all", "eyJ.eyJ.", "x" * 9000],
)
def test_garbage_rejected(service: TokenService, token: str) -> None:
    expect("TOKEN_INVALID", service.verify_access, token)
    expect("TOKEN_INVALID", service.verify_refresh, token)


def test_retired_key_still_verifies(key: Ed25519PrivateKey, clock: FakeClock) -> None:
    old = TokenService(key, "old", {}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL, clock)
    token = old.issue_refresh("u", "s").token
    new_key = Ed25519PrivateKey.generate()
    new = TokenService(
        new_key, "new", {"old": key.public_key()}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL, clock
    )
    assert new.verify_refresh(token).user_id == "u"
    assert header_of(new.issue_access("u", "s").token)["kid"] == "new"


def test_constructor_validation(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="key_id"):
        TokenService(key, "bad kid", {}, ISSUER, AUDIENCE, ACCESS_TTL, REFRESH_TTL)
    with pytest.raises(ValueError, match="lifetimes"):
        TokenService(key, KID, {}, ISSUER, AUDIENCE, 0, REFRESH_TTL)
    with pytest.raises(TypeError):
        TokenService(key.public_key(), KID, {}, ISSUER, AUDIENCE, 1, 2)  # type: ignore[arg-type]


def test_issue_rejects_empty_ids(service: TokenService) -> None:
    with pytest.raises(ValueError, match="user_id"):
        service.issue_access("", "s")
