"""Replica catch-up from the shards' write log, through a fake agent boundary (the store's
log itself: tests/integration/test_shard_write_log.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any

import pytest
from automator67.v1 import node_pb2

from controller.federation.query import ShardError, ShardResult
from controller.federation.shards import (
    MemoryWriteLog,
    NodeShardExecutor,
    ReplicationState,
    ShardNodes,
    log_write,
)

CREATE = "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"


class Agents:
    """One SQLite database per node; a node that is down refuses; ``gate`` holds replays."""

    def __init__(self, names: Sequence[str]) -> None:
        self.databases = {n: sqlite3.connect(":memory:") for n in names}
        self.down: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.replaying = asyncio.Event()

    async def run(self, node: str, statements: Sequence[str], command_id: str = "") -> None:
        if node in self.down:
            raise ShardError(0, f"node {node}: not connected", retryable=True)
        if command_id.startswith("replay-") and self.gate is not None:
            self.replaying.set()
            await self.gate.wait()
        with self.databases[node] as connection:
            for sql in statements:
                connection.execute(sql)

    def rows(self, node: str) -> list[tuple[Any, ...]]:
        return self.databases[node].execute("SELECT k, v FROM t ORDER BY k").fetchall()


class Executor(NodeShardExecutor):
    def __init__(self, agents: Agents, state: ReplicationState, write_log: Any) -> None:
        self.persisted: list[tuple[dict[str, list[str]], dict[str, dict[str, int]]]] = []

        async def persist(changed: ReplicationState) -> None:
            self.persisted.append((changed.stale_map(), changed.applied_map()))

        super().__init__(
            database_id="db1",
            streams=None,  # type: ignore[arg-type]
            replication=state,
            is_write=True,
            on_stale_changed=persist,
            results=None,  # type: ignore[arg-type]
            write_log=write_log,
        )
        self.agents = agents
        self._open_transactions: dict[str, list[str]] = {}

    async def _send(
        self, node_id: str, shard: int, sql: str, deadline: float, command_id: str
    ) -> ShardResult:
        await self.agents.run(node_id, [sql], command_id)
        return ShardResult(columns=[], rows=[], rows_affected=1, node_id=node_id)

    async def _send_step(
        self, node_id: str, shard: int, transaction_id: str, action: int, sql: str, deadline: float
    ) -> None:
        actions = node_pb2.ShardTransactionAction
        if node_id in self.agents.down:
            raise ShardError(shard, f"node {node_id}: not connected", retryable=True)
        if action == actions.SHARD_TRANSACTION_ACTION_COMMIT:
            await self.agents.run(node_id, self._open_transactions.pop(transaction_id))
        elif action == actions.SHARD_TRANSACTION_ACTION_ROLLBACK:
            self._open_transactions.pop(transaction_id, None)
        else:
            self._open_transactions.setdefault(transaction_id, []).append(sql)


def _state(stale: dict[int, set[str]] | None = None, applied: Any = None) -> ReplicationState:
    return ReplicationState([ShardNodes(0, "p", ("r1", "r2"))], stale or {}, applied)


def _deadline() -> float:
    return asyncio.get_running_loop().time() + 30


async def test_a_missed_write_is_replayed_in_order_and_the_position_is_persisted() -> None:
    agents, write_log, state = Agents(["p", "r1", "r2"]), MemoryWriteLog(), _state()
    executor = Executor(agents, state, write_log)
    await executor.run(0, CREATE, _deadline())
    agents.down.add("r1")
    await executor.run(0, "INSERT INTO t VALUES (1, 'a')", _deadline())
    await executor.run(0, "UPDATE t SET v = 'b' WHERE k = 1", _deadline())
    assert state.stale == {0: {"r1"}}
    assert executor.persisted == [({"0": ["r1"]}, {"0": {"r1": 1}})]  # it has write 1 (the table)
    assert not await executor.catch_up(0, "r1", _deadline())  # still down: stays stale
    agents.down.clear()
    assert await executor.catch_up(0, "r1", _deadline())
    assert agents.rows("r1") == agents.rows("p") == [(1, "b")]
    assert executor.persisted[-1] == ({}, {})


async def test_replication_json_without_positions_cannot_catch_up() -> None:
    """Rows written before positions were kept: a stale replica stays stale, as before."""
    agents, write_log = Agents(["p", "r1", "r2"]), MemoryWriteLog()
    await write_log.append("db1", 0, [CREATE], False)
    state = ReplicationState.from_json(
        {
            "shards": [{"shard_index": 0, "primary_node_id": "p", "replica_node_ids": ["r1", "r2"]}],
            "stale": {"0": ["r1"]},
        }
    )
    executor = Executor(agents, state, write_log)
    assert not await executor.catch_up(0, "r1", _deadline())
    assert state.stale == {0: {"r1"}}
    assert executor.persisted == []


async def test_replication_json_round_trips_positions() -> None:
    state = ReplicationState.from_json(
        {
            "shards": [{"shard_index": 0, "primary_node_id": "p", "replica_node_ids": ["r1", "r2"]}],
            "stale": {"0": ["r1"]},
            "applied": {"0": {"r1": 7, "r2": 9}},  # r2 is in step: its position means nothing
        }
    )
    assert state.position(0, "r1") == 7
    assert state.position(0, "r2") is None
    assert state.applied_map() == {"0": {"r1": 7}}
    state.pending.add((0, "r1"))  # before a commit is in the log: not kept in the store
    assert state.applied_map() == {}


async def test_a_replica_whose_missed_writes_were_trimmed_stays_stale() -> None:
    agents, write_log, state = Agents(["p", "r1", "r2"]), MemoryWriteLog(size=2), _state()
    executor = Executor(agents, state, write_log)
    await executor.run(0, CREATE, _deadline())
    agents.down.add("r1")
    for k in range(1, 4):
        await executor.run(0, f"INSERT INTO t VALUES ({k}, 'x')", _deadline())
    agents.down.clear()
    assert [w.sequence for w in await write_log.since("db1", 0, 0)] == [3, 4]
    assert not await executor.catch_up(0, "r1", _deadline())  # write 2 is gone
    assert state.stale == {0: {"r1"}}
    assert agents.rows("r1") == []


async def test_a_committed_transaction_is_replayed_as_one() -> None:
    agents, write_log, state = Agents(["p", "r1", "r2"]), MemoryWriteLog(), _state()
    executor = Executor(agents, state, write_log)
    await executor.run(0, CREATE, _deadline())
    statements = ["INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'b')"]
    await agents.run("p", statements)
    for replica in ("r1", "r2"):
        state.mark_stale(0, replica, await write_log.newest("db1", 0))
    assert await log_write(write_log, state, "db1", 0, statements, True) == 2
    assert await executor.catch_up(0, "r1", _deadline())
    assert await executor.catch_up(0, "r2", _deadline())
    assert agents.rows("r1") == agents.rows("r2") == agents.rows("p") == [(1, "a"), (2, "b")]


class BrokenLog(MemoryWriteLog):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    async def append(self, database_id: str, shard: int, statements: Sequence[str], transaction: bool) -> int:
        if self.broken:
            raise ConnectionError("the store is down")
        return await super().append(database_id, shard, statements, transaction)


async def test_a_write_the_log_cannot_record_leaves_stale_replicas_without_a_position() -> None:
    agents, write_log, state = Agents(["p", "r1", "r2"]), BrokenLog(), _state()
    executor = Executor(agents, state, write_log)
    await executor.run(0, CREATE, _deadline())
    agents.down.add("r1")
    await executor.run(0, "INSERT INTO t VALUES (1, 'a')", _deadline())
    assert state.position(0, "r1") == 1
    write_log.broken = True
    agents.down.add("r2")
    # the primary took it: the write succeeds, but no replica can replay past it
    result = await executor.run(0, "INSERT INTO t VALUES (2, 'b')", _deadline())
    assert result.node_id == "p"
    assert state.stale == {0: {"r1", "r2"}}
    assert (state.position(0, "r1"), state.position(0, "r2")) == (None, None)
    assert executor.persisted[-1] == ({"0": ["r1", "r2"]}, {})
    write_log.broken = False
    agents.down.clear()
    assert not await executor.catch_up(0, "r1", _deadline())
    assert not await executor.catch_up(0, "r2", _deadline())


async def test_a_write_during_a_catch_up_is_not_lost() -> None:
    """A catch-up holds the database's write lock: a write arriving meanwhile goes to the
    replica after it rejoins, rather than by it while it is still stale."""
    agents, write_log, state = Agents(["p", "r1", "r2"]), MemoryWriteLog(), _state()
    executor = Executor(agents, state, write_log)
    await executor.run(0, CREATE, _deadline())
    agents.down.add("r1")
    await executor.run(0, "INSERT INTO t VALUES (1, 'a')", _deadline())
    agents.down.clear()
    agents.gate = asyncio.Event()
    catching_up = asyncio.ensure_future(executor.catch_up(0, "r1", _deadline()))
    await agents.replaying.wait()  # the replay has started and waits at the gate
    writing = asyncio.ensure_future(executor.run(0, "INSERT INTO t VALUES (2, 'b')", _deadline()))
    await asyncio.sleep(0)
    assert not writing.done()
    agents.gate.set()
    assert await catching_up
    await writing
    assert state.stale.get(0, set()) == set()
    assert agents.rows("r1") == agents.rows("p") == [(1, "a"), (2, "b")]


@pytest.mark.parametrize("size", [1, 3])
async def test_memory_log_keeps_its_newest_writes(size: int) -> None:
    write_log = MemoryWriteLog(size=size)
    for k in range(1, 6):
        assert await write_log.append("db1", 0, [str(k)], False) == k
    assert [w.sequence for w in await write_log.since("db1", 0, 0)] == list(range(6 - size, 6))
    await write_log.drop("db1")
    assert await write_log.newest("db1", 0) == 0
