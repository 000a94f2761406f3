"""Streaming merges in worker processes (controller/federation/query/workers.py).

Real worker processes, real plans; the shards are in-memory sources of encoded batches
(what ``PushShardResult`` delivers). Every answer is compared with the same merge in a
thread (the path without workers).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from automator67.v1 import query_pb2

from controller.errors import FailedPrecondition
from controller.federation.query import ShardError
from controller.federation.query.execute import StreamPart, execute_stream
from controller.federation.query.layout import ShardLayout
from controller.federation.query.plan import Plan, plan_sql
from controller.federation.query.workers import MergeWorkers
from controller.wire import decode_rows, encode_rows, encode_stream_batch

LAYOUT = ShardLayout("hash", 2, "id")
TABLES = {"t": ["id", "k", "note"]}


class Source:
    """One shard's rows, in encoded batches of ``size`` rows; ``fail_after`` batches, a failure."""

    encoded_batches = True

    def __init__(
        self,
        answer: tuple[list[tuple[str, str]], list[tuple[Any, ...]]],
        size: int = 500,
        fail_after: int | None = None,
    ) -> None:
        self.columns, rows = answer
        self._batches = [encode_rows(rows[i : i + size]) for i in range(0, len(rows), size)]
        self._fail_after = fail_after
        self.sent = 0
        self.closed = False

    async def next_batch(self) -> bytes | None:
        if self._fail_after is not None and self.sent == self._fail_after:
            raise ShardError(1, "constraint failed", retryable=False, sqlstate="23000")
        if self.sent == len(self._batches):
            return None
        self.sent += 1
        return self._batches[self.sent - 1]

    @staticmethod
    def decode(batch: bytes) -> Sequence[tuple[Any, ...]]:  # the merge in a thread
        return decode_rows(batch)

    async def close(self) -> None:
        self.closed = True


class ThreadSource(Source):
    """The same rows for the merge in a thread."""

    encoded_batches = False


def shard_rows(
    sql: str, shard: int, count: int = 6000
) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    """What shard ``shard`` (an SQLite database) answers to its part of ``sql``."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, note TEXT)")
    conn.executemany(
        "INSERT INTO t VALUES (?, ?, ?)",
        [(i, i % 37, f"n{i:05d}" + "\u00e9" * (i % 3)) for i in range(count) if LAYOUT.shard_for(i) == shard],
    )
    cursor = conn.execute(plan(sql).shard_sql[shard])
    rows = cursor.fetchall()
    return [(d[0], "") for d in cursor.description], rows


def plan(sql: str) -> Plan:
    return plan_sql(sql, "sqlite", LAYOUT, TABLES)


class Executor:
    def __init__(self, sources: dict[int, Source]) -> None:
        self.sources = sources

    async def open(self, shard: int, sql: str, deadline: float) -> Source:
        return self.sources[shard]


async def collect(parts: AsyncIterator[StreamPart[Any]]) -> tuple[list[str], list[list[Any]]]:
    columns: list[str] = []
    rows: list[list[Any]] = []
    async for part in parts:
        if part.columns is not None:
            columns = [name for name, _ in part.columns]
        elif part.batch is not None:
            rows.extend([_plain(v) for v in r.values] for r in part.batch.rows)
    return columns, rows


def _plain(value: Any) -> Any:
    return getattr(value, value.WhichOneof("kind"))


def stream(
    sql: str, sources: dict[int, Source], workers: MergeWorkers | None
) -> AsyncIterator[StreamPart[Any]]:
    return execute_stream(
        plan(sql),
        Executor(sources),
        encode=encode_stream_batch,
        deadline_seconds=60,
        workers=workers,
        parse=query_pb2.StreamQueryResponse.FromString,
    )


@pytest.fixture
async def workers() -> AsyncIterator[MergeWorkers]:
    pool = MergeWorkers(1)
    yield pool
    pool.close()


SQL = [
    "SELECT id, k, note FROM t ORDER BY note DESC, id",
    "SELECT k, COUNT(*), SUM(id), MIN(note) FROM t GROUP BY k ORDER BY k",
    "SELECT id, note FROM t WHERE k < 10",
]


@pytest.mark.parametrize("sql", SQL)
async def test_a_worker_merges_exactly_what_the_thread_merges(workers: MergeWorkers, sql: str) -> None:
    expected = await collect(stream(sql, {s: ThreadSource(shard_rows(sql, s)) for s in (0, 1)}, None))
    sources = {s: Source(shard_rows(sql, s)) for s in (0, 1)}
    got = await collect(stream(sql, sources, workers))
    assert got[0] == expected[0]
    if "ORDER BY" in sql:
        assert got[1] == expected[1]
    else:  # arrival order: any order is the answer
        assert sorted(got[1]) == sorted(expected[1])
    assert len(got[1]) > 0
    assert workers.idle, "the merge did not run in a worker"
    assert all(source.closed for source in sources.values())


async def test_an_abandoned_stream_leaves_the_worker_ready(workers: MergeWorkers) -> None:
    sql = SQL[0]
    sources = {s: Source(shard_rows(sql, s, 40_000), size=200) for s in (0, 1)}
    parts = stream(sql, sources, workers)
    assert (await anext(parts)).columns is not None
    assert (await anext(parts)).batch is not None
    await parts.aclose()  # the client went away mid-stream
    assert all(source.closed for source in sources.values())
    assert sum(s.sent for s in sources.values()) < 400  # it stopped reading the shards
    for _ in range(400):  # the worker finishes the aborted job in the background
        if workers.idle:
            break
        await asyncio.sleep(0.01)
    (pid,) = workers.idle
    expected = await collect(stream(sql, {s: ThreadSource(shard_rows(sql, s)) for s in (0, 1)}, None))
    assert await collect(stream(sql, {s: Source(shard_rows(sql, s)) for s in (0, 1)}, workers)) == expected
    assert workers.idle == [pid]  # the same process merged again


async def test_a_shard_failing_mid_stream_fails_the_stream_and_frees_the_worker(
    workers: MergeWorkers,
) -> None:
    sources = {0: Source(shard_rows(SQL[0], 0)), 1: Source(shard_rows(SQL[0], 1), size=100, fail_after=3)}
    with pytest.raises(FailedPrecondition, match="constraint failed"):
        await collect(stream(SQL[0], sources, workers))
    for _ in range(400):
        if workers.idle:
            break
        await asyncio.sleep(0.01)
    (pid,) = workers.idle
    got = await collect(stream(SQL[1], {s: Source(shard_rows(SQL[1], s)) for s in (0, 1)}, workers))
    assert len(got[1]) == 37
    assert workers.idle == [pid]


async def test_streams_beyond_the_pool_merge_in_a_thread(workers: MergeWorkers) -> None:
    sql = SQL[0]
    first = stream(sql, {s: Source(shard_rows(sql, s)) for s in (0, 1)}, workers)
    assert (await anext(first)).columns is not None  # holds the only worker
    second = await collect(stream(sql, {s: Source(shard_rows(sql, s)) for s in (0, 1)}, workers))
    assert len(second[1]) == 6000
    assert len(workers.pids) == 1  # no second process: that one merged in a thread
    rest = await collect(first)
    assert len(rest[1]) == 6000
