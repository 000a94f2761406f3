"""``automator67.v1.AuthService``: a thin edge over :class:`controller.auth.service.AuthService`."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from automator67.v1 import auth_pb2, auth_pb2_grpc

from controller.api.context import bearer_token, current_principal
from controller.api.http import set_http_status
from controller.auth.service import AuthService, MfaRequired
from controller.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unauthenticated
from controller.store.repositories import UserRepository
from controller.timestamps import timestamp
from controller.vault.audit import SecretAuditLog

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(
        self, service: AuthService, users: UserRepository, audit: SecretAuditLog | None = None
    ) -> None:
        self._service = service
        self._users = users
        self._audit = audit

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
        if isinstance(session, MfaRequired):
            return auth_pb2.LoginResponse(mfa_required=True, mfa_challenge=session.challenge)
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

    async def VerifyMfa(
        self, request: auth_pb2.VerifyMfaRequest, context: Context
    ) -> auth_pb2.VerifyMfaResponse:
        session = await self._service.verify_mfa(request.mfa_challenge, request.code, request.recovery_code)
        return auth_pb2.VerifyMfaResponse(
            access_token=session.access.token,
            refresh_token=session.refresh.token,
            expires_in=session.access.expires_in,
        )

    async def EnrollMfa(
        self, request: auth_pb2.EnrollMfaRequest, context: Context
    ) -> auth_pb2.EnrollMfaResponse:
        enrollment = await self._service.enroll_mfa(current_principal().user_id)
        return auth_pb2.EnrollMfaResponse(secret=enrollment.secret, otpauth_uri=enrollment.otpauth_uri)

    async def ConfirmMfa(
        self, request: auth_pb2.ConfirmMfaRequest, context: Context
    ) -> auth_pb2.ConfirmMfaResponse:
        codes = await self._service.confirm_mfa(current_principal().user_id, request.code)
        return auth_pb2.ConfirmMfaResponse(recovery_codes=codes)

    async def DisableMfa(
        self, request: auth_pb2.DisableMfaRequest, context: Context
    ) -> auth_pb2.DisableMfaResponse:
        await self._service.disable_mfa(current_principal().user_id, request.code, request.recovery_code)
        return auth_pb2.DisableMfaResponse()

    async def ListSecretAuditEvents(
        self, request: auth_pb2.ListSecretAuditEventsRequest, context: Context
    ) -> auth_pb2.ListSecretAuditEventsResponse:
        if self._audit is None:
            raise FailedPrecondition("The secret audit log is not enabled", reason="AUDIT_UNAVAILABLE")
        before: int | None = None
        if request.page_token:
            try:
                before = int(request.page_token)
            except ValueError:
                raise InvalidArgument(
                    "page_token is not a token this API returned",
                    field_violations=[FieldViolation("page_token", "is not valid")],
                ) from None
        if request.page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                field_violations=[FieldViolation("page_size", "must be 0 (default) or positive")],
            )
        rows, next_seq = await self._audit.list_for_user(
            current_principal().user_id, page_size=request.page_size or 100, before_seq=before
        )
        return auth_pb2.ListSecretAuditEventsResponse(
            events=[
                auth_pb2.SecretAuditEvent(
                    id=row.id,
                    actor=row.actor,
                    secret_owner=row.secret_owner,
                    secret_purpose=row.secret_purpose,
                    key_id=row.key_id,
                    reason=row.reason,
                    created_at=timestamp(row.created_at),
                )
                for row in rows
            ],
            next_page_token="" if next_seq is None else str(next_seq),
        )
