"""Server streams end with UNAUTHENTICATED when their session ends (finding 3 of the attack run).

Part 1 runs the real controller (WatchSystemMetrics) with a short re-check interval.
Part 2 runs a real grpc.aio server with the real interceptor and AuthService over a
real store, an injected token clock (to expire the access token) and small
servicers of both styles (async generator and ``context.write``), to show that one
mechanism covers every authenticated stream and that the servicer is cleaned up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from automator67.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    deployment_pb2,
    deployment_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.api import interceptors
from controller.api.auth_servicer import AuthServicer
from controller.api.interceptors import ControllerInterceptor
from controller.auth.passwords import PasswordHasher
from controller.auth.service import AuthService
from controller.auth.tokens import TokenService
from controller.cache.memory import MemoryCache
from controller.server import Controller
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.repositories import AuthFailureRepository, RefreshTokenRepository, UserRepository
from tests.support import PASSWORD, bearer, controller_settings, register, running_controller

RECHECK_SECONDS = 0.05
# How long a stream may take to end after its session does: generous, for slow CI.
BOUND_SECONDS = 15.0


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo")


async def _end_of(call: Any) -> grpc.aio.AioRpcError:
    """Read ``call`` until it ends (within BOUND_SECONDS); the error it ended with."""

    async def drain() -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(drain(), BOUND_SECONDS)
    return info.value


# --- 1. the real controller ---------------------------------------------------------------------


@pytest.fixture
async def fast_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Controller]:
    monkeypatch.setattr(interceptors, "STREAM_RECHECK_SECONDS", RECHECK_SECONDS)
    async with running_controller(controller_settings(tmp_path)) as running:
        yield running


@pytest.fixture
async def stubs(
    fast_controller: Controller,
) -> AsyncIterator[tuple[auth_pb2_grpc.AuthServiceStub, metrics_pb2_grpc.MetricsServiceStub]]:
    async with grpc.aio.insecure_channel(fast_controller.address) as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel), metrics_pb2_grpc.MetricsServiceStub(channel)


def _watch(metrics: metrics_pb2_grpc.MetricsServiceStub, access_token: str) -> Any:
    return metrics.WatchSystemMetrics(
        metrics_pb2.WatchSystemMetricsRequest(min_interval_ms=200), metadata=bearer(access_token)
    )


async def test_watch_system_metrics_ends_when_its_session_logs_out(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, metrics_pb2_grpc.MetricsServiceStub],
) -> None:
    auth, metrics = stubs
    mine = await register(auth)
    other = await auth.Login(auth_pb2.LoginRequest(email="ada@example.com", password_hash=PASSWORD))
    stream = _watch(metrics, mine.access_token)
    other_stream = _watch(metrics, other.access_token)
    assert (await stream.read()).HasField("metrics")
    assert (await other_stream.read()).HasField("metrics")

    await auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(mine.access_token))

    ended = await _end_of(stream)
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(ended) == "SESSION_REVOKED"
    assert mine.access_token not in (ended.details() or "")
    # The same user's other session keeps its stream until it logs out too.
    assert not other_stream.done()
    await auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(other.access_token))
    assert (await _end_of(other_stream)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_watch_system_metrics_ends_when_refresh_token_reuse_revokes_the_session(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, metrics_pb2_grpc.MetricsServiceStub],
) -> None:
    auth, metrics = stubs
    first = await register(auth)
    rotated = await auth.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(first.refresh_token))
    stream = _watch(metrics, rotated.access_token)
    assert (await stream.read()).HasField("metrics")

    with pytest.raises(grpc.aio.AioRpcError) as reuse:
        await auth.Refresh(auth_pb2.RefreshRequest(), metadata=bearer(first.refresh_token))
    assert _reason(reuse.value) == "REFRESH_TOKEN_REUSED"

    ended = await _end_of(stream)
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(ended) == "SESSION_REVOKED"


# --- 2. one mechanism for every stream ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class TickingMetrics(metrics_pb2_grpc.MetricsServiceServicer):
    """An async-generator stream that pushes every 20 ms and records its clean-up."""

    def __init__(self) -> None:
        self.cleaned_up = 0
        self.cleaned = asyncio.Event()

    async def WatchSystemMetrics(
        self, request: metrics_pb2.WatchSystemMetricsRequest, context: Any
    ) -> AsyncIterator[metrics_pb2.WatchSystemMetricsResponse]:
        try:
            while True:
                yield metrics_pb2.WatchSystemMetricsResponse(metrics=metrics_pb2.SystemMetrics(total_nodes=1))
                await asyncio.sleep(0.02)
        finally:
            self.cleaned_up += 1
            self.cleaned.set()


class WritingDeployments(deployment_pb2_grpc.DeploymentServiceServicer):
    """A stream written with ``context.write()`` (a coroutine servicer)."""

    def __init__(self) -> None:
        self.cleaned_up = 0

    async def WatchDeployment(self, request: deployment_pb2.WatchDeploymentRequest, context: Any) -> None:
        try:
            while True:
                await context.write(deployment_pb2.WatchDeploymentResponse())
                await asyncio.sleep(0.02)
        finally:
            self.cleaned_up += 1


@dataclass
class Rig:
    auth: auth_pb2_grpc.AuthServiceStub
    metrics: metrics_pb2_grpc.MetricsServiceStub
    deployments: deployment_pb2_grpc.DeploymentServiceStub
    ticking: TickingMetrics
    writing: WritingDeployments
    clock: Clock


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    url = f"sqlite:///{tmp_path / 'controller.db'}"
    await asyncio.to_thread(upgrade, url)
    store = await Store.open(url)
    clock = Clock()
    key = Ed25519PrivateKey.generate()
    tokens = TokenService(key, "k1", {"k1": key.public_key()}, "iss", "aud", 600, 7 * 86400, clock)
    users = UserRepository(store)
    service = AuthService(
        users=users,
        refresh_tokens=RefreshTokenRepository(store),
        failures=AuthFailureRepository(store),
        tokens=tokens,
        passwords=PasswordHasher(time_cost=1, memory_cost=64, parallelism=1),
        cache=MemoryCache(),
        clock=clock,
    )
    ticking, writing = TickingMetrics(), WritingDeployments()
    server = grpc.aio.server(
        interceptors=[ControllerInterceptor(service, stream_recheck_seconds=RECHECK_SECONDS)]
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(service, users), server)
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(ticking, server)
    deployment_pb2_grpc.add_DeploymentServiceServicer_to_server(writing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Rig(
                auth_pb2_grpc.AuthServiceStub(channel),
                metrics_pb2_grpc.MetricsServiceStub(channel),
                deployment_pb2_grpc.DeploymentServiceStub(channel),
                ticking,
                writing,
                clock,
            )
    finally:
        await server.stop(0)
        await store.close()


async def test_streams_of_both_styles_end_when_the_access_token_expires(rig: Rig) -> None:
    session = await register(rig.auth)
    watch = rig.metrics.WatchSystemMetrics(
        metrics_pb2.WatchSystemMetricsRequest(), metadata=bearer(session.access_token)
    )
    written = rig.deployments.WatchDeployment(
        deployment_pb2.WatchDeploymentRequest(deployment_id="d"), metadata=bearer(session.access_token)
    )
    for _ in range(3):  # both flow while the token is valid, across several re-checks
        assert (await watch.read()).metrics.total_nodes == 1
        assert isinstance(await written.read(), deployment_pb2.WatchDeploymentResponse)

    rig.clock.now += 601  # past the access token's exp

    for call in (watch, written):
        ended = await _end_of(call)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(ended) == "TOKEN_EXPIRED"
    # The servicers were interrupted, not left running: their clean-up ran.
    assert (rig.ticking.cleaned_up, rig.writing.cleaned_up) == (1, 1)


async def test_a_logout_ends_only_that_sessions_streams(rig: Rig) -> None:
    mine = await register(rig.auth)
    other = await rig.auth.Login(auth_pb2.LoginRequest(email="ada@example.com", password_hash=PASSWORD))
    ended_streams = [
        rig.metrics.WatchSystemMetrics(
            metrics_pb2.WatchSystemMetricsRequest(), metadata=bearer(mine.access_token)
        ),
        rig.deployments.WatchDeployment(
            deployment_pb2.WatchDeploymentRequest(), metadata=bearer(mine.access_token)
        ),
    ]
    survivor = rig.metrics.WatchSystemMetrics(
        metrics_pb2.WatchSystemMetricsRequest(), metadata=bearer(other.access_token)
    )
    for call in (*ended_streams, survivor):
        await call.read()

    await rig.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(mine.access_token))

    for call in ended_streams:
        ended = await _end_of(call)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(ended) == "SESSION_REVOKED"
    for _ in range(10):  # other session: still pushing, many re-checks later
        assert (await survivor.read()).metrics.total_nodes == 1
    survivor.cancel()


async def test_a_client_cancel_still_cleans_up_and_stops_rechecking(rig: Rig) -> None:
    session = await register(rig.auth)
    watch = rig.metrics.WatchSystemMetrics(
        metrics_pb2.WatchSystemMetricsRequest(), metadata=bearer(session.access_token)
    )
    await watch.read()
    watch.cancel()

    await asyncio.wait_for(rig.ticking.cleaned.wait(), BOUND_SECONDS)
    assert rig.ticking.cleaned_up == 1
    watchers = [t for t in asyncio.all_tasks() if t.get_name().startswith("a67-stream-auth")]
    for task in watchers:  # cancelled with their stream
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, BOUND_SECONDS)
