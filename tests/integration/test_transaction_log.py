"""The decision log of transactions is pruned: resolved rows past the retention go,
unresolved ones never do (recovery needs them). Both stores."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from controller.federation.results import ShardResults
from controller.federation.transactions import (
    DECISION_LOG_RETENTION,
    PRUNE_INTERVAL_SECONDS,
    TransactionLog,
    TransactionManager,
)
from controller.nodes.sessions import StreamRegistry
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.models import DatabaseTransaction, User, utcnow


async def test_resolved_rows_past_retention_are_pruned_unresolved_ones_stay(store_url: str) -> None:
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    try:
        now = utcnow()
        old = now - DECISION_LOG_RETENTION - timedelta(hours=1)
        recent = now - DECISION_LOG_RETENTION + timedelta(hours=1)
        rows = {
            "old-resolved": (old, old),
            "recent-resolved": (old, recent),
            "old-unresolved": (old, None),
        }
        ids = {name: str(uuid.uuid4()) for name in rows}
        async with store.session() as session:
            session.add(User(id="u", email="log@example.com", password_hash="x"))
        async with store.session() as session:
            for name, (created, resolved) in rows.items():
                session.add(
                    DatabaseTransaction(
                        id=ids[name],
                        user_id="u",
                        database_id="d",
                        distributed=True,
                        state="aborted",
                        participants=[],
                        created_at=created,
                        updated_at=created,
                        resolved_at=resolved,
                    )
                )
        tick = [0.0]
        manager = TransactionManager(
            log_store=TransactionLog(store),
            streams=StreamRegistry(),
            clock=lambda: tick[0],
            results=ShardResults(),
        )
        assert await manager.prune(now) == 1
        log = TransactionLog(store)
        assert await log.get(ids["old-resolved"]) is None
        assert await log.get(ids["recent-resolved"]) is not None
        assert await log.get(ids["old-unresolved"]) is not None
        # at most once per interval, on the injected clock
        later = now + timedelta(hours=2)
        assert await manager.prune(later) == 0
        tick[0] += PRUNE_INTERVAL_SECONDS
        assert await manager.prune(later) == 1
        assert await log.get(ids["recent-resolved"]) is None
        assert await log.get(ids["old-unresolved"]) is not None
    finally:
        await store.close()


async def test_recovery_leaves_a_transaction_decided_after_it_was_read_as_decided(store_url: str) -> None:
    """The race the fresh-clone CI found: recovery read a transaction still active, its
    controller then committed it (and forgot it), and recovery marked it aborted anyway."""
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    try:
        now = utcnow()
        txid = str(uuid.uuid4())
        async with store.session() as session:
            session.add(User(id="u", email="race@example.com", password_hash="x"))
        async with store.session() as session:
            session.add(
                DatabaseTransaction(
                    id=txid,
                    user_id="u",
                    database_id="d",
                    distributed=False,
                    state="active",
                    participants=[],
                    created_at=now,
                    updated_at=now,
                )
            )
        log = TransactionLog(store)
        stale = await log.unresolved()  # what recovery read: the transaction still active
        assert [row.state for row in stale] == ["active"]
        await log.set(txid, state="committed", decided_at=now, resolved_at=now)  # then it committed

        async def read_before_the_commit() -> list[DatabaseTransaction]:
            return stale

        log.unresolved = read_before_the_commit  # type: ignore[method-assign]
        manager = TransactionManager(log_store=log, streams=StreamRegistry(), results=ShardResults())
        assert await manager.recover() == 0
        row = await TransactionLog(store).get(txid)
        assert row is not None
        assert row.state == "committed"
        # a transaction really left active is still presumed aborted
        assert await log.presume_abort(txid, "committed") is False  # resolved: never touched
    finally:
        await store.close()
