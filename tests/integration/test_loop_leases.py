"""Leases of the fleet-wide loops (controller/leases.py) on a real store, SQLite and PostgreSQL.

Two controllers ("A" and "B", each with its own connection pool) share a store and, in
the first tests, one injected wall clock. The last test pauses a real controller process
with SIGSTOP past its lease while it works under it, lets another take the lease, and
resumes it: its next guarded write is refused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from controller.leases import Fence, LeaseLost, LoopLeases
from controller.store import Store
from controller.store.models import LoopLease
from tests.conftest import PostgresDatabases
from tests.support import migrated_store

T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def two(store_url: str) -> AsyncIterator[tuple[Store, Store]]:
    async with migrated_store(store_url) as a, migrated_store(store_url) as b:
        yield a, b


async def _guarded_write(fence: Fence, store: Store) -> None:
    async with store.session() as session:
        await fence.guard(session)


async def test_one_controller_holds_a_loop_and_renews_it(two: tuple[Store, Store]) -> None:
    wall = Wall()
    a, b = LoopLeases(two[0], "A", wall=wall), LoopLeases(two[1], "B", wall=wall)
    first = await a.turn("reconcile", 15)
    assert first is not None
    assert first.token == 1
    assert await b.turn("reconcile", 15) is None  # A holds it
    wall.advance(10)
    again = await a.turn("reconcile", 15)  # renewed: same token, later expiry
    assert again == first
    wall.advance(10)  # 20 s after the start: past the first expiry, within the renewed one
    assert await b.turn("reconcile", 15) is None
    await _guarded_write(first, two[0])
    # another loop is a lease of its own
    other = await b.turn("storage-gc", 15)
    assert other is not None
    assert other.holder == "B"
    assert a.held("reconcile") == first
    assert a.held("storage-gc") is None


async def test_an_expired_lease_moves_with_a_new_token_and_fences_the_old_holder(
    two: tuple[Store, Store],
) -> None:
    wall = Wall()
    a, b = LoopLeases(two[0], "A", wall=wall), LoopLeases(two[1], "B", wall=wall)
    old = await a.turn("reconcile", 15)
    assert old is not None
    wall.advance(16)  # A stopped renewing (dead, paused)
    new = await b.turn("reconcile", 15)
    assert new is not None
    assert (new.holder, new.token) == ("B", 2)
    with pytest.raises(LeaseLost):
        await _guarded_write(old, two[0])  # A resumes mid-pass: refused
    await _guarded_write(new, two[1])
    assert await a.turn("reconcile", 15) is None  # and A's next turn skips the pass
    assert a.held("reconcile") is None
    # even A's own expired lease, taken again, gets a new token: work begun under the old one is fenced
    wall.advance(16)
    back = await a.turn("reconcile", 15)
    assert back is not None
    assert back.token == 3
    with pytest.raises(LeaseLost):
        await _guarded_write(new, two[1])


async def test_a_controller_restarted_under_its_id_takes_its_lease_at_once(two: tuple[Store, Store]) -> None:
    """A restart keeps the controller's id (data_dir/controller-id): the new process takes its
    lease without waiting it out, with a new token that fences the old process's work."""
    wall = Wall()
    before = await LoopLeases(two[0], "A", wall=wall).turn("reconcile", 15)
    assert before is not None
    restarted = await LoopLeases(two[1], "A", wall=wall).turn("reconcile", 15)
    assert restarted is not None
    assert restarted.token == before.token + 1
    with pytest.raises(LeaseLost):
        await _guarded_write(before, two[0])
    assert await LoopLeases(two[0], "B", wall=wall).turn("reconcile", 15) is None


async def test_a_guard_past_expiry_is_refused_even_when_nobody_took_over(two: tuple[Store, Store]) -> None:
    wall = Wall()
    a = LoopLeases(two[0], "A", wall=wall)
    fence = await a.turn("gc", 15)
    assert fence is not None
    wall.advance(15)
    with pytest.raises(LeaseLost):
        await _guarded_write(fence, two[0])


async def test_a_graceful_stop_hands_the_lease_over_at_once(two: tuple[Store, Store]) -> None:
    wall = Wall()
    a, b = LoopLeases(two[0], "A", wall=wall), LoopLeases(two[1], "B", wall=wall)
    assert await a.turn("reconcile", 15) is not None
    assert await a.turn("rewrap", 15) is not None
    await a.release()
    taken = await b.turn("reconcile", 15)
    assert taken is not None
    assert taken.token == 2
    assert await b.turn("rewrap", 15) is not None


async def test_controllers_racing_for_a_new_lease_one_wins(two: tuple[Store, Store]) -> None:
    wall = Wall()
    contenders = [LoopLeases(two[i % 2], f"C{i}", wall=wall) for i in range(6)]
    won = await asyncio.gather(*(c.turn("reconcile", 15) for c in contenders), return_exceptions=True)
    fences = [w for w in won if isinstance(w, Fence)]
    assert not [w for w in won if isinstance(w, BaseException)], won
    assert len(fences) == 1
    async with two[0].session() as session:
        rows = list((await session.execute(select(LoopLease))).scalars())
    assert [(r.name, r.holder, r.token) for r in rows] == [("reconcile", fences[0].holder, 1)]


async def test_racing_for_an_expired_lease_one_wins(two: tuple[Store, Store]) -> None:
    wall = Wall()
    assert await LoopLeases(two[0], "old", wall=wall).turn("reconcile", 15) is not None
    wall.advance(20)
    contenders = [LoopLeases(two[i % 2], f"C{i}", wall=wall) for i in range(6)]
    won = await asyncio.gather(*(c.turn("reconcile", 15) for c in contenders))
    fences = [w for w in won if w is not None]
    assert len(fences) == 1
    assert fences[0].token == 2


def _state(pid: int) -> str:
    """A process's state letter from /proc (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


PAUSED_WORKER = """
import asyncio, os, signal, sys
from controller.leases import LeaseLost, LoopLeases
from controller.store import Store
from sqlalchemy import text

async def main(url: str) -> None:
    store = await Store.open(url)
    leases = LoopLeases(store, "worker")
    fence = await leases.turn("reconcile", float(sys.argv[2]))
    assert fence is not None
    print("held", fence.token, flush=True)
    writes = 0
    for _ in range(3000):  # bounded: about 30 s of work
        try:
            async with store.session() as session:
                await fence.guard(session)
                await session.execute(text("INSERT INTO marks (token) VALUES (:t)"), {"t": fence.token})
                if writes == 1 and sys.argv[3] == "inside":
                    os.kill(os.getpid(), signal.SIGSTOP)  # paused in the middle of a guarded write
            writes += 1
            if writes == 1:
                print("wrote", flush=True)
        except LeaseLost:
            print("lost", flush=True)
            break
        except Exception as exc:  # paused inside a transaction: the server ended it
            print("broken", type(exc).__name__, file=sys.stderr, flush=True)
        await asyncio.sleep(0.01)
    else:
        print("never lost", flush=True)
    await store.close()

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.postgres
@pytest.mark.parametrize("where", ["between", "inside"])
async def test_a_controller_paused_past_its_lease_writes_nothing_when_it_resumes(
    postgres_databases: PostgresDatabases, where: str
) -> None:
    """SIGSTOP a process working under a loop lease, let its lease run out, take it in this
    process, SIGCONT the worker: its next guarded write is refused, and no write of its
    lands after the takeover. PostgreSQL only, as several controllers are: a process paused
    in the middle of a guarded transaction holds the lease row until the server ends its
    idle transaction (after the lease's length); SQLite cannot break a paused process's lock.
    ``where``: paused by the test between two writes, or by itself inside one (after its
    guard, before its commit)."""
    lease = 2.0
    store_url = postgres_databases.create()
    async with migrated_store(store_url) as store:
        async with store.session() as session:
            await session.execute(text("CREATE TABLE marks (token INTEGER NOT NULL)"))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        worker = subprocess.Popen(  # noqa: ASYNC220 - the test drives it by signals
            [sys.executable, "-c", PAUSED_WORKER, store_url, str(lease), where],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        try:
            assert worker.stdout is not None
            held = await asyncio.to_thread(worker.stdout.readline)
            assert held.split() == ["held", "1"], held + (worker.stderr.read() if worker.stderr else "")
            assert (await asyncio.to_thread(worker.stdout.readline)).strip() == "wrote"
            if where == "between":
                worker.send_signal(signal.SIGSTOP)
            while _state(worker.pid) != "T":  # noqa: ASYNC110 - another process: poll its state
                await asyncio.sleep(0.05)
            async with store.session() as session:
                expires = (
                    await session.execute(select(LoopLease.expires_at).where(LoopLease.name == "reconcile"))
                ).scalar_one()
            mine = LoopLeases(store, "taker")
            taken = None
            while taken is None:  # a condition, not a fixed sleep: the lease has run out
                await asyncio.sleep(0.2)
                if datetime.now(UTC) > expires:
                    taken = await mine.turn("reconcile", 60)
            assert taken.token == 2
            async with store.session() as session:
                before = (await session.execute(text("SELECT count(*) FROM marks"))).scalar_one()
            worker.send_signal(signal.SIGCONT)
            said = await asyncio.to_thread(worker.stdout.readline)
            assert said.strip() == "lost"
            assert await asyncio.to_thread(worker.wait, 60) == 0
            async with store.session() as session:
                after = (await session.execute(text("SELECT count(*) FROM marks"))).scalar_one()
            assert after == before  # nothing written once the lease had moved
            assert before >= 1
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
                worker.kill()
                worker.wait()
            for pipe in (worker.stdout, worker.stderr):
                if pipe is not None:
                    pipe.close()
