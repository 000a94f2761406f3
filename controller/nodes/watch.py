"""Live node changes for ``NodeService.WatchNodes`` (the dashboard's nodes table).

One :class:`NodeWatch` per controller listens to the fleet — the health monitor's state
changes (:meth:`HealthMonitor.add_listener`), the fleet's view listeners (a heartbeat, a
hello, a stream connected or broken, a removal: :attr:`Fleet.view_listeners`) and
registrations (:meth:`NodeWatch.registered`, called by ``RegisterNode``) — and hands each
change to the subscriptions of the node's owner only.

Nothing here ever blocks the fleet: a listener only notes, per subscription, *that* a node
changed (a dict entry and an event set, no await). Each subscription holds at most one
pending entry per node — a slow reader gets the latest of each node, never a backlog — so
its memory is bounded by its user's node count whatever the heartbeat rate. What a message
says about the node is read when it is sent, so it is always the node as it is then.

Heartbeats are thinned per subscription: a node's ``UPDATED`` message is queued only if
none was sent for it in the last ``min_interval`` seconds (on the fleet's monotonic clock);
a fleet heartbeating every second costs a watcher one message per node per interval. State
changes, registrations and removals are never held back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum

from automator67.v1 import common_pb2, node_pb2

from controller.nodes.fleet import STATUS_ENUM, Fleet
from controller.nodes.health import NodeState
from controller.nodes.monitor import StateChange
from controller.store.models import Node
from controller.timestamps import timestamp

log = logging.getLogger("a67.nodes")

SNAPSHOT_PAGE = 500
"""Nodes read from the store, and rendered, per step of a watch's first snapshot."""


class _Kind(IntEnum):
    """A pending change of one node; merging keeps the strongest (the larger)."""

    UPDATED = 1
    STATUS = 2
    REGISTERED = 3
    REMOVED = 4


@dataclass(slots=True)
class _Pending:
    kind: _Kind
    previous: NodeState | None = None
    """STATUS: the state before the first change not yet sent."""
    reason: str = ""
    """STATUS: why the last change not yet sent happened."""


@dataclass(eq=False)
class Subscription:
    """One WatchNodes call: the changes of its user's nodes not yet sent, one per node."""

    user_id: str
    node_id: str
    """Only this node ('' for all the user's)."""
    min_interval: float
    """Seconds between two UPDATED messages of one node, at least."""
    pending: dict[str, _Pending] = field(default_factory=dict)
    """node id -> its change not yet sent, oldest first."""
    last_sent: dict[str, float] = field(default_factory=dict)
    """node id -> when a message about it was last sent (the fleet's clock)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, node_id: str, kind: _Kind, *, now: float, change: StateChange | None = None) -> None:
        if self.node_id and node_id != self.node_id:
            return
        current = self.pending.get(node_id)
        if current is None:
            if kind is _Kind.UPDATED and now - self.last_sent.get(node_id, float("-inf")) < self.min_interval:
                return  # thinned: the next heartbeat after the interval brings the news
            current = self.pending[node_id] = _Pending(kind)
        elif kind > current.kind:
            current.kind = kind
        if change is not None:
            if current.previous is None:
                current.previous = change.old
            current.reason = change.reason
        self.wake.set()


def _utc(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


RenderNodes = Callable[[Sequence[Node]], Awaitable[list[node_pb2.Node]]]
"""The nodes as ListNodes returns them (live status and metrics, the credentials' state)."""
RenderLive = Callable[[Node], Awaitable[node_pb2.Node]]
"""One node as ListNodes returns it but for its credentials' state (no store read)."""


class NodeWatch:
    """The fleet's node changes, fanned out to the WatchNodes calls of each node's owner."""

    def __init__(self, fleet: Fleet, *, stop: asyncio.Event | None = None) -> None:
        self._fleet = fleet
        self._stop = stop or asyncio.Event()
        """Set when the controller drains: every watch ends."""
        self._by_user: dict[str, set[Subscription]] = {}
        fleet.monitor.add_listener(self._on_state_change)
        fleet.view_listeners.append(self._on_view)

    # -- what the fleet reports (never awaits, never raises) ------------------------------

    async def _on_state_change(self, change: StateChange) -> None:
        kind = _Kind.REMOVED if change.new is NodeState.REMOVED else _Kind.STATUS
        self._note(change.user_id, change.node_id, kind, change)

    def _on_view(self, node_id: str) -> None:
        user_id = self._fleet.monitor.user_of(node_id)  # None once removed: REMOVED came first
        if user_id is not None:
            self._note(user_id, node_id, _Kind.UPDATED)

    def registered(self, node_id: str, user_id: str) -> None:
        """A node was registered (RegisterNode)."""
        self._note(user_id, node_id, _Kind.REGISTERED)

    def _note(self, user_id: str, node_id: str, kind: _Kind, change: StateChange | None = None) -> None:
        subscriptions = self._by_user.get(user_id)
        if not subscriptions:
            return
        now = self._fleet.clock()
        for subscription in subscriptions:
            subscription.note(node_id, kind, now=now, change=change)

    # -- subscriptions --------------------------------------------------------------------

    def subscribe(self, user_id: str, *, node_id: str = "", min_interval: float) -> Subscription:
        subscription = Subscription(user_id, node_id, min_interval)
        self._by_user.setdefault(user_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._by_user.get(subscription.user_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._by_user[subscription.user_id]

    def subscriptions(self, user_id: str | None = None) -> int:
        """How many watches are open (of ``user_id``, or of everyone)."""
        if user_id is not None:
            return len(self._by_user.get(user_id, ()))
        return sum(len(s) for s in self._by_user.values())

    # -- one WatchNodes call ----------------------------------------------------------------

    async def watch(
        self,
        user_id: str,
        *,
        node_id: str = "",
        min_interval: float,
        snapshot: Callable[[], AsyncIterator[Sequence[Node]]],
        load: Callable[[str], Awaitable[Node | None]],
        render: RenderNodes,
        render_live: RenderLive,
    ) -> AsyncIterator[node_pb2.WatchNodesResponse]:
        """The user's nodes (``snapshot``, in pages), ``SNAPSHOT_END``, then their changes until
        the caller goes away (the subscription ends with the generator) or the controller
        drains. ``load`` reads one of the user's nodes (None: not theirs, or gone). A metrics
        update is drawn with ``render_live`` and the credentials' state last sent (that state
        changes rarely: every other message reads it again), so a heartbeat costs no store read."""
        subscription = self.subscribe(user_id, node_id=node_id, min_interval=min_interval)
        try:
            # Subscribed first: a change during the snapshot is sent after it (at worst twice).
            rows: dict[str, Node] = {}
            credentials: dict[str, node_pb2.NodeCredentials] = {}
            async for page in snapshot():
                now = self._fleet.clock()
                for proto in await render(page):
                    subscription.last_sent[proto.id] = now
                    credentials[proto.id] = proto.credentials
                    yield self._response(node_pb2.NODE_CHANGE_KIND_EXISTING, proto)
                rows.update((row.id, row) for row in page)
            yield node_pb2.WatchNodesResponse(
                kind=node_pb2.NODE_CHANGE_KIND_SNAPSHOT_END, time=timestamp(self._fleet.wall_clock())
            )
            while not self._stop.is_set():
                if not subscription.pending:
                    subscription.wake.clear()
                    await self._next(subscription)
                    continue
                changed = next(iter(subscription.pending))
                pending = subscription.pending.pop(changed)
                response = await self._change(changed, pending, rows, credentials, load, render, render_live)
                if response is not None:
                    subscription.last_sent[changed] = self._fleet.clock()
                    yield response
        finally:
            self.unsubscribe(subscription)

    async def _next(self, subscription: Subscription) -> None:
        """Wait for a change or the drain."""
        if self._stop.is_set():
            return
        waiters = [asyncio.ensure_future(subscription.wake.wait()), asyncio.ensure_future(self._stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _change(
        self,
        node_id: str,
        pending: _Pending,
        rows: dict[str, Node],
        credentials: dict[str, node_pb2.NodeCredentials],
        load: Callable[[str], Awaitable[Node | None]],
        render: RenderNodes,
        render_live: RenderLive,
    ) -> node_pb2.WatchNodesResponse | None:
        """The message for one node's pending change (None: nothing the caller needs)."""
        known = node_id in rows
        if pending.kind is _Kind.REMOVED:
            if not known:
                return None  # registered and removed before the caller heard of it
            row = await load(node_id) or rows[node_id]
            del rows[node_id]
            credentials.pop(node_id, None)
            proto = (await render([row]))[0]
            proto.status = common_pb2.NODE_STATUS_REMOVED
            return self._response(node_pb2.NODE_CHANGE_KIND_REMOVED, proto)
        if pending.kind is _Kind.UPDATED and known and node_id in credentials:
            # metrics and status are live (the fleet): the row and the last state are enough
            proto = await render_live(rows[node_id])
            proto.credentials.CopyFrom(credentials[node_id])
            return self._response(node_pb2.NODE_CHANGE_KIND_UPDATED, proto)
        loaded = await load(node_id)
        if loaded is None:
            return None
        row = rows[node_id] = loaded
        proto = (await render([row]))[0]
        credentials[node_id] = proto.credentials
        if not known:
            return self._response(node_pb2.NODE_CHANGE_KIND_REGISTERED, proto)
        previous = STATUS_ENUM.get(pending.previous) if pending.previous is not None else None
        if pending.kind is not _Kind.STATUS or previous is None or previous == proto.status:
            # merged changes that ended where they began (ready, suspect, ready) say nothing new
            return self._response(node_pb2.NODE_CHANGE_KIND_UPDATED, proto)
        response = self._response(node_pb2.NODE_CHANGE_KIND_STATUS_CHANGED, proto)
        response.previous_status = previous
        response.reason = pending.reason
        return response

    def _response(
        self, kind: node_pb2.NodeChangeKind.ValueType, node: node_pb2.Node
    ) -> node_pb2.WatchNodesResponse:
        self._live_times(node)
        return node_pb2.WatchNodesResponse(kind=kind, node=node, time=timestamp(self._fleet.wall_clock()))

    def _live_times(self, node: node_pb2.Node) -> None:
        """The node's last heartbeat and metrics as the fleet knows them now: the store's copy
        is written on state changes and once a minute, so it lags (and a pushed metrics
        update would otherwise carry an older heartbeat time than its metrics)."""
        health = self._fleet.monitor.get(node.id)
        if health is not None and health.last_heartbeat_at is not None:
            node.last_heartbeat.FromDatetime(_utc(self._fleet.wall_time(health.last_heartbeat_at)))
        live = self._fleet.live.get(node.id)
        if live is not None:
            node.last_metrics_update.FromDatetime(_utc(self._fleet.wall_time(live.received_at)))
