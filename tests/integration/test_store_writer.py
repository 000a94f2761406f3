"""The embedded store's single writer (controller/store/writer.py), on a real SQLite file.

Every test here turns SQLite's own busy timeout down to 0 ms, so a write that had
to wait for SQLite's lock would fail at once with ``database is locked``: writers
that succeed waited at the write gate, on the event loop, and nowhere else. No
test sleeps; each waits for a state of the gate it can observe.
"""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from controller.store import writer
from controller.store.db import RollbackFirstConnection, Store, create_engine_for, write_gate_of
from controller.store.writer import WriteGate

GUARD_SECONDS = 30.0
"""A guard against a hung test (a broken gate deadlocks), not a measure of anything."""


def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=0")
    finally:
        cursor.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite:///{tmp_path / 'writer.db'}")
    event.listen(opened.engine.sync_engine, "connect", _no_busy_wait)
    await opened.engine.dispose()  # connections made from now on never wait on SQLite's lock
    async with opened.session() as session:
        await session.execute(text("CREATE TABLE log (seq INTEGER PRIMARY KEY, who TEXT NOT NULL)"))
    try:
        yield opened
    finally:
        await opened.close()


def gate_of(store: Store) -> WriteGate:
    gate = store.write_gate
    assert gate is not None
    return gate


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds (the gate's counters have no event to wait on)."""
    async with asyncio.timeout(GUARD_SECONDS):
        while not condition():  # noqa: ASYNC110 - one loop iteration per check, no fixed delay
            await asyncio.sleep(0)


async def rows(store: Store) -> list[str]:
    async with store.session() as session:
        return list((await session.execute(text("SELECT who FROM log ORDER BY seq"))).scalars())


async def write(store: Store, who: str, *, hold: asyncio.Event | None = None, fail: bool = False) -> None:
    """One transaction: two rows, optionally waiting on ``hold`` between them, optionally failing."""
    async with store.session() as session:
        await session.execute(text("INSERT INTO log (who) VALUES (:who)"), {"who": f"{who}-1"})
        if hold is not None:
            await hold.wait()
        await session.execute(text("INSERT INTO log (who) VALUES (:who)"), {"who": f"{who}-2"})
        if fail:
            raise RuntimeError(f"{who} fails")


def test_doctests_of_the_writer_module() -> None:
    assert doctest.testmod(writer).failed == 0


def test_only_an_sqlite_file_has_a_write_gate() -> None:
    # creating an engine connects to nothing
    assert write_gate_of(create_engine_for("postgresql+psycopg://someone@127.0.0.1:1/nowhere")) is None
    assert write_gate_of(create_engine_for("sqlite://")) is None


async def test_concurrent_writers_queue_at_the_gate_and_never_hit_sqlites_busy_timeout(store: Store) -> None:
    gate = gate_of(store)
    hold = asyncio.Event()
    first = asyncio.create_task(write(store, "w0", hold=hold))
    await until(lambda: gate.held)
    others = [asyncio.create_task(write(store, f"w{i}")) for i in range(1, 30)]
    await until(lambda: gate.waiting == 29)  # all of them inside the store, one transaction open
    hold.set()
    await asyncio.gather(first, *others)
    written = await rows(store)
    assert len(written) == 60
    # each transaction's two rows are adjacent: transactions never interleaved
    assert all(written[i][:-2] == written[i + 1][:-2] for i in range(0, 60, 2))
    assert not gate.held
    assert gate.waiting == 0


async def test_writers_are_admitted_in_the_order_they_arrived(store: Store) -> None:
    gate = gate_of(store)
    hold = asyncio.Event()
    first = asyncio.create_task(write(store, "a", hold=hold))
    await until(lambda: gate.held)
    queued = []
    for n, who in enumerate(["b", "c", "d", "e"], start=1):
        queued.append(asyncio.create_task(write(store, who)))
        await until(lambda n=n: gate.waiting == n)  # type: ignore[misc]
    hold.set()
    await asyncio.gather(first, *queued)
    assert await rows(store) == ["a-1", "a-2", "b-1", "b-2", "c-1", "c-2", "d-1", "d-2", "e-1", "e-2"]


async def test_a_failed_transaction_loses_only_its_own_writes(store: Store) -> None:
    gate = gate_of(store)
    hold = asyncio.Event()
    first = asyncio.create_task(write(store, "ok1", hold=hold))
    await until(lambda: gate.held)
    failing = asyncio.create_task(write(store, "bad", fail=True))
    await until(lambda: gate.waiting == 1)
    last = asyncio.create_task(write(store, "ok2"))
    await until(lambda: gate.waiting == 2)
    hold.set()
    results = await asyncio.gather(first, failing, last, return_exceptions=True)
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], RuntimeError)
    assert await rows(store) == ["ok1-1", "ok1-2", "ok2-1", "ok2-2"]
    assert not gate.held
    await write(store, "after")  # the gate was given back after the rollback
    assert (await rows(store))[-2:] == ["after-1", "after-2"]


async def test_a_writer_cancelled_while_queued_takes_nothing_from_the_others(store: Store) -> None:
    gate = gate_of(store)
    hold = asyncio.Event()
    first = asyncio.create_task(write(store, "a", hold=hold))
    await until(lambda: gate.held)
    cancelled = asyncio.create_task(write(store, "x"))
    await until(lambda: gate.waiting == 1)
    after = asyncio.create_task(write(store, "b"))
    await until(lambda: gate.waiting == 2)
    cancelled.cancel()
    await until(lambda: gate.waiting == 1)
    hold.set()
    await asyncio.gather(first, after)
    assert cancelled.cancelled()
    assert await rows(store) == ["a-1", "a-2", "b-1", "b-2"]
    assert not gate.held


async def test_a_writer_cancelled_inside_its_transaction_gives_the_gate_back(store: Store) -> None:
    gate = gate_of(store)
    hold = asyncio.Event()
    cancelled = asyncio.create_task(write(store, "x", hold=hold))
    await until(lambda: gate.held)
    after = asyncio.create_task(write(store, "b"))
    await until(lambda: gate.waiting == 1)
    cancelled.cancel()
    await after
    assert await rows(store) == ["b-1", "b-2"]
    assert not gate.held


@pytest.mark.parametrize("ticks", range(0, 40, 2))
async def test_a_writer_cancelled_again_while_its_transaction_ends_gives_the_gate_back(
    store: Store, ticks: int
) -> None:
    """gRPC may cancel a handler's task more than once (the call cancelled, then the server
    ending it): a second cancellation landing while the session rolls back or commits must
    still end the transaction and give its connection — and the gate — back, at once."""
    gate = gate_of(store)
    hold = asyncio.Event()
    writer = asyncio.create_task(write(store, "x", hold=hold))
    await until(lambda: gate.held)
    writer.cancel()  # the session rolls back...
    for _ in range(ticks):
        await asyncio.sleep(0)
    writer.cancel()  # ...and is cancelled again somewhere in there
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await until(lambda: not gate.held)  # not after a garbage collection of the connection
    await write(store, "b")
    assert await rows(store) == ["b-1", "b-2"]


async def test_reads_run_beside_an_open_write_transaction(store: Store) -> None:
    gate = gate_of(store)
    await write(store, "before")
    hold = asyncio.Event()
    writing = asyncio.create_task(write(store, "open", hold=hold))
    await until(lambda: gate.held)
    assert await rows(store) == ["before-1", "before-2"]  # not the open transaction's row
    assert gate.held
    assert not writing.done()
    hold.set()
    await writing
    assert await rows(store) == ["before-1", "before-2", "open-1", "open-2"]


async def test_a_session_reading_inside_another_of_the_same_task_does_not_wait_for_itself(
    store: Store,
) -> None:
    async with store.session() as outer:
        await outer.execute(text("INSERT INTO log (who) VALUES ('outer')"))
        assert await rows(store) == []  # a second session, same task: reads, no deadlock
    assert await rows(store) == ["outer"]


async def test_a_writer_that_waits_too_long_gets_database_is_locked(tmp_path: Path) -> None:
    from controller.errors import Unavailable

    opened = await Store.open(f"sqlite:///{tmp_path / 'slow.db'}")
    try:
        gate = gate_of(opened)
        gate._timeout = 0.0  # the first writer's hold is longer than any wait allows
        async with opened.session() as session:
            await session.execute(text("CREATE TABLE t (x INTEGER)"))
        hold = asyncio.Event()

        async def holder() -> None:
            async with opened.session() as session:
                await session.execute(text("INSERT INTO t VALUES (1)"))
                await hold.wait()

        task = asyncio.create_task(holder())
        await until(lambda: gate.held)
        with pytest.raises(Unavailable):
            async with opened.session() as session:
                await session.execute(text("INSERT INTO t VALUES (2)"))
        hold.set()
        await task
        async with opened.session() as session:
            assert list((await session.execute(text("SELECT x FROM t"))).scalars()) == [1]
    finally:
        await opened.close()


async def _lose(store: Store, how: str) -> None:
    async with store.session() as session:
        await session.execute(text("INSERT INTO log (who) VALUES ('lost')"))
        assert gate_of(store).held
        connection = await session.connection()
        if how == "invalidate":  # what a driver error does
            await connection.invalidate()
        else:  # taken out of the pool for good
            await connection.run_sync(lambda sync: sync.detach())
        await session.rollback()


@pytest.mark.parametrize("how", ["invalidate", "detach"])
async def test_a_lost_connection_frees_the_gate(store: Store, how: str) -> None:
    gate = gate_of(store)
    await _lose(store, how)
    assert not gate.held
    async with asyncio.timeout(GUARD_SECONDS):
        await write(store, "after")  # the next writer is admitted at once
    assert await rows(store) == ["after-1", "after-2"]


async def test_a_lost_connection_with_a_statement_still_stepping_keeps_no_lock(store: Store) -> None:
    """A task cancelled in the middle of a statement gets its connection invalidated, and
    Python's ``sqlite3`` closes a connection whose statement is not reset only as a "zombie"
    that keeps its transaction, and SQLite's write lock, while the statement's cursor lives
    (here the test keeps it; in the controller a traceback that the collector froze did).
    The store's connections roll back before they close, so the next writer goes at once:
    this fixture's busy timeout of 0 ms would fail it with ``database is locked``."""
    gate = gate_of(store)
    async with store.session() as session:
        await session.execute(text("INSERT INTO log (who) VALUES ('lost-1'), ('lost-2')"))
        connection = await session.connection()
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        stepping = await driver.execute("SELECT who FROM log ORDER BY seq")
        assert await stepping.fetchone() == ("lost-1",)  # and the second row is stepped to: not reset
        await connection.invalidate()
        await session.rollback()
    assert not gate.held
    async with asyncio.timeout(GUARD_SECONDS):
        await write(store, "after")
    assert await rows(store) == ["after-1", "after-2"]
    del stepping


def test_a_closed_connection_releases_the_write_lock_of_a_pending_statement(tmp_path: Path) -> None:
    """The connection class on its own, against a plain sqlite3 connection that shows the zombie."""
    path = tmp_path / "zombie.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x INTEGER)")
        setup.execute("INSERT INTO t VALUES (1), (2)")

    def holds_the_lock_after_close(factory: type[sqlite3.Connection]) -> bool:
        first = sqlite3.connect(path, timeout=0, factory=factory)
        first.execute("UPDATE t SET x = x + 1")
        pending = first.execute("SELECT x FROM t")  # alive until this function returns
        assert pending.fetchone() is not None
        first.close()
        with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as other:
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                return "locked" in str(exc)
            other.execute("ROLLBACK")
            return False

    assert holds_the_lock_after_close(sqlite3.Connection)  # what Python's sqlite3 does
    assert not holds_the_lock_after_close(RollbackFirstConnection)
