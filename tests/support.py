"""Helpers shared by tests that talk to a real controller."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType

import grpc
from automator67.v1 import auth_pb2, auth_pb2_grpc, query_pb2, query_pb2_grpc

from controller.config import Settings
from controller.server import Controller, start_controller
from controller.store import Store
from controller.store.migrate import upgrade

PASSWORD = "c2FsdGVkLWNsaWVudC1oYXNoLW9mLWEtcGFzc3dvcmQ="


def controller_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a test controller: port 0, its own data dir, short drain."""
    values: dict[str, object] = {
        "listen_address": "127.0.0.1:0",
        "node_listen_address": "127.0.0.1:0",
        "xds_listen_address": "127.0.0.1:0",
        "data_dir": data_dir,
        "drain_grace_seconds": 2.0,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


@contextlib.asynccontextmanager
async def running_controller(settings: Settings) -> AsyncIterator[Controller]:
    controller = await start_controller(settings)
    try:
        yield controller
    finally:
        await controller.stop(grace=0.5)


@contextlib.asynccontextmanager
async def migrated_store(url: str) -> AsyncIterator[Store]:
    """The store at ``url`` (``store_url``'s fresh one), migrated to the head and open."""
    await asyncio.to_thread(upgrade, url)
    store = await Store.open(url)
    try:
        yield store
    finally:
        await store.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def register(
    stub: auth_pb2_grpc.AuthServiceStub, email: str = "ada@example.com"
) -> auth_pb2.RegisterResponse:
    return await stub.Register(auth_pb2.RegisterRequest(email=email, password_hash=PASSWORD))


def scale_out_script() -> ModuleType:
    """``scripts/scale_out.py`` (its ``Topology``: controllers, a user and agents as processes)."""
    spec = importlib.util.spec_from_file_location(
        "scale_out", Path(__file__).resolve().parents[1] / "scripts" / "scale_out.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_out"] = module
    spec.loader.exec_module(module)
    return module


async def hash_sharded_database(
    create_with: query_pb2_grpc.QueryServiceStub,
    apply_with: query_pb2_grpc.QueryServiceStub,
    md: tuple[tuple[str, str], ...],
    name: str,
    primaries: list[str],
    ddl: str,
) -> str:
    """A SQLite database hash-sharded on ``id``, shard i's primary on ``primaries[i]``, with
    ``ddl`` applied (the two calls may go to different controllers); its id."""
    database = (
        await create_with.CreateDatabase(
            query_pb2.CreateDatabaseRequest(
                name=name,
                dialect="sqlite",
                sharding=query_pb2.Sharding(
                    strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=len(primaries), sharding_key="id"
                ),
                shards=[
                    query_pb2.ShardPlacement(shard_index=i, primary_node_id=n)
                    for i, n in enumerate(primaries)
                ],
            ),
            metadata=md,
            timeout=30,
        )
    ).database
    await apply_with.ApplySchema(
        query_pb2.ApplySchemaRequest(db_id=database.id, ddl=ddl), metadata=md, timeout=30
    )
    return str(database.id)


async def until_answered(
    check: Callable[[], Awaitable[str | None]], within: float, what: str, pause: float = 0.3
) -> None:
    """Until ``check`` returns None (an RPC error counts as its answer); past ``within``
    seconds an ``AssertionError`` says ``what`` and the last thing still wrong."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    wrong: str | None = "not checked"
    while loop.time() < deadline:
        try:
            wrong = await check()
        except grpc.aio.AioRpcError as exc:
            wrong = f"{exc.code().name}: {exc.details()}"
        if wrong is None:
            return
        await asyncio.sleep(pause)
    raise AssertionError(f"{what} within {within:g} s: {wrong}")
