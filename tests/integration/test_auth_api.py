"""AuthService over a real grpc.aio server: the whole flow and every error of issue 2."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import grpc
import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc, storage_pb2, storage_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.server import Controller
from tests.support import PASSWORD, bearer, register


def _details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    """The google.rpc details of an error, by kind."""
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


async def test_register_returns_tokens_that_work(auth_stub: auth_pb2_grpc.AuthServiceStub) -> None:
    call = auth_stub.Register(auth_pb2.RegisterRequest(email="Ada@Example.com ", password_hash=PASSWORD))
    reply = await call
    assert len(reply.user_id) == 36
    assert reply.access_token.count(".") == 2
    assert reply.refresh_token.count(".") == 2
    assert reply.expires_in == 3600
    assert ("x-a67-http-status", "201") in tuple(await call.initial_metadata())
    me = await auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(reply.access_token))
    assert me.user.id == reply.user_id
    assert me.user.email == "ada@example.com"
    assert me.user.active


async def test_duplicate_email_is_already_exists(auth_stub: auth_pb2_grpc.AuthServiceStub) -> None:
    await register(auth_stub)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await register(auth_stub, email="ADA@example.com")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _details(info.value)["ErrorInfo"].reason == "EMAIL_TAKEN"


@pytest.mark.parametrize(
    ("email", "password_hash", "bad_fields"),
    [
        ("not-an-email", PASSWORD, {"email"}),
        ("", PASSWORD, {"email"}),
        ("ada@example.com", "short", {"password_hash"}),
        ("ada@example.com", "x" * 1025, {"password_hash"}),
        ("ada@example.com", "", {"password_hash"}),
        ("bad email", "", {"email", "password_hash"}),
    ],
)
async def test_bad_input_is_invalid_argument_with_field_violations(
    auth_stub: auth_pb2_grpc.AuthServiceStub, email: str, password_hash: str, bad_fields: set[str]
) -> None:
    for rpc in (auth_stub.Register, auth_stub.Login):
        request_type = auth_pb2.RegisterRequest if rpc is auth_stub.Register else auth_pb2.LoginRequest
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(request_type(email=email, password_hash=password_hash))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = _details(info.value)["BadRequest"].field_violations
        assert {v.field for v in violations} == bad_fields
        assert all(v.description for v in violations)


async def test_nothing_is_stored_after_a_rejected_register(auth_stub: auth_pb2_grpc.AuthServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await auth_stub.Register(auth_pb2.RegisterRequest(email="ada@example.com", password_hash="short"))
    await register(auth_stub)  # the email is still free


async def test_login_wrong_password_and_unknown_email_look_the_same(
    auth_stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    await register(auth_stub)
    errors = []
    for email, password_hash in (("ada@example.com", "W" * 44), ("nobody@example.com", PASSWORD)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth_stub.Login(auth_pb2.LoginRequest(email=email, password_hash=password_hash))
        errors.append((info.value.code(), info.value.details(), _details(info.value)["ErrorInfo"].reason))
    assert errors[0] == errors[1]
    assert errors[0][0] == grpc.StatusCode.UNAUTHENTICATED


async def test_login_keeps_last_login(auth_stub: auth_pb2_grpc.AuthServiceStub) -> None:
    await register(auth_stub)
    reply = await auth_stub.Login(auth_pb2.LoginRequest(email="ada@example.com", password_hash=PASSWORD))
    assert reply.expires_in == 3600
    me = await auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(reply.access_token))
    assert me.user.HasField("last_login")


async def test_repeated_failures_are_throttled_with_retry_info(
    auth_stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    await register(auth_stub)
    codes = []
    for _ in range(8):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth_stub.Login(auth_pb2.LoginRequest(email="ada@example.com", password_hash="W" * 44))
        codes.append(info.value.code())
    assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[5:]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.Login(auth_pb2.LoginRequest(email="ada@example.com", password_hash=PASSWORD))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(info.value)
    assert details["ErrorInfo"].reason == "LOGIN_THROTTLED"
    assert details["RetryInfo"].retry_delay.ToMilliseconds() > 0


async def test_refresh_rotates_and_reuse_revokes_the_session(
    auth_stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    first = await register(auth_stub)
    rotated = await auth_stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(first.refresh_token))
    assert rotated.refresh_token != first.refresh_token
    assert rotated.access_token != first.access_token
    me = await auth_stub.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(rotated.access_token)
    )
    assert me.user.id == first.user_id

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(first.refresh_token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _details(info.value)["ErrorInfo"].reason == "REFRESH_TOKEN_REUSED"
    # The whole family is gone: the successor and the session's access tokens too.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(rotated.refresh_token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(rotated.access_token)
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_concurrent_refreshes_with_one_token_exactly_one_wins(
    auth_stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    first = await register(auth_stub)
    results = await asyncio.gather(
        *(
            auth_stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(first.refresh_token))
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, auth_pb2.RefreshResponse)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 1
    assert len(losses) == 19
    assert {e.code() for e in losses} == {grpc.StatusCode.UNAUTHENTICATED}


async def test_tokens_cannot_stand_in_for_each_other(auth_stub: auth_pb2_grpc.AuthServiceStub) -> None:
    session = await register(auth_stub)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(session.access_token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _details(info.value)["ErrorInfo"].reason == "TOKEN_WRONG_TYPE"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(session.refresh_token)
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _details(info.value)["ErrorInfo"].reason == "TOKEN_WRONG_TYPE"


def _forge_alg_none(token: str) -> str:
    header_b64, payload_b64, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    header["alg"] = "none"
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload_b64}."


async def test_forged_and_missing_tokens_are_unauthenticated(
    auth_stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    session = await register(auth_stub)
    for metadata in (
        (),
        bearer("garbage"),
        bearer(_forge_alg_none(session.access_token)),
        (("authorization", "Basic x"),),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert session.access_token not in (info.value.details() or "")


async def test_logout_ends_the_session(auth_stub: auth_pb2_grpc.AuthServiceStub) -> None:
    session = await register(auth_stub)
    other = await auth_stub.Login(auth_pb2.LoginRequest(email="ada@example.com", password_hash=PASSWORD))
    await auth_stub.Logout(auth_pb2.LogoutRequest(), metadata=bearer(session.access_token))
    for call in (
        auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(session.access_token)),
        auth_stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(session.refresh_token)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Another session of the same user is untouched.
    me = await auth_stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(other.access_token))
    assert me.user.id == session.user_id


async def test_a_file_rpc_authenticates_first_and_a_missing_file_is_not_found(
    channel: grpc.aio.Channel, auth_stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    storage = storage_pb2_grpc.StorageServiceStub(channel)
    # Authentication comes first: without a token it is UNAUTHENTICATED.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await storage.GetFile(storage_pb2.GetFileRequest(file_id="x"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    session = await register(auth_stub)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await storage.GetFile(
            storage_pb2.GetFileRequest(file_id=str(uuid.uuid4())), metadata=bearer(session.access_token)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_controller_address(controller: Controller) -> None:
    assert controller.port > 0


# Lookalike emails (finding 2 of the attack run): each pair is one account.
LOOKALIKE_PAIRS = [
    pytest.param("jos\u00e9@example.com", "jose\u0301@example.com", "jos\u00e9@example.com", id="nfc-nfd"),
    pytest.param(
        "ops@b\u00fccher.example", "ops@xn--bcher-kva.example", "ops@xn--bcher-kva.example", id="idna"
    ),
    pytest.param("adm@example.com", "\uff41dm@example.com", "adm@example.com", id="fullwidth"),
    pytest.param(
        "Ops@B\u00dcCHER.Example", "ops@bu\u0308cher.example", "ops@xn--bcher-kva.example", id="case-nfd-idn"
    ),
]


@pytest.mark.parametrize(("first", "second", "stored"), LOOKALIKE_PAIRS)
async def test_lookalike_emails_are_one_account(
    auth_stub: auth_pb2_grpc.AuthServiceStub, first: str, second: str, stored: str
) -> None:
    created = await register(auth_stub, email=first)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await register(auth_stub, email=second)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _details(info.value)["ErrorInfo"].reason == "EMAIL_TAKEN"
    for form in (first, second):
        reply = await auth_stub.Login(auth_pb2.LoginRequest(email=form, password_hash=PASSWORD))
        me = await auth_stub.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(reply.access_token)
        )
        assert me.user.id == created.user_id
        assert me.user.email == stored
