"""``automator67.v1.AuthService``: a thin edge over :class:`controller.auth.service.AuthService`."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from automator67.v1 import auth_pb2, auth_pb2_grpc

from controller.api.context import bearer_token, current_principal
from controller.api.http import set_http_status
from controller.auth.service import AuthService
from controller.errors import NotFound, Unauthenticated
from controller.store.repositories import UserRepository
from controller.timestamps import timestamp

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, service: AuthService, users: UserRepository) -> None:
        self._service = service
        self._users = users

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: Context
    ) -> auth_pb2.RegisterResponse:
        session = await self._service.register(request.email, request.password_hash)
        await set_http_status(context, 201)
        return auth_pb2.RegisterResponse(
            user_id=session.user_id,
            access_token=session.access.token,
            refresh_token=session.refresh.token,
            expires_in=session.access.expires_in,
        )

    async def Login(self, request: auth_pb2.LoginRequest, context: Context) -> auth_pb2.LoginResponse:
        session = await self._service.login(request.email, request.password_hash)
        return auth_pb2.LoginResponse(
            access_token=session.access.token,
            refresh_token=session.refresh.token,
            expires_in=session.access.expires_in,
        )

    async def Refresh(self, request: auth_pb2.RefreshRequest, context: Context) -> auth_pb2.RefreshResponse:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(
                "Refresh needs 'authorization: Bearer <refresh token>' metadata", reason="MISSING_TOKEN"
            )
        session = await self._service.refresh(token)
        return auth_pb2.RefreshResponse(
            access_token=session.access.token,
            refresh_token=session.refresh.token,
            expires_in=session.access.expires_in,
        )

    async def Logout(self, request: auth_pb2.LogoutRequest, context: Context) -> auth_pb2.LogoutResponse:
        await self._service.logout(current_principal())
        return auth_pb2.LogoutResponse()

    async def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: Context
    ) -> auth_pb2.GetCurrentUserResponse:
        user = await self._service.current_user(current_principal().user_id)
        if user is None:
            raise NotFound("This account no longer exists", reason="USER_NOT_FOUND")
        return auth_pb2.GetCurrentUserResponse(
            user=auth_pb2.User(
                id=user.id,
                email=user.email,
                created_at=timestamp(user.created_at),
                last_login=timestamp(user.last_login),
                mfa_enabled=user.mfa_enabled,
                active=user.active,
            )
        )
