"""Which controller watches each node, when several share a store.

A node's health is watched by one controller: the one that last held its stream (its
heartbeats arrive there). The store says which (``nodes.stream_holder``), written by that
controller when the stream opens (:meth:`~controller.nodes.fleet.Fleet.stream_connected`)
and kept when the stream ends — and when the controller stops — so that the same
controller goes on watching the silent node (suspect, then failed on the usual timing)
unless the node reconnects elsewhere, and so that a node left by a controller that stopped
or died is known as such.

:class:`NodeWatchers` runs once per heartbeat interval in every controller:

* a node this controller watches whose stream another live controller now holds is
  **handed over**: this controller stops watching it, silently (no transition, no
  recovery). Until then, its state writes are refused by the store (a status is written
  only by the node's watcher), and a failure it sees is checked against the store before
  recovery starts (:meth:`~controller.nodes.fleet.Fleet._moved_elsewhere`);
* a node whose watcher is gone — the controller stopped (its row in ``controllers`` is
  removed) or died (its row went stale) — is **adopted** by the controller holding the
  ``node-watchers`` loop lease (:mod:`controller.leases`): claimed in the store
  (conditionally: one adopter), then watched with a fresh grace period, as after a
  controller restart, so a node whose controller died is not failed before it has had
  time to reconnect. (A node that never connected has no watcher: it is watched from its
  first stream, as it always was.)

A controller alone (the embedded default) watches every node and finds nothing to hand
over or adopt; restarted, it is its nodes' watcher still (its id is kept in its data
directory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from controller.leases import LoopLeases, my_turn
from controller.nodes.fleet import Fleet

log = logging.getLogger("a67.nodes")

WATCHERS_LEASE = "node-watchers"
"""The loop lease of adopting nodes no live controller watches."""


class NodeWatchers:
    """Hands nodes over and adopts orphans (see the module docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        peers: Callable[[], Awaitable[set[str]]],
        leases: LoopLeases | None,
        interval_seconds: float,
    ) -> None:
        if fleet.holder_id is None:
            raise ValueError("the fleet needs this controller's id (holder_id)")
        self.fleet = fleet
        self.me = fleet.holder_id
        self.peers = peers
        self.leases = leases
        self.interval = interval_seconds
        self._task: asyncio.Task[None] | None = None
        self.handed_over = 0
        self.adopted = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="a67-node-watchers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is away: try again next interval
                log.warning("node watchers: pass failed", exc_info=True)

    async def sync(self) -> tuple[int, int]:
        """One pass: ``(handed over, adopted)``."""
        fleet = self.fleet
        alive = await self.peers()
        others = alive - {self.me}
        fleet.live_peers = frozenset(others)
        rows = await fleet.nodes.watch_rows(not_by=self.me)
        orphans = [r for r in rows if r[4] is not None and r[4] not in alive]
        turn = await my_turn(self.leases, WATCHERS_LEASE, self.interval) if orphans else False
        handed = adopted = 0
        now = fleet.clock()
        for node_id, user_id, status, last_heartbeat, holder in rows:
            if fleet.streams.get(node_id) is not None:
                continue  # its stream is here: this controller watches it
            if fleet.watched_elsewhere(holder, others):
                if fleet.hand_over(node_id):
                    handed += 1
                    log.info(
                        "node %s: its stream is held by controller %s, which watches it now", node_id, holder
                    )
                continue
            if holder is None or holder == self.me or not turn:
                continue
            if not await fleet.nodes.claim_watch(node_id, self.me, holder):
                continue  # another controller adopted it first
            if node_id not in fleet.monitor:
                fleet.adopt(node_id, user_id, status, last_heartbeat, now)
            adopted += 1
            log.warning(
                "node %s: its controller %s is gone; watched here now (it has a grace period to reconnect)",
                node_id,
                holder,
            )
        self.handed_over += handed
        self.adopted += adopted
        return handed, adopted
