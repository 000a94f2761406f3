"""One controller per store: a second one refuses to start while the first serves it.

Real controllers on a real store (SQLite file and PostgreSQL); rows of killed processes
and of controllers on other hosts written as those would leave them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from controller.errors import FailedPrecondition
from controller.registry import ControllerRegistry
from controller.server import start_controller
from controller.store import Store
from controller.store.migrate import upgrade
from controller.store.models import ControllerProcess
from tests.support import controller_settings, running_controller

T0 = datetime(2027, 2, 2, 12, 0, tzinfo=UTC)


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


async def _rows(store: Store) -> list[ControllerProcess]:
    async with store.session() as session:
        return list((await session.execute(select(ControllerProcess))).scalars())


async def _insert(store: Store, **fields: object) -> None:
    values: dict[str, object] = {
        "id": "other",
        "instance": "0" * 32,
        "host": "elsewhere.example",
        "pid": 4242,
        "started_at": T0,
        "seen_at": T0,
    } | fields
    async with store.session() as session:
        session.add(ControllerProcess(**values))


async def test_a_second_controller_on_the_store_refuses_until_the_first_stops(
    tmp_path: Path, store_url: str
) -> None:
    await asyncio.to_thread(upgrade, store_url)  # PostgreSQL is migrated by `a67 migrate`
    first = controller_settings(tmp_path / "a", store_url=store_url, controller_id="ctl-a")
    second = controller_settings(tmp_path / "b", store_url=store_url, controller_id="ctl-b")
    async with running_controller(first):
        with pytest.raises(FailedPrecondition) as refused:
            await start_controller(second)
        assert refused.value.reason == "STORE_IN_USE"
        assert "ctl-a" in refused.value.message
        assert "stop it first" in refused.value.message
    # stopped gracefully: its row is gone and the second starts at once
    async with running_controller(second) as controller:
        assert [(r.id, r.host) for r in await _rows(controller.store)] == [
            ("ctl-b", controller.registry.host)
        ]


async def test_the_row_of_a_killed_controller_on_this_host_does_not_hold_the_store(store: Store) -> None:
    registry = ControllerRegistry(store, "restarted")
    await _insert(store, id="restarted", host=registry.host, pid=_dead_pid(), seen_at=datetime.now(UTC))
    await registry.claim()  # at once: its process is gone
    try:
        rows = await _rows(store)
        assert [(r.id, r.instance, r.pid) for r in rows] == [("restarted", registry.instance, registry.pid)]
    finally:
        await registry.release()
    assert await _rows(store) == []


class Wall:
    """A wall clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = T0
        self.step = timedelta(seconds=step)

    def __call__(self) -> datetime:
        now = self.now
        self.now += self.step
        return now


async def test_a_controller_on_another_host_holds_the_store_while_it_is_seen(store: Store) -> None:
    await _insert(store, seen_at=T0)
    # still refreshed (the clock does not pass the stale time): refused after one wait
    waiting = ControllerRegistry(store, "mine", wall=Wall(0.0), stale_seconds=0.01)
    with pytest.raises(FailedPrecondition) as refused:
        await waiting.claim()
    assert "other" in refused.value.message
    assert "elsewhere.example" in refused.value.message
    assert [r.id for r in await _rows(store)] == ["other"]
    # not seen for longer than the stale time (it was killed): the new controller waits
    # that long once, then starts and removes the stale row
    patient = ControllerRegistry(store, "mine", wall=Wall(1.0), stale_seconds=0.01)
    await patient.claim()
    try:
        assert [r.id for r in await _rows(store)] == ["mine"]
        await patient.refresh()
        (row,) = await _rows(store)
        assert row.seen_at > row.started_at  # refreshed
    finally:
        await patient.release()


async def test_a_controller_paused_while_another_took_the_store_stops(store: Store) -> None:
    # A on another host, paused past the stale time; B took the store meanwhile
    paused = ControllerRegistry(store, "a", wall=Wall(0.0))
    paused.host = "host-a.example"
    await paused.claim()
    stopped: list[bool] = []
    paused.on_lost = lambda: stopped.append(True)
    async with store.session() as session:  # what B's claim did with A's stale row
        await session.execute(delete(ControllerProcess).where(ControllerProcess.id == "a"))
    await _insert(store, id="b", host="host-b.example", pid=7, seen_at=T0)
    # A resumes: its refresh finds its row gone and B serving: it stops, and does not come back
    await paused.refresh()
    assert (paused.lost, stopped) == (True, [True])
    assert [r.id for r in await _rows(store)] == ["b"]
    await paused.release()
    # alone (its row removed by an operator, nobody else there): it just adds its row again
    alone = ControllerRegistry(store, "c", wall=Wall(0.0))
    async with store.session() as session:
        await session.execute(delete(ControllerProcess))
    await alone.claim()
    try:
        async with store.session() as session:
            await session.execute(delete(ControllerProcess))
        await alone.refresh()
        assert ([r.id for r in await _rows(store)], alone.lost) == (["c"], False)
    finally:
        await alone.release()
