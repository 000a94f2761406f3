"""A statement's ownership check (the database row) is remembered briefly, and a plan-cache
hit is taken on the event loop."""

from __future__ import annotations

import types
from typing import Any

import pytest

from controller.cache.memory import MemoryCache
from controller.errors import PermissionDenied
from controller.federation.service import OWNED_ROW_SECONDS, DatabaseService


class Rows:
    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []

    async def get_for_user(self, user_id: str, database_id: str) -> Any:
        self.reads.append((user_id, database_id))
        if user_id != "owner":
            return None
        return types.SimpleNamespace(
            id=database_id,
            schema_info={
                "version": 1,
                "tables": [{"name": "t", "columns": [{"name": "k", "type": "INTEGER"}]}],
            },
            sharding={"strategy": "SHARDING_STRATEGY_HASH", "shardCount": 2, "shardingKey": "k"},
            replication={"shards": []},
            connection={"dialect": "sqlite"},
        )


def _service(rows: Rows) -> DatabaseService:
    return DatabaseService(
        databases=rows,  # type: ignore[arg-type]
        nodes=None,  # type: ignore[arg-type]
        streams=None,  # type: ignore[arg-type]
        vault=None,  # type: ignore[arg-type]
        cache=MemoryCache(),
    )


async def test_the_row_is_read_once_per_period_and_per_owner() -> None:
    rows = Rows()
    service = _service(rows)
    for _ in range(50):
        loaded = await service._load("owner", "db1")
    assert loaded.row.id == "db1"
    assert rows.reads == [("owner", "db1")]
    key = ("owner", "db1")
    until, row = service._owned_rows[key]
    service._owned_rows[key] = (until - OWNED_ROW_SECONDS - 1, row)  # the period is over
    await service._load("owner", "db1")
    assert rows.reads == [("owner", "db1")] * 2


async def test_another_user_is_refused_every_time() -> None:
    rows = Rows()
    service = _service(rows)
    for _ in range(3):
        with pytest.raises(PermissionDenied):  # not remembered
            await service._load("stranger", "db1")
    assert len(rows.reads) == 3


async def test_a_plan_cache_hit_is_the_same_plan() -> None:
    service = _service(Rows())
    loaded = await service._load("owner", "db1")
    first = await service._plan(loaded, "SELECT k FROM t WHERE k = 1")
    second = await service._plan(loaded, "SELECT k FROM t WHERE k = 1")
    assert second is first
    assert (service._plans.hits, service._plans.misses) == (1, 1)
