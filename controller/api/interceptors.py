"""Server interceptors: authentication, error mapping and request logging.

They are one wrapper around every method handler, applied in this order for
each call:

1. **logging** — one line per RPC (method, status code, duration, user id);
   never request bodies or metadata, so no secret reaches the log;
2. **authentication** — a Bearer access token in ``authorization`` metadata,
   except for the methods in :data:`PUBLIC_METHODS`; the verified principal is
   published for the servicer through :mod:`controller.api.context`;
3. **error mapping** — a :class:`~controller.errors.ControllerError` becomes its
   gRPC status with ``google.rpc`` details; a servicer method that is not built
   (the generated base class raises ``NotImplementedError``) becomes an honest
   ``UNIMPLEMENTED``; anything else becomes ``INTERNAL`` with an incident id,
   and the traceback goes to the log only.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_status import rpc_status

from controller.api.context import Principal, _principal, bearer_token
from controller.errors import ControllerError, Internal, PermissionDenied, Unauthenticated, Unimplemented

log = logging.getLogger("a67.access")
errors_log = logging.getLogger("a67.errors")

# Methods that need no access token: health, reflection, and the auth RPCs that
# establish a session. RegisterNode proves itself with an enrollment token and
# Connect with the node's client certificate.
PUBLIC_METHODS = frozenset(
    {
        "/automator67.v1.AuthService/Register",
        "/automator67.v1.AuthService/Login",
        "/automator67.v1.AuthService/Refresh",
        "/automator67.v1.NodeService/RegisterNode",
        "/automator67.v1.NodeService/Connect",
    }
)
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# The only methods a caller holding a node certificate (mutual TLS) may call.
NODE_METHODS = frozenset({"/automator67.v1.NodeService/Connect", "/grpc.health.v1.Health/Check"})


class AccessVerifier(Protocol):
    """Turns an access token into a principal or raises ``Unauthenticated``."""

    async def authenticate(self, token: str) -> Principal: ...


def is_public(method: str) -> bool:
    """Whether ``method`` (``/package.Service/Method``) may be called without a token."""
    return method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ControllerError) -> None:
    """End the call with ``error``'s status and ``google.rpc`` details."""
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


class ControllerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler with logging, authentication and error mapping."""

    def __init__(self, verifier: AccessVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        needs_auth = not is_public(method)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, needs_auth, handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(method, needs_auth, handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(method, needs_auth, handler.unary_stream))
        return handler._replace(stream_stream=self._streaming(method, needs_auth, handler.stream_stream))

    async def _admit(
        self, method: str, needs_auth: bool, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal | None:
        """Check who may call ``method``; the principal for user RPCs."""
        if "x509_pem_cert" in (context.auth_context() or {}) and method not in NODE_METHODS:
            raise PermissionDenied(
                "A node certificate may only hold the node stream (NodeService/Connect)",
                reason="NODE_CERTIFICATE_NOT_ALLOWED",
            )
        if not needs_auth:
            return None
        principal = await self._authenticate(context)
        _principal.set(principal)
        return principal

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(
                "This call needs 'authorization: Bearer <access token>' metadata", reason="MISSING_TOKEN"
            )
        return await self._verifier.authenticate(token)

    def _unary(self, method: str, needs_auth: bool, inner: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            principal: Principal | None = None
            try:
                principal = await self._admit(method, needs_auth, context)
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except BaseException as exc:
                await _handle(method, context, exc)
                raise
            finally:
                _log_call(method, context, started, principal)

        return wrapper

    def _streaming(self, method: str, needs_auth: bool, inner: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            principal: Principal | None = None
            try:
                principal = await self._admit(method, needs_auth, context)
                result = inner(request, context)
                if inspect.isawaitable(result):
                    # A servicer that writes with context.write() and returns.
                    await result
                    return
                async for item in result:
                    yield item
            except BaseException as exc:
                await _handle(method, context, exc)
                raise
            finally:
                _log_call(method, context, started, principal)

        return wrapper


async def _handle(method: str, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """Abort the call with the status that ``exc`` stands for (returns only for aborts/cancels)."""
    if isinstance(exc, ControllerError):
        await abort_with(context, exc)
    elif isinstance(exc, NotImplementedError):
        name = method.rsplit("/", 1)[-1]
        await abort_with(
            context,
            Unimplemented(f"{name} is not implemented yet by this controller", reason="NOT_IMPLEMENTED"),
        )
    elif isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
        incident = uuid.uuid4().hex[:12]
        errors_log.exception("unhandled error in %s (incident %s)", method, incident)
        await abort_with(
            context,
            Internal(
                f"The controller failed to handle this request (incident {incident})",
                reason="INTERNAL",
                metadata={"incident": incident},
            ),
        )


def _log_call(
    method: str, context: grpc.aio.ServicerContext[Any, Any], started: float, principal: Principal | None
) -> None:
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code is None else str(code)
    if context.cancelled() and code is None:
        name = "CANCELLED"
    log.info(
        "rpc %s code=%s duration_ms=%.1f user=%s",
        method,
        name,
        (time.perf_counter() - started) * 1000,
        principal.user_id if principal else "-",
    )
