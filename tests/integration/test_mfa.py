"""Multi-factor sign-in (issue 16): enrol, confirm, two-step login, recovery codes, replay,
throttling and disabling; on SQLite and PostgreSQL with an injected clock, and over gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pyotp
import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from controller.auth.mfa import MfaService
from controller.auth.service import AuthService, MfaRequired, Session
from controller.auth.tokens import TokenService
from controller.cache.memory import MemoryCache
from controller.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unauthenticated
from controller.server import Controller
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.models import MfaRecoveryCode, UserMfa
from controller.store.repositories import AuthFailureRepository, RefreshTokenRepository, UserRepository
from controller.vault import Keyring, Vault
from tests.integration.test_login_throttle import T0, Clock, CountingHasher
from tests.support import PASSWORD, bearer, register

EMAIL = "ada@example.com"


@dataclass
class Harness:
    auth: AuthService
    clock: Clock
    store: Store


@pytest.fixture
async def harness(store_url: str) -> AsyncIterator[Harness]:
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    clock = Clock(T0)
    key = Ed25519PrivateKey.generate()
    tokens = TokenService(key, "k1", {"k1": key.public_key()}, "iss", "aud", 3600, 7 * 86400, clock)
    auth = AuthService(
        users=UserRepository(store),
        refresh_tokens=RefreshTokenRepository(store),
        failures=AuthFailureRepository(store),
        tokens=tokens,
        passwords=CountingHasher(),
        cache=MemoryCache(clock=clock),
        clock=clock,
        mfa=MfaService(store, Vault(Keyring.generate("k1")), clock=clock),
    )
    try:
        yield Harness(auth, clock, store)
    finally:
        await store.close()


def _code(secret: str, at: float) -> str:
    return pyotp.TOTP(secret).at(int(at))


async def _enrolled(h: Harness) -> tuple[str, str, list[str]]:
    """Register ada, enrol and confirm; (user id, secret, recovery codes)."""
    session = await h.auth.register(EMAIL, PASSWORD)
    enrollment = await h.auth.enroll_mfa(session.user_id)
    assert enrollment.otpauth_uri.startswith("otpauth://totp/Automator67:")
    codes = await h.auth.confirm_mfa(session.user_id, _code(enrollment.secret, h.clock.now))
    return session.user_id, enrollment.secret, codes


async def test_enrol_confirm_then_login_needs_a_second_step(harness: Harness) -> None:
    user_id, secret, codes = await _enrolled(harness)
    assert len(codes) == 10
    assert len(set(codes)) == 10
    assert (await harness.auth.current_user(user_id)).mfa_enabled  # type: ignore[union-attr]
    # Secret and codes are stored only as ciphertext and hashes.
    async with harness.store.session() as s:
        row = await s.get(UserMfa, user_id)
        hashes = [c.code_hash for c in (await s.execute(select(MfaRecoveryCode))).scalars()]
    assert row is not None
    assert secret not in row.secret_encrypted
    assert row.secret_encrypted.startswith("a67v1:")
    assert not any(code.replace("-", "") in h or code in h for code in codes for h in hashes)

    harness.clock.now += 60  # a later time step than the confirming code
    first = await harness.auth.login(EMAIL, PASSWORD)
    assert isinstance(first, MfaRequired)
    session = await harness.auth.verify_mfa(first.challenge, _code(secret, harness.clock.now), "")
    assert isinstance(session, Session)
    assert session.user_id == user_id
    # The challenge is spent.
    with pytest.raises(Unauthenticated) as info:
        await harness.auth.verify_mfa(first.challenge, _code(secret, harness.clock.now + 30), "")
    assert info.value.reason == "MFA_CHALLENGE_INVALID"


async def test_a_used_code_cannot_be_replayed_within_its_window(harness: Harness) -> None:
    _, secret, _ = await _enrolled(harness)
    harness.clock.now += 60
    code = _code(secret, harness.clock.now)
    first = await harness.auth.login(EMAIL, PASSWORD)
    assert isinstance(first, MfaRequired)
    await harness.auth.verify_mfa(first.challenge, code, "")
    harness.clock.now += 10  # same 30 s window (or the next: still within the ±1 step skew)
    second = await harness.auth.login(EMAIL, PASSWORD)
    assert isinstance(second, MfaRequired)
    with pytest.raises(Unauthenticated) as info:
        await harness.auth.verify_mfa(second.challenge, code, "")
    assert info.value.reason == "INVALID_MFA_CODE"
    # An older code (the previous step) is refused too once a later one was used.
    with pytest.raises(Unauthenticated):
        await harness.auth.verify_mfa(second.challenge, _code(secret, harness.clock.now - 30), "")


async def test_concurrent_use_of_one_code_lets_exactly_one_through(harness: Harness) -> None:
    _, secret, _ = await _enrolled(harness)
    harness.clock.now += 60
    challenges = []
    for _ in range(3):
        step = await harness.auth.login(EMAIL, PASSWORD)
        assert isinstance(step, MfaRequired)
        challenges.append(step.challenge)
    code = _code(secret, harness.clock.now)
    results = await asyncio.gather(
        *(harness.auth.verify_mfa(c, code, "") for c in challenges), return_exceptions=True
    )
    assert sum(isinstance(r, Session) for r in results) == 1


async def test_wrong_codes_are_throttled_like_passwords(harness: Harness) -> None:
    _, secret, _ = await _enrolled(harness)
    harness.clock.now += 60
    step = await harness.auth.login(EMAIL, PASSWORD)  # counts as attempt 1 (not reset: MFA is on)
    assert isinstance(step, MfaRequired)
    outcomes: list[str] = []
    for _ in range(6):
        try:
            await harness.auth.verify_mfa(step.challenge, "000000", "")
        except Unauthenticated as exc:
            outcomes.append(exc.reason)
        except ResourceExhausted as exc:
            outcomes.append(exc.reason)
    # Attempts 2-5 are checked (the 5th sets a 1 s lock); then the account is locked.
    assert outcomes[:4] == ["INVALID_MFA_CODE"] * 4
    assert outcomes[4:] == ["LOGIN_THROTTLED"] * 2
    # Under the lock even the right code is not checked.
    with pytest.raises(ResourceExhausted):
        await harness.auth.verify_mfa(step.challenge, _code(secret, harness.clock.now), "")
    # The password is throttled by the same count.
    with pytest.raises(ResourceExhausted):
        await harness.auth.login(EMAIL, PASSWORD)
    harness.clock.now += 1.5  # the lock ends: one more check, and a right code signs in
    session = await harness.auth.verify_mfa(step.challenge, _code(secret, harness.clock.now), "")
    assert isinstance(session, Session)


async def test_recovery_codes_work_once(harness: Harness) -> None:
    _, _, codes = await _enrolled(harness)
    step = await harness.auth.login(EMAIL, PASSWORD)
    assert isinstance(step, MfaRequired)
    session = await harness.auth.verify_mfa(step.challenge, "", codes[0].upper())
    assert isinstance(session, Session)
    step = await harness.auth.login(EMAIL, PASSWORD)
    assert isinstance(step, MfaRequired)
    with pytest.raises(Unauthenticated):
        await harness.auth.verify_mfa(step.challenge, "", codes[0])
    assert isinstance(await harness.auth.verify_mfa(step.challenge, "", codes[1]), Session)


async def test_confirm_needs_a_right_code_and_enrol_twice_is_refused(harness: Harness) -> None:
    session = await harness.auth.register(EMAIL, PASSWORD)
    enrollment = await harness.auth.enroll_mfa(session.user_id)
    with pytest.raises(Unauthenticated):
        await harness.auth.confirm_mfa(
            session.user_id, "123456" if _code(enrollment.secret, T0) != "123456" else "654321"
        )
    assert not (await harness.auth.current_user(session.user_id)).mfa_enabled  # type: ignore[union-attr]
    # Not on yet: login needs no second step.
    assert isinstance(await harness.auth.login(EMAIL, PASSWORD), Session)
    await harness.auth.confirm_mfa(session.user_id, _code(enrollment.secret, harness.clock.now))
    with pytest.raises(FailedPrecondition) as info:
        await harness.auth.enroll_mfa(session.user_id)
    assert info.value.reason == "MFA_ALREADY_ENABLED"
    with pytest.raises(InvalidArgument):
        await harness.auth.confirm_mfa(session.user_id, "12ab56")


async def test_disable_needs_a_current_code(harness: Harness) -> None:
    user_id, secret, _ = await _enrolled(harness)
    harness.clock.now += 60
    with pytest.raises(InvalidArgument):
        await harness.auth.disable_mfa(user_id, "", "")
    wrong = "111111" if _code(secret, harness.clock.now) != "111111" else "222222"
    with pytest.raises(Unauthenticated):
        await harness.auth.disable_mfa(user_id, wrong, "")
    await harness.auth.disable_mfa(user_id, _code(secret, harness.clock.now), "")
    assert isinstance(await harness.auth.login(EMAIL, PASSWORD), Session)
    with pytest.raises(FailedPrecondition):
        await harness.auth.disable_mfa(user_id, _code(secret, harness.clock.now + 30), "")


async def test_an_expired_challenge_is_refused(harness: Harness) -> None:
    _, secret, _ = await _enrolled(harness)
    step = await harness.auth.login(EMAIL, PASSWORD)
    assert isinstance(step, MfaRequired)
    harness.clock.now += 301
    with pytest.raises(Unauthenticated) as info:
        await harness.auth.verify_mfa(step.challenge, _code(secret, harness.clock.now), "")
    assert info.value.reason == "MFA_CHALLENGE_INVALID"


# -- over gRPC -----------------------------------------------------------------------


async def test_mfa_over_grpc(auth_stub: auth_pb2_grpc.AuthServiceStub, controller: Controller) -> None:
    reply = await register(auth_stub)
    token = bearer(reply.access_token)
    enrolled = await auth_stub.EnrollMfa(auth_pb2.EnrollMfaRequest(), metadata=token)
    totp = pyotp.TOTP(enrolled.secret)
    confirmed = await auth_stub.ConfirmMfa(auth_pb2.ConfirmMfaRequest(code=totp.now()), metadata=token)
    assert len(confirmed.recovery_codes) == 10
    me = await auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=token)
    assert me.user.mfa_enabled

    login = await auth_stub.Login(auth_pb2.LoginRequest(email=EMAIL, password_hash=PASSWORD))
    assert login.mfa_required
    assert login.mfa_challenge
    assert not login.access_token
    assert not login.refresh_token
    # VerifyMfa needs no access token; a recovery code completes it (the TOTP code was spent).
    done = await auth_stub.VerifyMfa(
        auth_pb2.VerifyMfaRequest(
            mfa_challenge=login.mfa_challenge, recovery_code=confirmed.recovery_codes[0]
        )
    )
    me = await auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(done.access_token))
    assert me.user.email == EMAIL
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.VerifyMfa(
            auth_pb2.VerifyMfaRequest(
                mfa_challenge=login.mfa_challenge, recovery_code=confirmed.recovery_codes[1]
            )
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.EnrollMfa(auth_pb2.EnrollMfaRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await auth_stub.DisableMfa(
        auth_pb2.DisableMfaRequest(recovery_code=confirmed.recovery_codes[2]),
        metadata=bearer(done.access_token),
    )
    login = await auth_stub.Login(auth_pb2.LoginRequest(email=EMAIL, password_hash=PASSWORD))
    assert not login.mfa_required
    assert login.access_token
