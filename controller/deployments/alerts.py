"""Alerts: what an operator of a user's fleet should know, stored and listed.

Raised by:

* the health monitor, when a mass failure freezes recovery for the user
  (``mass_failure``; it applies while the freeze holds: it is *resolved* when the
  user lifts it with ``UnfreezeRecovery``, and no longer *active* once the nodes
  came back and the freeze lifted by itself);
* the deployments code, when an initial rollout fails and is rolled back
  (``rollout_failed``) or a rolling update reverts to the last good version
  (``update_reverted``). These record an event: they are never *active*.

Each alert is a row of the ``alerts`` table (migration 0006) owned by one user:
``ListAlerts`` shows the caller's own only. A store that is briefly down loses
the alert (it is still logged) but never breaks the path that raised it.
"""

from __future__ import annotations

import logging

from automator67.v1 import node_pb2
from sqlalchemy import select, update

from controller.nodes.fleet import Fleet
from controller.store.db import Store
from controller.store.models import Alert, utcnow
from controller.store.paging import keyset_page
from controller.timestamps import timestamp

log = logging.getLogger("a67.alerts")

MASS_FAILURE = "mass_failure"
ROLLOUT_FAILED = "rollout_failed"
UPDATE_REVERTED = "update_reverted"
MAX_MESSAGE_CHARS = 4000
"""Longer messages are cut (a rollout failure lists every replica's reason)."""


class Alerts:
    """The store of alerts, with the fleet to tell whether a freeze still holds."""

    def __init__(self, store: Store, fleet: Fleet) -> None:
        self._store = store
        self._fleet = fleet

    async def add(self, user_id: str, kind: str, message: str, *, deployment_id: str | None = None) -> None:
        """Store an alert (logged as well); a store error is logged, never raised."""
        log.warning("alert for user %s (%s): %s", user_id, kind, message)
        row = Alert(
            user_id=user_id,
            kind=kind,
            message=message[:MAX_MESSAGE_CHARS],
            deployment_id=deployment_id,
            created_at=utcnow(),
        )
        try:
            async with self._store.session() as session:
                session.add(row)
        except Exception:
            log.warning("could not store an alert for user %s", user_id, exc_info=True)

    async def on_fleet_alert(self, user_id: str, message: str) -> None:
        """The fleet's alert hook: the monitor froze recovery for ``user_id``."""
        await self.add(user_id, MASS_FAILURE, message)

    async def resolve(self, user_id: str, kind: str) -> int:
        """Mark the user's unresolved alerts of ``kind`` resolved; how many were."""
        async with self._store.session() as session:
            result = await session.execute(
                update(Alert)
                .where(Alert.user_id == user_id, Alert.kind == kind, Alert.resolved_at.is_(None))
                .values(resolved_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def page(self, user_id: str, page_size: int, page_token: str) -> tuple[list[Alert], str]:
        """One page of the user's alerts, oldest first (pagination as every List RPC)."""
        statement = select(Alert).where(Alert.user_id == user_id)
        return await keyset_page(self._store, statement, Alert, page_size, page_token)

    def to_proto(self, row: Alert) -> node_pb2.Alert:
        active = (
            row.kind == MASS_FAILURE
            and row.resolved_at is None
            and row.user_id in self._fleet.monitor.frozen_users
        )
        return node_pb2.Alert(
            id=row.id,
            kind=row.kind,
            message=row.message,
            deployment_id=row.deployment_id or "",
            created_at=timestamp(row.created_at),
            resolved_at=timestamp(row.resolved_at),
            active=active,
        )
