"""The secret audit log: every decryption of a secret, append-only (issue 16).

:class:`~controller.vault.Vault` calls its auditor after every successful
``decrypt`` and ``rewrap`` (which authenticates, and so opens, the payload). An event
says *who or what* (``user:<id>`` for a signed-in user's request, ``node:<id>`` for a
node, else ``controller``), *which secret* (its vault owner and purpose, and the
master key id; never its value), *why* (the reason set with :func:`audit_context`,
else the code that asked, e.g. ``DeploymentService._start_replica``) and *when*.

Events are queued in memory by the (synchronous) vault call and written in batches
by :class:`SecretAuditLog`'s writer task (every :data:`FLUSH_SECONDS`, and at stop);
the user a secret belongs to is resolved from its owner then (``user:<id>``, or the
node, deployment or database of that id). The table refuses UPDATE and DELETE
(triggers of migration 0007). If the store cannot take events and the queue reaches
:data:`MAX_BACKLOG`, decryption fails closed (:class:`AuditUnavailable`) rather than go
unrecorded. A crash loses at most the events of the last flush interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select

from controller.store.db import Store
from controller.store.models import DatabaseInstance, Deployment, Node, SecretAuditEvent, new_id

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2
"""How often queued events are written."""

MAX_BACKLOG = 200_000
"""Queued events beyond which decryption is refused (the store is not taking events)."""

_BATCH = 2000
_RESOLVED_CACHE = 50_000

_actor: ContextVar[str | None] = ContextVar("a67_audit_actor", default=None)
_reason: ContextVar[str | None] = ContextVar("a67_audit_reason", default=None)


class AuditUnavailable(Exception):
    """The audit log cannot record decryptions now, so none are made."""


@contextlib.contextmanager
def audit_context(*, actor: str | None = None, reason: str | None = None) -> Iterator[None]:
    """Within the block, decryptions are recorded with this actor and/or reason."""
    tokens = []
    if actor is not None:
        tokens.append((_actor, _actor.set(actor)))
    if reason is not None:
        tokens.append((_reason, _reason.set(reason)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _current_actor() -> str:
    actor = _actor.get()
    if actor is not None:
        return actor
    from controller.api.context import _principal

    principal = _principal.get()
    return f"user:{principal.user_id}" if principal is not None else "controller"


def _caller(depth: int) -> str:
    """``Class.method`` of the code that asked the vault (the default reason)."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return "controller"
    while frame is not None and frame.f_globals.get("__name__", "").startswith("controller.vault"):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "controller"
    return str(frame.f_code.co_qualname)[:200]


@dataclass(frozen=True)
class AuditEvent:
    actor: str
    owner: str
    purpose: str
    key_id: str
    reason: str
    at: datetime


class SecretAuditLog:
    """Queues decryption events and writes them to ``secret_audit_events``."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._queue: list[AuditEvent] = []
        self._owners: dict[str, str | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.written = 0

    # -- recording (synchronous: called from inside the vault) ---------------------

    def record(self, owner: str, purpose: str, key_id: str, operation: str) -> None:
        """Queue one event; :class:`AuditUnavailable` if the backlog is full."""
        if len(self._queue) >= MAX_BACKLOG:
            raise AuditUnavailable("the secret audit log is not being written; decryption refused")
        reason = _reason.get()
        if reason is None:
            reason = _caller(3)
        if operation != "decrypt":
            reason = f"{operation}: {reason}" if _reason.get() is None else reason
        self._queue.append(
            AuditEvent(
                actor=_current_actor(),
                owner=owner,
                purpose=purpose,
                key_id=key_id,
                reason=reason[:255],
                at=datetime.fromtimestamp(self._clock(), UTC),
            )
        )

    @property
    def backlog(self) -> int:
        return len(self._queue)

    # -- writing --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="secret-audit-writer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:  # the store is down: keep the queue, try again
                log.warning("cannot write the secret audit log yet: %s", type(exc).__name__)

    async def flush(self) -> int:
        """Write every queued event; how many were written."""
        async with self._lock:
            total = 0
            while self._queue:
                batch = self._queue[:_BATCH]
                users = await self._resolve({e.owner for e in batch})
                rows: list[dict[str, Any]] = [
                    {
                        "id": new_id(),
                        "user_id": users.get(e.owner),
                        "actor": e.actor,
                        "secret_owner": e.owner[:255],
                        "secret_purpose": e.purpose[:255],
                        "key_id": e.key_id,
                        "reason": e.reason,
                        "created_at": e.at,
                    }
                    for e in batch
                ]
                async with self._store.session() as session:
                    await session.execute(insert(SecretAuditEvent), rows)
                del self._queue[: len(batch)]
                total += len(batch)
                self.written += len(batch)
            return total

    async def _resolve(self, owners: set[str]) -> dict[str, str | None]:
        """The user each owner belongs to (None if none)."""
        result: dict[str, str | None] = {}
        unknown: list[str] = []
        for owner in owners:
            if owner.startswith("user:"):
                result[owner] = owner[5:]
            elif owner in self._owners:
                result[owner] = self._owners[owner]
            else:
                unknown.append(owner)
        if unknown:
            async with self._store.session() as session:
                for model in (Node, Deployment, DatabaseInstance):
                    missing = [o for o in unknown if o not in result]
                    if not missing:
                        break
                    for chunk in range(0, len(missing), 500):
                        rows = await session.execute(
                            select(model.id, model.user_id).where(model.id.in_(missing[chunk : chunk + 500]))
                        )
                        for owner_id, user_id in rows.all():
                            result[owner_id] = user_id
            for owner in unknown:
                result.setdefault(owner, None)
                if len(self._owners) >= _RESOLVED_CACHE:
                    self._owners.clear()
                self._owners[owner] = result[owner]
        return result

    # -- reading --------------------------------------------------------------------

    async def list_for_user(
        self, user_id: str, *, page_size: int = 100, before_seq: int | None = None
    ) -> tuple[list[SecretAuditEvent], int | None]:
        """The user's events, newest first, and the ``seq`` to continue before (or None)."""
        await self.flush()
        page_size = max(1, min(page_size, 1000))
        query = select(SecretAuditEvent).where(SecretAuditEvent.user_id == user_id)
        if before_seq is not None:
            query = query.where(SecretAuditEvent.seq < before_seq)
        query = query.order_by(SecretAuditEvent.seq.desc()).limit(page_size + 1)
        async with self._store.session() as session:
            rows = list((await session.execute(query)).scalars())
        more = len(rows) > page_size
        rows = rows[:page_size]
        return rows, (rows[-1].seq if more and rows else None)


__all__ = ["AuditUnavailable", "SecretAuditLog", "audit_context"]
