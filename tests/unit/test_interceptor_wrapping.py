"""The interceptor wraps each method's handler once, not once per call."""

from __future__ import annotations

from typing import Any

import grpc

from controller.api.interceptors import ControllerInterceptor


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _unary(request: Any, context: Any) -> Any:
    return request


async def test_a_methods_handler_is_wrapped_once_and_again_when_it_changes() -> None:
    interceptor = ControllerInterceptor(None)  # type: ignore[arg-type]
    handler = grpc.unary_unary_rpc_method_handler(_unary)
    other = grpc.unary_unary_rpc_method_handler(_unary)

    async def continuation(details: Any) -> Any:
        return current[0]

    current = [handler]
    first = await interceptor.intercept_service(continuation, Details("/grpc.health.v1.Health/Check"))
    again = await interceptor.intercept_service(continuation, Details("/grpc.health.v1.Health/Check"))
    assert first is again
    assert first.unary_unary is not handler.unary_unary  # wrapped
    current[0] = other  # a different handler for the method: wrapped anew
    third = await interceptor.intercept_service(continuation, Details("/grpc.health.v1.Health/Check"))
    assert third is not first
    assert await interceptor.intercept_service(continuation, Details("/unknown")) is not first

    async def missing(details: Any) -> Any:
        return None

    assert await interceptor.intercept_service(missing, Details("/nope")) is None
