"""Rotating the JWT signing key end to end (issue 16): tokens issued before the rotation
keep working through retired verification keys; new tokens carry the new ``kid``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.errors import FailedPrecondition
from controller.keys import jwt_key_id
from tests.support import bearer, controller_settings, register, running_controller


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def _write_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return key


async def test_tokens_survive_a_signing_key_rotation(tmp_path: Path) -> None:
    old_file, new_file = tmp_path / "jwt-1.pem", tmp_path / "jwt-2.pem"
    old_key, new_key = _write_key(old_file), _write_key(new_file)
    old_public = tmp_path / "jwt-1.pub.pem"
    old_public.write_bytes(
        old_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    data = tmp_path / "data"
    first = controller_settings(data, jwt_private_key_file=str(old_file))
    async with running_controller(first) as before, grpc.aio.insecure_channel(before.address) as channel:
        reply = await register(auth_pb2_grpc.AuthServiceStub(channel))
    assert _kid(reply.access_token) == jwt_key_id(old_key.public_key())

    rotated = controller_settings(
        data, jwt_private_key_file=str(new_file), jwt_retired_public_key_files=f" {old_public} "
    )
    async with running_controller(rotated) as after, grpc.aio.insecure_channel(after.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        # The access token of before the rotation still works.
        me = await stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(reply.access_token))
        assert me.user.id == reply.user_id
        # So does its refresh token; what it returns is signed with the new key.
        fresh = await stub.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(reply.refresh_token))
        assert _kid(fresh.access_token) == _kid(fresh.refresh_token) == jwt_key_id(new_key.public_key())
        await stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(fresh.access_token))
        login = await register(stub, email="bob@example.com")
        assert _kid(login.access_token) == jwt_key_id(new_key.public_key())

    # Once the retired key is dropped from the list, its tokens are refused.
    last = controller_settings(data, jwt_private_key_file=str(new_file))
    async with running_controller(last) as later, grpc.aio.insecure_channel(later.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(reply.access_token))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(fresh.access_token))


def test_a_bad_retired_key_file_refuses_to_start(tmp_path: Path) -> None:
    from controller.keys import load_key_material

    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(FailedPrecondition, match="JWT_RETIRED"):
        load_key_material(
            controller_settings(tmp_path, jwt_retired_public_key_files=str(tmp_path / "bad.pem"))
        )
    with pytest.raises(FailedPrecondition, match="cannot read"):
        load_key_material(
            controller_settings(tmp_path, jwt_retired_public_key_files=str(tmp_path / "missing.pem"))
        )
