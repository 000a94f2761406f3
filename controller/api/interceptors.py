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

**Streams do not outlive their session.** A server-streaming (or bidirectional)
RPC that needed an access token re-authenticates that same token every
``stream_recheck_seconds`` (:data:`STREAM_RECHECK_SECONDS` by default) for as
long as it runs: when the session is logged out or revoked (refresh-token
reuse), or the token expires, the stream ends with ``UNAUTHENTICATED`` (the
reason of the failed check, e.g. ``SESSION_REVOKED`` or ``TOKEN_EXPIRED``).
This holds for every such RPC, with no code in the servicers: the servicer's
pending ``await`` is cancelled (its ``finally`` blocks run) and the call is
aborted. A re-check that fails for another reason (a store outage) is logged and
tried again at the next interval; the token's expiry is checked locally, so an
expired token ends the stream even then.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
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
        "/automator67.v1.AuthService/VerifyMfa",  # the second step of Login: proves itself with its challenge
        "/automator67.v1.NodeService/RegisterNode",
        "/automator67.v1.NodeService/Connect",
        "/automator67.v1.NodeService/FetchPackage",
        *(f"/automator67.v1.NodeService/{m}" for m in ("FetchChunk", "PushChunk", "ReportChunks")),  # storage
        "/automator67.v1.NodeService/PushShardResult",  # shard results (controller/federation/results.py)
        "/automator67.v1.NodeService/PushReplicaLogs",  # replicas' logs (controller/deployments/logs.py)
        "/automator67.v1.NodeService/FetchStatement",  # long SQL texts (controller/nodes/statements.py)
        "/automator67.v1.NodeService/FetchNodeCredentials",  # sealed provider token (controller/credentials/)
    }
)
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# The only methods a caller holding a node certificate (mutual TLS) may call.
NODE_METHODS = frozenset(
    {
        "/automator67.v1.NodeService/Connect",
        "/automator67.v1.NodeService/FetchPackage",
        *(f"/automator67.v1.NodeService/{m}" for m in ("FetchChunk", "PushChunk", "ReportChunks")),  # storage
        "/automator67.v1.NodeService/PushShardResult",  # shard results (controller/federation/results.py)
        "/automator67.v1.NodeService/PushReplicaLogs",  # replicas' logs (controller/deployments/logs.py)
        "/automator67.v1.NodeService/FetchStatement",  # long SQL texts (controller/nodes/statements.py)
        "/automator67.v1.NodeService/FetchNodeCredentials",  # sealed provider token (controller/credentials/)
        "/grpc.health.v1.Health/Check",
    }
)

STREAM_RECHECK_SECONDS = 2.0
"""How often an authenticated stream re-checks its caller's token and session (seconds).

Read when a :class:`ControllerInterceptor` is built without ``stream_recheck_seconds``.
One check reads memory only (the token was verified once, the session's state is held
by :class:`~controller.auth.session_cache.AuthCache`), so it is cheap; a revocation made
by this controller, or heard from another over Redis pub/sub, ends the stream within one
interval."""


class AccessVerifier(Protocol):
    """Turns an access token into a principal or raises ``Unauthenticated``."""

    async def authenticate(self, token: str) -> Principal: ...


def is_public(method: str) -> bool:
    """Whether ``method`` (``/package.Service/Method``) may be called without a token."""
    return method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ControllerError) -> None:
    """End the call with ``error``'s status and ``google.rpc`` details."""
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


class _StreamGuard:
    """Ends one authenticated stream when a re-check of its token fails.

    Like :func:`asyncio.timeout`: the watcher cancels the stream's own task, but
    only while that task is awaiting the servicer (never while gRPC is writing a
    message), and the stream turns that cancellation into the stored error.
    """

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._inside = False
        self._cancelled = False
        self.error: Unauthenticated | None = None

    def revoke(self, error: Unauthenticated) -> None:
        """Called by the watcher: remember ``error`` and interrupt the servicer if it is running."""
        self.error = error
        if self._inside and not self._cancelled:
            self._cancelled = True
            self._task.cancel()

    def enter(self) -> None:
        """Before awaiting the servicer: raise the error if the session already ended."""
        self.check()
        self._inside = True

    def leave(self) -> None:
        self._inside = False

    def check(self) -> None:
        """Raise the stored error, if any (undoing our own pending cancellation first)."""
        if self.error is None:
            return
        if self._cancelled:
            self._cancelled = False
            self._task.uncancel()
        raise self.error

    def converts(self) -> bool:
        """On a ``CancelledError``: whether it is ours alone (so the stream ends with the error)."""
        if not self._cancelled:
            return False
        self._cancelled = False
        return self._task.uncancel() == 0


class ControllerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler with logging, authentication and error mapping.

    ``stream_recheck_seconds``: how often authenticated streams re-check their
    token and session (default :data:`STREAM_RECHECK_SECONDS`).
    """

    def __init__(self, verifier: AccessVerifier, *, stream_recheck_seconds: float | None = None) -> None:
        self._verifier = verifier
        recheck = STREAM_RECHECK_SECONDS if stream_recheck_seconds is None else stream_recheck_seconds
        if not recheck > 0:
            raise ValueError("stream_recheck_seconds must be positive")
        self._stream_recheck_seconds = float(recheck)
        # method -> (the servicer's handler, its wrapped handler): built once per method,
        # not once per call (the servicers' generic handlers return the same object)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        if len(self._wrapped) < 1024:  # methods of the services this server hosts
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
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
                "A node certificate may only hold the node stream and fetch packages "
                "(NodeService/Connect, NodeService/FetchPackage)",
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
                token = bearer_token(context.invocation_metadata()) if principal is not None else None
                result = inner(request, context)
                if token is None:
                    if inspect.isawaitable(result):
                        # A servicer that writes with context.write() and returns.
                        await result
                        return
                    async for item in result:
                        yield item
                    return
                async with contextlib.aclosing(self._guarded(method, token, result)) as guarded:
                    async for item in guarded:
                        yield item
            except BaseException as exc:
                await _handle(method, context, exc)
                raise
            finally:
                _log_call(method, context, started, principal)

        return wrapper

    async def _guarded(self, method: str, token: str, result: Any) -> AsyncGenerator[Any, None]:
        """Run a stream's servicer while re-checking ``token``; end it when the check fails."""
        task = asyncio.current_task()
        assert task is not None
        guard = _StreamGuard(task)
        watcher = asyncio.create_task(self._watch(method, token, guard), name=f"a67-stream-auth {method}")
        closers: list[Any] = []
        try:
            if inspect.isawaitable(result):
                # A servicer that writes with context.write() and returns.
                guard.enter()
                try:
                    await result
                except asyncio.CancelledError:
                    if guard.converts() and guard.error is not None:
                        raise guard.error from None
                    raise
                finally:
                    guard.leave()
                guard.check()
                return
            iterator = result.__aiter__()
            closers.append(iterator)
            while True:
                guard.enter()
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    guard.check()  # a servicer that swallowed our cancellation still ends revoked
                    return
                except asyncio.CancelledError:
                    if guard.converts() and guard.error is not None:
                        raise guard.error from None
                    raise
                finally:
                    guard.leave()
                guard.check()
                yield item
        finally:
            watcher.cancel()
            for iterator in closers:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def _watch(self, method: str, token: str, guard: _StreamGuard) -> None:
        """Re-authenticate ``token`` every interval until it fails, then revoke the stream."""
        while True:
            await asyncio.sleep(self._stream_recheck_seconds)
            try:
                await self._verifier.authenticate(token)
            except Unauthenticated as exc:
                log.info("ending stream %s: %s (%s)", method, exc.message, exc.reason)
                guard.revoke(exc)
                return
            except Exception:
                errors_log.warning(
                    "could not re-check the session of a stream of %s; trying again in %.1f s",
                    method,
                    self._stream_recheck_seconds,
                    exc_info=True,
                )


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
    """The access-log line of one call: ``rpc method=… code=… duration_ms=… user=…``.

    Structured (``key=value``, values without spaces) and lazy: below INFO nothing
    is looked up or formatted, and the text is made only when a handler writes it.
    """
    if not log.isEnabledFor(logging.INFO):
        return
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code is None else str(code)
    if code is None and context.cancelled():
        name = "CANCELLED"
    log.info(
        "rpc method=%s code=%s duration_ms=%.3f user=%s",
        method,
        name,
        (time.perf_counter() - started) * 1000,
        principal.user_id if principal else "-",
    )
