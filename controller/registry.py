"""The controllers serving a store: one at a time, until scale-out.

Several controllers on one store would each monitor every node, and a node
whose stream is held by the other would look silent: each would declare the
other's nodes failed and re-place their replicas. Until the controllers share
the fleet (streams, health, commands), a second controller refuses to start
while another serves the store, and says which one and what to do.

Each controller keeps a row in ``controllers`` (id, process, last seen): written at
start, refreshed every :data:`REFRESH_SECONDS`, deleted on a graceful stop. At
start, another controller's row means:

* on this host, its process gone (killed): stale at once, removed;
* on this host, its process alive (including another controller in this
  process): refused at once;
* on another host: alive until it has not been seen for :data:`STALE_SECONDS`; the
  starting controller waits that long for it to go stale (a controller killed
  on another machine), then refuses if it is still refreshed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from controller.errors import FailedPrecondition
from controller.store.db import Store
from controller.store.models import ControllerProcess, utcnow

log = logging.getLogger("a67.registry")

REFRESH_SECONDS = 5.0
"""How often a controller refreshes its row."""
STALE_SECONDS = 15.0
"""A controller on another host not seen for this long is gone."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


async def live_controllers(
    store: Store, *, wall: Callable[[], datetime] = utcnow, stale_seconds: float = STALE_SECONDS
) -> set[str]:
    """The ids of the controllers serving ``store`` now: a row seen within ``stale_seconds``
    whose process, when it is on this host, still exists. Work a controller left behind
    (a transaction, an upload) may be taken over once its id is not in this set."""
    now = wall()
    host = socket.gethostname()[:255]
    async with store.session() as session:
        rows = list((await session.execute(select(ControllerProcess))).scalars())
    return {
        r.id
        for r in rows
        if r.seen_at > now - timedelta(seconds=stale_seconds) and (r.host != host or process_alive(r.pid))
    }


_RUNNING: set[str] = set()
"""The instances of the controllers running in this process."""


class ControllerRegistry:
    """This controller's row in ``controllers`` (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        controller_id: str,
        *,
        wall: Callable[[], datetime] = utcnow,
        refresh_seconds: float = REFRESH_SECONDS,
        stale_seconds: float = STALE_SECONDS,
        allow_peers: bool = False,
    ) -> None:
        self.store = store
        self.id = controller_id
        self.instance = uuid.uuid4().hex
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.wall = wall
        self.refresh_seconds = refresh_seconds
        self.stale_seconds = stale_seconds
        self.allow_peers = allow_peers
        """Scale-out (``A67_SCALE_OUT``): other live controllers may serve the store too."""
        self.node_endpoint: str | None = None
        """This controller's node port as nodes dial it (:meth:`set_node_endpoint`)."""
        self.node_endpoints: tuple[str, ...] = ()
        """The node ports of the controllers serving the store (this one's first), as of the
        last refresh: what nodes are told, to reconnect elsewhere when theirs goes away."""
        self.endpoints_version = 0
        """Grows when :attr:`node_endpoints` changes (nodes are told again with their next ack)."""
        self._task: asyncio.Task[None] | None = None
        self.lost = False
        """Another controller took the store while this one was away (see :meth:`refresh`)."""
        self.on_lost: Callable[[], None] | None = None
        """Called then (``a67 serve``: drain and exit)."""

    def _row(self, now: datetime) -> ControllerProcess:
        return ControllerProcess(
            id=self.id,
            instance=self.instance,
            host=self.host,
            pid=self.pid,
            started_at=now,
            seen_at=now,
            node_endpoint=self.node_endpoint,
        )

    async def set_node_endpoint(self, endpoint: str) -> None:
        """Record where nodes reach this controller (once its node port is bound)."""
        self.node_endpoint = endpoint
        async with self.store.session() as session:
            await session.execute(
                update(ControllerProcess)
                .where(ControllerProcess.id == self.id, ControllerProcess.instance == self.instance)
                .values(node_endpoint=endpoint)
            )
        await self._read_endpoints()

    async def _read_endpoints(self) -> None:
        now = self.wall()
        async with self.store.session() as session:
            rows = list((await session.execute(select(ControllerProcess))).scalars())
        others = sorted(
            r.node_endpoint
            for r in rows
            if r.node_endpoint and r.instance != self.instance and self._alive(r, now) is not False
        )
        mine = (self.node_endpoint,) if self.node_endpoint else ()
        endpoints = (*mine, *(e for e in others if e not in mine))
        if endpoints != self.node_endpoints:
            self.node_endpoints = endpoints
            self.endpoints_version += 1

    def _alive(self, row: ControllerProcess, now: datetime) -> bool | None:
        """True: alive; False: gone; None: on another host and seen lately (wait and see)."""
        if row.host == self.host:
            if row.pid == self.pid:  # another controller in this process, unless it ended
                return row.instance != self.instance and row.instance in _RUNNING
            return process_alive(row.pid)
        return None if row.seen_at > now - timedelta(seconds=self.stale_seconds) else False

    async def claim(self) -> None:
        """Register this controller; :class:`FailedPrecondition` if another serves the store."""
        waited = False
        while True:
            now = self.wall()
            async with self.store.session() as session:
                rows = list((await session.execute(select(ControllerProcess))).scalars())
            others = [r for r in rows if r.instance != self.instance]
            verdicts = {r.id: self._alive(r, now) for r in others}
            alive = [r for r in others if verdicts[r.id]]
            unsure = [r for r in others if verdicts[r.id] is None]
            if self.allow_peers:
                others = [r for r in others if verdicts[r.id] is False]  # only gone ones are removed
                if alive or unsure:
                    log.info(
                        "serving the store beside controllers %s (scale-out)",
                        ", ".join(sorted(r.id for r in [*alive, *unsure])),
                    )
                break
            if alive or (unsure and waited):
                other = (alive or unsure)[0]
                seen = (now - other.seen_at).total_seconds()
                raise FailedPrecondition(
                    f"Another controller serves this store: {other.id} (process {other.pid} on "
                    f"{other.host}, seen {seen:.0f} s ago). One controller per store: stop it first "
                    f"(SIGTERM); if it was killed, its row goes stale within {self.stale_seconds:.0f} s. "
                    "Several controllers need A67_SCALE_OUT=1 with PostgreSQL and Redis "
                    "(experimental: docs/operations.md)",
                    reason="STORE_IN_USE",
                )
            if unsure:
                log.warning(
                    "controller %s on %s was seen %.0f s ago: waiting up to %.0f s for it to go stale",
                    unsure[0].id,
                    unsure[0].host,
                    (now - unsure[0].seen_at).total_seconds(),
                    self.stale_seconds,
                )
                await asyncio.sleep(self.stale_seconds)
                waited = True
                continue
            break
        async with self.store.session() as session:
            gone = [r.id for r in others]
            if gone:
                log.info("removing the rows of stopped controllers: %s", ", ".join(gone))
                await session.execute(delete(ControllerProcess).where(ControllerProcess.id.in_(gone)))
            await session.execute(delete(ControllerProcess).where(ControllerProcess.id == self.id))
            session.add(self._row(now))
        _RUNNING.add(self.instance)
        self._task = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
                if self.allow_peers:
                    await self._read_endpoints()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is away: try again next time
                log.warning("refreshing this controller's row failed", exc_info=True)

    async def refresh(self) -> None:
        now = self.wall()
        async with self.store.session() as session:
            result = await session.execute(
                update(ControllerProcess)
                .where(ControllerProcess.id == self.id, ControllerProcess.instance == self.instance)
                .values(seen_at=now)
            )
            if getattr(result, "rowcount", 1):
                return
            others = list(
                (
                    await session.execute(
                        select(ControllerProcess).where(ControllerProcess.instance != self.instance)
                    )
                ).scalars()
            )
            if others:
                # paused (SIGSTOP, a partition) past the stale time, and another controller
                # took the store meanwhile: this one must not serve next to it
                log.error(
                    "controller %s (process %d on %s) serves this store now: this controller stops",
                    others[0].id,
                    others[0].pid,
                    others[0].host,
                )
                self.lost = True
                if self.on_lost is not None:
                    self.on_lost()
                return
            log.warning(
                "this controller's row was removed (paused past %.0f s?): adding it again", self.stale_seconds
            )
            session.add(self._row(now))

    async def release(self) -> None:
        """Graceful stop: remove this controller's row (another may start at once)."""
        _RUNNING.discard(self.instance)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with self.store.session() as session:
                await session.execute(
                    delete(ControllerProcess).where(
                        ControllerProcess.id == self.id, ControllerProcess.instance == self.instance
                    )
                )
        except Exception:
            log.warning("removing this controller's row failed (it goes stale)", exc_info=True)
