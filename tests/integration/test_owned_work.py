"""Work another live controller owns survives this controller's cleanup; work of a
controller that is gone (or of this one before a restart, or from before migration
0013) is taken over. Federated transactions (presumed abort) and storage uploads
(pending chunks), on both stores.

The controllers' rows are written as another host's controller would leave them (seen at
``T0``); "live" and "gone" come from the injected wall clock (``T0``: fresh; an hour
later: stale), or from the row being deleted — never from the real time.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from automator67.v1 import node_pb2
from sqlalchemy import delete, event, select

from controller.cache.memory import MemoryCache
from controller.errors import Aborted
from controller.federation.results import ShardResults
from controller.federation.storage import StorageLimits, StorageService
from controller.federation.storage.service import _INSERT_CHUNK, _payload, _Upload
from controller.federation.transactions import TransactionLog, TransactionManager
from controller.nodes import HealthConfig
from controller.nodes.fleet import Fleet
from controller.nodes.repository import NodeRepository
from controller.nodes.sessions import StreamRegistry
from controller.store import Store
from controller.store.models import ControllerProcess, DatabaseTransaction, StorageChunk, User
from controller.vault import Keyring, Vault
from tests.support import migrated_store

T0 = datetime(2027, 3, 3, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)  # far past the stale time (15 s)
ME, OTHER = "ctl-me", "ctl-other"
ACTIONS = node_pb2.ShardTransactionAction


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with migrated_store(store_url) as opened:
        async with opened.session() as session:
            session.add(User(id="u", email="owned@example.com", password_hash="x"))
        yield opened


async def add_controller(store: Store, controller_id: str, seen_at: datetime = T0) -> None:
    """The row of a controller on another host, last seen at ``seen_at``."""
    async with store.session() as session:
        session.add(
            ControllerProcess(
                id=controller_id,
                instance=uuid.uuid4().hex,
                host="elsewhere.example",
                pid=4242,
                started_at=seen_at,
                seen_at=seen_at,
            )
        )


async def remove_controller(store: Store, controller_id: str) -> None:
    async with store.session() as session:
        await session.execute(delete(ControllerProcess).where(ControllerProcess.id == controller_id))


@contextmanager
def controllers_reads(store: Store) -> Iterator[list[str]]:
    """The statements run on the store that read the ``controllers`` table."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "from controllers" in " ".join(statement.lower().split()):
            seen.append(statement)

    engine = store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


# -- transactions ---------------------------------------------------------------------------


class AckingStreams(StreamRegistry):
    """Every node acknowledges every command at once; the actions sent are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, int]] = []

    async def send_command(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> node_pb2.CommandResult:
        self.sent.append((node_id, command.shard_transaction.action))
        return node_pb2.CommandResult(command_id=command.command_id, ok=True, payload=b"{}")


def manager(
    store: Store,
    controller_id: str | None,
    wall: Callable[[], datetime],
    streams: StreamRegistry | None = None,
) -> TransactionManager:
    return TransactionManager(
        log_store=TransactionLog(store, controller_id, wall=wall),
        streams=streams if streams is not None else AckingStreams(),
        results=ShardResults(),
    )


async def add_transaction(store: Store, owner: str | None, state: str = "active") -> str:
    txid = str(uuid.uuid4())
    async with store.session() as session:
        session.add(
            DatabaseTransaction(
                id=txid,
                user_id="u",
                database_id="d",
                distributed=True,
                state=state,
                participants=[{"shard": 0, "node": "n0"}, {"shard": 1, "node": "n1"}],
                created_at=T0,
                updated_at=T0,
                controller_id=owner,
            )
        )
    return txid


async def transaction(store: Store, txid: str) -> DatabaseTransaction:
    row = await TransactionLog(store).get(txid)
    assert row is not None
    return row


@pytest.mark.parametrize("goes", ["stale", "deleted"])
async def test_a_live_controllers_transactions_are_left_to_it_until_it_is_gone(
    store: Store, goes: str
) -> None:
    await add_controller(store, ME)
    await add_controller(store, OTHER)
    active = await add_transaction(store, OTHER, "active")
    preparing = await add_transaction(store, OTHER, "preparing")
    wall = Wall()
    streams = AckingStreams()
    recovery = manager(store, ME, wall, streams)

    assert await recovery.recover() == 0
    for txid, state in ((active, "active"), (preparing, "preparing")):
        row = await transaction(store, txid)
        assert (row.state, row.resolved_at, row.controller_id) == (state, None, OTHER)
    assert streams.sent == []  # nothing was rolled back under it

    if goes == "stale":
        wall.now = LATER  # not seen for an hour: killed on its host
    else:
        await remove_controller(store, OTHER)
    assert await recovery.recover() == 2
    for txid in (active, preparing):
        row = await transaction(store, txid)
        assert row.state == "aborted"
        assert row.resolved_at is not None
    assert (
        sorted(streams.sent)
        == [("n0", ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK)] * 2
        + [("n1", ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK)] * 2
    )


async def test_own_and_legacy_transactions_are_presumed_aborted_with_one_liveness_read(store: Store) -> None:
    await add_controller(store, ME)  # this controller, restarted: its row is fresh
    await add_controller(store, OTHER)
    own = await add_transaction(store, ME, "preparing")  # from before the restart
    legacy = await add_transaction(store, None, "active")  # from before migration 0013
    recovery = manager(store, ME, Wall())

    with controllers_reads(store) as reads:
        assert await recovery.recover() == 2  # only this controller's and no controller's rows
    assert reads == []  # no row of another controller: the controllers were not read
    assert (await transaction(store, own)).state == "aborted"
    assert (await transaction(store, legacy)).state == "aborted"

    others = [await add_transaction(store, OTHER, "active") for _ in range(3)]
    await add_transaction(store, "ctl-third", "active")  # no controllers row: gone
    with controllers_reads(store) as reads:
        assert await recovery.recover() == 1
    assert len(reads) == 1  # one read for every row of other controllers
    for txid in others:
        assert (await transaction(store, txid)).state == "active"


async def test_a_decided_transaction_of_a_live_controller_is_finished_by_recovery(store: Store) -> None:
    """Resending the outcome of a decided transaction is idempotent on the agents."""
    await add_controller(store, OTHER)
    committed = await add_transaction(store, OTHER, "committed")
    streams = AckingStreams()
    with controllers_reads(store) as reads:
        assert await manager(store, ME, Wall(), streams).recover() == 1
    assert reads == []
    row = await transaction(store, committed)
    assert (row.state, row.resolved_at is not None) == ("committed", True)
    assert {action for _, action in streams.sent} == {ACTIONS.SHARD_TRANSACTION_ACTION_COMMIT}


async def test_the_transactions_of_this_controller_carry_its_id(store: Store) -> None:
    for controller_id in (ME, None):
        running = manager(store, controller_id, Wall())
        txn = await running.begin("u", "d", distributed=True, idle_timeout_ms=0, timeout_ms=0)
        assert (await transaction(store, txn.id)).controller_id == controller_id


@pytest.mark.parametrize("taken_at", ["before the commit", "prepared:1"])
async def test_a_controller_taken_for_gone_does_not_commit_what_recovery_aborted(
    store: Store, taken_at: str
) -> None:
    """A controller paused past the stale time: another controller's recovery presumes its
    transaction aborted. When it resumes, its commit must roll back, never commit."""
    await add_controller(store, OTHER)
    streams = AckingStreams()
    paused = manager(store, OTHER, Wall(), streams)
    txn = await paused.begin("u", "d", distributed=True, idle_timeout_ms=0, timeout_ms=0)
    await paused.enlist(txn, {0: "n0", 1: "n1"})
    txn.begun.update({0, 1})
    later = Wall()
    later.now = LATER
    other = manager(store, ME, later)  # sees the paused controller's row stale

    async def recovery_runs(step: str) -> None:
        if step == taken_at:
            assert await other.recover() == 1

    if taken_at == "before the commit":
        await recovery_runs(taken_at)
    else:
        paused.step_hook = recovery_runs
    with pytest.raises(Aborted) as aborted:
        await paused.commit(txn)
    assert aborted.value.reason == "TRANSACTION_ABORTED"
    assert txn.state == "aborted"
    row = await transaction(store, txn.id)
    assert row.state == "aborted"
    assert row.resolved_at is not None
    actions = [action for _, action in streams.sent]
    assert ACTIONS.SHARD_TRANSACTION_ACTION_COMMIT not in actions
    assert actions[-2:] == [ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK] * 2


# -- storage uploads --------------------------------------------------------------------------


def storage(store: Store, wall: Wall, controller_id: str | None = ME) -> StorageService:
    fleet = Fleet(nodes=NodeRepository(store), cache=MemoryCache(), health_config=HealthConfig.fast(1.0))
    return StorageService(
        store=store,
        fleet=fleet,
        vault=Vault(Keyring.generate("k1")),
        limits=StorageLimits(gc_grace_seconds=30 * 86400.0, gc_interval_seconds=3600.0),
        clock=wall,
        controller_id=controller_id,
    )


async def add_chunk(store: Store, uploader: str | None, version_id: str | None = None) -> str:
    chunk_id = str(uuid.uuid4())
    async with store.session() as session:
        session.add(
            StorageChunk(
                id=chunk_id,
                user_id="u",
                version_id=version_id or str(uuid.uuid4()),
                index=0,
                size=1,
                stored_size=29,
                checksum="0" * 64,
                replicas=3,
                state="pending",
                created_at=T0,
                uploader=uploader,
            )
        )
    return chunk_id


async def states(store: Store) -> dict[str, str]:
    async with store.session() as session:
        return {
            chunk_id: state
            for chunk_id, state in await session.execute(select(StorageChunk.id, StorageChunk.state))
        }


async def test_a_live_controllers_uploads_survive_start_and_gc_until_it_is_gone(store: Store) -> None:
    await add_controller(store, ME)
    await add_controller(store, OTHER)
    others = await add_chunk(store, OTHER)
    gone = await add_chunk(store, "ctl-gone")  # no controllers row
    own = await add_chunk(store, ME)  # this controller's upload before its restart
    legacy = await add_chunk(store, None)  # from before migration 0013
    wall = Wall()
    service = storage(store, wall)

    await service.start()
    await service.stop()
    assert await states(store) == {others: "pending", gone: "pending", own: "garbage", legacy: "garbage"}

    running = str(uuid.uuid4())  # an upload this process runs
    service._active_versions.add(running)
    mine_now = await add_chunk(store, ME, running)
    with controllers_reads(store) as reads:
        await service.collect_garbage()
    assert len(reads) == 1
    assert await states(store) == {
        others: "pending",  # its controller is live
        gone: "garbage",
        own: "garbage",
        legacy: "garbage",
        mine_now: "pending",
    }

    wall.now = LATER  # the other controller was not seen for an hour
    with controllers_reads(store) as reads:
        await service.collect_garbage()
    assert len(reads) == 1
    assert (await states(store))[others] == "garbage"
    assert (await states(store))[mine_now] == "pending"

    # nothing of another controller pending: the controllers are not read
    with controllers_reads(store) as reads:
        await service.collect_garbage()
    assert reads == []


async def test_a_deleted_controllers_uploads_are_collected(store: Store) -> None:
    await add_controller(store, OTHER)
    others = await add_chunk(store, OTHER)
    service = storage(store, Wall())
    await service.collect_garbage()
    assert (await states(store))[others] == "pending"
    await remove_controller(store, OTHER)
    await service.collect_garbage()
    assert (await states(store))[others] == "garbage"


async def test_without_a_controller_id_every_upload_not_running_here_is_abandoned(store: Store) -> None:
    await add_controller(store, OTHER)
    others = await add_chunk(store, OTHER)
    service = storage(store, Wall(), controller_id=None)
    await service.start()
    await service.stop()
    assert (await states(store))[others] == "garbage"


async def test_an_uploads_chunks_name_their_controller(store: Store) -> None:
    service = storage(store, Wall())
    inserted: list[dict[str, Any]] = []

    async def replicate(*_: Any, chunk: dict[str, Any] | None = None, **__: Any) -> list[str]:
        assert chunk is not None
        inserted.append(chunk)
        async with store.session() as session:  # as the real one writes it
            await session.execute(_INSERT_CHUNK, [chunk])
        return []

    service._replicate = replicate  # type: ignore[method-assign]
    upload = _Upload(user_id="u", version_id=str(uuid.uuid4()), key=b"k" * 32, replicas=3, nodes=[])
    await service._put_chunk(upload, 0, str(uuid.uuid4()), 1, _payload(b"x" * 29), "0" * 64, {})
    async with store.session() as session:
        uploaders = (await session.execute(select(StorageChunk.uploader, StorageChunk.state))).all()
    assert [tuple(r) for r in uploaders] == [(ME, "pending")]
    # and another controller's start leaves it alone, while it is live
    await add_controller(store, ME)
    elsewhere = storage(store, Wall(), controller_id=OTHER)
    await elsewhere.start()
    await elsewhere.stop()
    await elsewhere.collect_garbage()
    assert list((await states(store)).values()) == ["pending"]
