"""The node registry in the store: the ``nodes`` table behind one repository.

Each method is its own unit of work (one transaction) unless it takes a
``session``, and returns model objects detached from their session. Races are
settled by the database: the unique ``(user_id, fingerprint)`` constraint decides
which of two concurrent registrations of one installation wins.

* Ownership is checked in the query (:meth:`NodeRepository.get_for_user`), so
  another user's node and a missing node look the same.
* :meth:`NodeRepository.list_for_user` pages by keyset over ``(created_at, id)``;
  the page token is opaque (url-safe base64 of the last row's key).
* ``removed`` is terminal: :meth:`NodeRepository.update_status` and
  :meth:`NodeRepository.record_heartbeat` leave removed nodes alone, and
  :meth:`NodeRepository.mark_removed` clears the certificate serial, so the node's
  certificate is no longer accepted.
* Heartbeats are written at a bounded rate by the caller (see
  :meth:`controller.nodes.HealthMonitor.should_persist_metrics`), never once per heartbeat.

Example::

    nodes = NodeRepository(store)
    page, next_token = await nodes.list_for_user(user_id, page_size=50, page_token="")
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from controller.errors import AlreadyExists
from controller.store.db import Store
from controller.store.models import Node, new_id, utcnow
from controller.store.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_page_token,
    encode_page_token,
    execute_update,
    keyset_page,
)

log = logging.getLogger(__name__)

STATUS_INITIALIZING = "initializing"
STATUS_REMOVED = "removed"
STATUSES = frozenset(
    {"initializing", "ready", "busy", "degraded", "suspect", "failed", "draining", STATUS_REMOVED}
)
"""The values of ``nodes.status`` (spec §3.2 plus ``suspect`` and ``draining``)."""

REASON_ALREADY_REGISTERED = "NODE_ALREADY_REGISTERED"


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown node status {status!r}")


_NODES: Table = Node.__table__  # type: ignore[assignment]
_LIVE = _NODES.c.status != STATUS_REMOVED
_SET_STATUS = (
    _NODES.update().where(_NODES.c.id == bindparam("b_id"), _LIVE).values(status=bindparam("b_status"))
)
"""A node's status, unless it was removed (``executemany``: one parameter set per node)."""
_SET_STATUS_WATCHED = (
    _NODES.update()
    .where(
        _NODES.c.id == bindparam("b_id"),
        _LIVE,
        or_(_NODES.c.stream_holder.is_(None), _NODES.c.stream_holder == bindparam("b_holder")),
    )
    .values(status=bindparam("b_status"))
)
"""The same, only by the controller watching the node (its ``stream_holder``) or when none does."""
_BEAT = bindparam("b_beat", type_=_NODES.c.last_heartbeat.type)
_NOT_OLDER = or_(_NODES.c.last_heartbeat.is_(None), _NODES.c.last_heartbeat <= _BEAT)
_SET_BEAT = (
    _NODES.update()
    .where(_NODES.c.id == bindparam("b_id"), _LIVE, _NOT_OLDER)
    .values(last_heartbeat=bindparam("b_beat", type_=_NODES.c.last_heartbeat.type))
)
"""A node's last heartbeat, unless removed or already later (see :meth:`NodeRepository.record_heartbeat`)."""
_SET_BEAT_AND_METRICS = (
    _NODES.update()
    .where(_NODES.c.id == bindparam("b_id"), _LIVE, _NOT_OLDER)
    .values(
        last_heartbeat=bindparam("b_beat", type_=_NODES.c.last_heartbeat.type),
        last_metrics_update=bindparam("b_beat", type_=_NODES.c.last_metrics_update.type),
        metrics_current=bindparam("b_metrics", type_=_NODES.c.metrics_current.type),
    )
)
"""The same, with the metrics the heartbeat carried."""


async def _write_heartbeats(
    connection: AsyncConnection, rows: Sequence[tuple[str, datetime, dict[str, Any] | None]]
) -> None:
    """``(node_id, last_heartbeat, metrics)`` rows in their order: one ``executemany`` per run
    of rows with (or without) metrics."""
    for with_metrics, run in itertools.groupby(rows, key=lambda row: row[2] is not None):
        if with_metrics:
            params = [
                {"b_id": node_id, "b_beat": beat, "b_metrics": metrics} for node_id, beat, metrics in run
            ]
            await connection.execute(_SET_BEAT_AND_METRICS, params)
        else:
            await connection.execute(
                _SET_BEAT, [{"b_id": node_id, "b_beat": beat} for node_id, beat, _ in run]
            )


class NodeRepository:
    """Nodes: registration, lookups by owner, status and heartbeat writes, removal."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- creating -------------------------------------------------------------------------------

    async def create(
        self,
        *,
        user_id: str,
        provider: str,
        endpoint: str,
        region: str | None,
        capabilities: dict[str, Any],
        fingerprint: str | None = None,
        credentials: dict[str, Any] | None = None,
        cert_serial: str | None = None,
        node_id: str | None = None,
        status: str = STATUS_INITIALIZING,
        created_at: datetime | None = None,
        session: AsyncSession | None = None,
    ) -> Node:
        """Insert a node and return it.

        Without ``session``: its own transaction, and a node of this user with the
        same ``fingerprint`` raises ``AlreadyExists`` (``NODE_ALREADY_REGISTERED``,
        metadata ``node_id`` = the existing node). With ``session``: the insert is
        flushed in that transaction and an ``IntegrityError`` propagates; the caller
        turns it into the error with :meth:`already_registered` once its
        transaction has rolled back.
        """
        _check_status(status)
        node = Node(
            id=node_id or new_id(),
            user_id=user_id,
            provider=provider,
            endpoint=endpoint,
            region=region,
            status=status,
            capabilities=capabilities,
            metrics_current=None,
            credentials=credentials or {},
            fingerprint=fingerprint,
            cert_serial=cert_serial,
            created_at=created_at or utcnow(),
        )
        if session is not None:
            session.add(node)
            await session.flush()
            return node
        try:
            async with self._store.session() as own:
                own.add(node)
        except IntegrityError:
            error = await self.already_registered(user_id, fingerprint)
            if error is None:
                raise
            raise error from None
        return node

    async def already_registered(self, user_id: str, fingerprint: str | None) -> AlreadyExists | None:
        """The ``AlreadyExists`` error for a second registration of ``fingerprint``, or None."""
        if not fingerprint:
            return None
        existing = await self.get_by_fingerprint(user_id, fingerprint)
        if existing is None:
            return None
        return AlreadyExists(
            "This node is already registered",
            reason=REASON_ALREADY_REGISTERED,
            metadata={"node_id": existing.id},
        )

    async def delete(self, node_id: str) -> bool:
        """Delete a node row outright (undoing a failed registration); True if it existed."""
        async with self._store.session() as session:
            result = cast(
                CursorResult[Any],
                await session.execute(
                    delete(Node).where(Node.id == node_id).execution_options(synchronize_session=False)
                ),
            )
        return result.rowcount == 1

    # -- reading --------------------------------------------------------------------------------

    async def get(self, node_id: str) -> Node | None:
        """The node with this id, whoever owns it (for node-authenticated calls), or None."""
        async with self._store.session() as session:
            return await session.get(Node, node_id)

    async def get_for_user(self, user_id: str, node_id: str) -> Node | None:
        """The node if it exists *and* belongs to ``user_id``; None otherwise (indistinguishable)."""
        async with self._store.session() as session:
            result = await session.execute(select(Node).where(Node.id == node_id, Node.user_id == user_id))
            return result.scalar_one_or_none()

    async def get_by_fingerprint(self, user_id: str, fingerprint: str) -> Node | None:
        """``user_id``'s node registered with this installation fingerprint, or None."""
        async with self._store.session() as session:
            result = await session.execute(
                select(Node).where(Node.user_id == user_id, Node.fingerprint == fingerprint)
            )
            return result.scalar_one_or_none()

    async def get_by_certificate(self, node_id: str, cert_serial: str) -> Node | None:
        """The node if it is not removed and ``cert_serial`` is its current certificate, else None.

        What the node-facing port checks after the TLS handshake proved ``node_id``.
        """
        if not cert_serial:
            return None
        async with self._store.session() as session:
            result = await session.execute(
                select(Node).where(
                    Node.id == node_id, Node.cert_serial == cert_serial, Node.status != STATUS_REMOVED
                )
            )
            return result.scalar_one_or_none()

    async def list_for_user(
        self,
        user_id: str,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        *,
        include_removed: bool = False,
    ) -> tuple[list[Node], str]:
        """One page of ``user_id``'s nodes, oldest first, and the token of the next page.

        ``page_size`` 0 means 50; above 500 it is clamped to 500; negative is
        ``InvalidArgument`` (field ``page_size``). An empty next token means this was
        the last page. Removed nodes are left out unless ``include_removed``.
        """
        statement = select(Node).where(Node.user_id == user_id)
        if not include_removed:
            statement = statement.where(Node.status != STATUS_REMOVED)
        return await keyset_page(self._store, statement, Node, page_size, page_token)

    async def list_active(self) -> list[Node]:
        """Every node that is not removed (for the health monitor at start-up)."""
        async with self._store.session() as session:
            result = await session.execute(
                select(Node).where(Node.status != STATUS_REMOVED).order_by(Node.created_at, Node.id)
            )
            return list(result.scalars())

    async def count_for_user(self, user_id: str, statuses: Sequence[str] | None = None) -> int:
        """How many of ``user_id``'s nodes there are (optionally only in ``statuses``)."""
        statement = select(func.count()).select_from(Node).where(Node.user_id == user_id)
        if statuses is not None:
            statement = statement.where(Node.status.in_(list(statuses)))
        async with self._store.session() as session:
            return int(await session.scalar(statement) or 0)

    # -- writing --------------------------------------------------------------------------------

    async def update_status(self, node_id: str, status: str, *, now: datetime | None = None) -> bool:
        """Set the node's status; False if there is no such node or it is removed.

        ``removed`` is terminal: use :meth:`mark_removed` to remove a node. ``now`` is
        the time of the change (default: the current time), for the log; the schema
        keeps no status timestamp.
        """
        _check_status(status)
        if status == STATUS_REMOVED:
            return await self.mark_removed(node_id, now)
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(Node).where(Node.id == node_id, Node.status != STATUS_REMOVED).values(status=status),
            )
        if changed:
            log.debug("node %s is now %s (at %s)", node_id, status, (now or utcnow()).isoformat())
        return changed == 1

    async def record_heartbeat(
        self, node_id: str, *, last_heartbeat: datetime, metrics: dict[str, Any] | None = None
    ) -> bool:
        """Write the node's latest heartbeat time and, if given, its current metrics.

        Never moves ``last_heartbeat`` backwards (an older write arriving late is
        ignored) and never touches a removed node; False in those cases.
        """
        values: dict[str, Any] = {"last_heartbeat": last_heartbeat}
        if metrics is not None:
            values["metrics_current"] = metrics
            values["last_metrics_update"] = last_heartbeat
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(Node)
                .where(
                    Node.id == node_id,
                    Node.status != STATUS_REMOVED,
                    or_(Node.last_heartbeat.is_(None), Node.last_heartbeat <= last_heartbeat),
                )
                .values(**values),
            )
        return changed == 1

    async def record_states(
        self,
        rows: Sequence[tuple[str, str, datetime | None, dict[str, Any] | None]],
        holder: str | None = None,
    ) -> None:
        """Many nodes' state changes in one transaction (one commit): what the fleet writes.

        Each row is ``(node_id, status, last_heartbeat, metrics)``, applied like
        :meth:`update_status` (not ``removed``: use :meth:`mark_removed`) followed by
        :meth:`record_heartbeat` when ``last_heartbeat`` is given. One ``executemany``
        per statement shape, not one round trip per node: on SQLite the transaction
        holds the store's only write gate for as long as it runs. With ``holder`` (a
        controller's id), a status is written only where that controller watches the node
        (or none does): a controller that lost a node to another cannot overwrite its state.
        """
        if not rows:
            return
        for _, status, _, _ in rows:
            _check_status(status)
            if status == STATUS_REMOVED:
                raise ValueError("record_states cannot remove a node: use mark_removed")
        statuses = [{"b_id": node_id, "b_status": status} for node_id, status, _, _ in rows]
        if holder is not None:
            for values in statuses:
                values["b_holder"] = holder
        beats = [(node_id, beat, metrics) for node_id, _, beat, metrics in rows if beat is not None]
        async with self._store.session() as session:
            connection = await session.connection()
            await connection.execute(_SET_STATUS if holder is None else _SET_STATUS_WATCHED, statuses)
            await _write_heartbeats(connection, beats)

    async def record_heartbeats(self, rows: Sequence[tuple[str, datetime, dict[str, Any] | None]]) -> None:
        """:meth:`record_heartbeat` for many nodes in one transaction: ``(node_id, last_heartbeat, metrics)``."""
        if not rows:
            return
        async with self._store.session() as session:
            await _write_heartbeats(await session.connection(), rows)

    async def set_certificate(self, node_id: str, serial: str) -> bool:
        """Record the serial (hex) of the node's current certificate; False if no such live node."""
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(Node)
                .where(Node.id == node_id, Node.status != STATUS_REMOVED)
                .values(cert_serial=serial),
            )
        return changed == 1

    async def mark_removed(self, node_id: str, now: datetime | None = None) -> bool:
        """Remove the node: status ``removed``, certificate serial and fingerprint cleared.

        Clearing the serial makes the node's certificate unacceptable; clearing the
        fingerprint lets the same installation enroll again later (as a new node, with
        a new token) instead of being told forever that it is already registered.
        Idempotent; False if there is no such node. ``now`` is the time of removal
        (default: the current time), for the log.
        """
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(Node)
                .where(Node.id == node_id)
                .values(status=STATUS_REMOVED, cert_serial=None, fingerprint=None),
            )
        if changed:
            log.info("node %s removed at %s", node_id, (now or utcnow()).isoformat())
        return changed == 1

    async def record_stream_holders(self, holder: str, held: Sequence[str]) -> None:
        """Controller ``holder`` holds the streams of ``held`` now: it watches those nodes
        (``stream_holder``; :mod:`controller.nodes.watchers`). One transaction."""
        async with self._store.session() as session:
            for start in range(0, len(held), HOLDER_BATCH):
                await session.execute(
                    update(Node)
                    .where(Node.id.in_(held[start : start + HOLDER_BATCH]))
                    .values(stream_holder=holder)
                )

    async def watch_rows(self, not_by: str) -> list[tuple[str, str, str, datetime | None, str | None]]:
        """``(id, user_id, status, last_heartbeat, stream_holder)`` of every node not removed
        and not watched by ``not_by`` (a controller alone reads only its never-connected nodes)."""
        async with self._store.session() as session:
            rows = await session.execute(
                select(Node.id, Node.user_id, Node.status, Node.last_heartbeat, Node.stream_holder).where(
                    Node.status != STATUS_REMOVED,
                    or_(Node.stream_holder.is_(None), Node.stream_holder != not_by),
                )
            )
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def states_of(self, node_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """``{node id: (status, stream_holder)}`` of these nodes (what the reconciler needs of
        nodes another controller watches)."""
        found: dict[str, tuple[str, str | None]] = {}
        ids = list(node_ids)
        async with self._store.session() as session:
            for start in range(0, len(ids), HOLDER_BATCH):
                rows = await session.execute(
                    select(Node.id, Node.status, Node.stream_holder).where(
                        Node.id.in_(ids[start : start + HOLDER_BATCH])
                    )
                )
                found.update({r[0]: (r[1], r[2]) for r in rows})
        return found

    async def claim_watch(self, node_id: str, holder: str, was: str) -> bool:
        """Make ``holder`` the node's watcher if its watcher is still ``was`` (a controller
        that is gone); whether it did."""
        async with self._store.session() as session:
            changed = await execute_update(
                session,
                update(Node)
                .where(Node.id == node_id, Node.status != STATUS_REMOVED, Node.stream_holder == was)
                .values(stream_holder=holder),
            )
        return changed == 1

    async def stream_holder(self, node_id: str) -> str | None:
        """The controller watching the node (the last to hold its stream), None if none
        ever did (one small read)."""
        async with self._store.session() as session:
            holder: str | None = (
                await session.execute(select(Node.stream_holder).where(Node.id == node_id))
            ).scalar_one_or_none()
        return holder


HOLDER_BATCH = 500
"""Node ids per ``IN`` list when stream holders are written."""

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "REASON_ALREADY_REGISTERED",
    "STATUSES",
    "STATUS_INITIALIZING",
    "STATUS_REMOVED",
    "NodeRepository",
    "decode_page_token",
    "encode_page_token",
]
