"""Deployment work leases: one controller at a time works on a deployment.

A rollout, a rolling update, a retry or a recovery of a deployment's replicas is
work that must happen once, though every controller sharing the store can start
it (the one that served the user's call, or whichever reconciler notices). The
lease is two columns of the deployment's row — ``lease_owner`` (a controller's
id) and ``lease_until`` — written like any other change: conditionally on the
row's version (``updated_at``), so two controllers racing for it cannot both
win, and a controller that was paused past its lease (SIGSTOP, a partition)
and resumes finds its next write refused (the new holder's acquisition changed
the row) and, on reading the row again, that the lease is no longer its own:
:class:`LeaseLost` ends its task before it changes anything. Commands it sent
before noticing are fenced by generation, as always.

Within one controller the lease is shared by every task working on the
deployment (a count); it is renewed by each write those tasks make and by a
renewer while they wait on nodes, and given back when the last one ends. A
controller that dies simply stops renewing: after ``lease_seconds`` another
controller's reconciler takes the deployment over (resumes its rollout, retries
its replicas). Times are the controllers' wall clocks: the lease (15 s by
default) must be much longer than their skew (NTP keeps it to milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from controller.deployments.repository import Conflict
from controller.store.models import Deployment

if TYPE_CHECKING:
    from controller.deployments.harness import Harness

log = logging.getLogger("a67.deployments")

LEASE_SECONDS = 15.0
"""How long a deployment's lease lasts without renewal (a dead controller's work resumes
elsewhere after this)."""

WORKING_ON: ContextVar[frozenset[str]] = ContextVar("a67_deployment_leases", default=frozenset())
"""The deployments the current task works on under this controller's lease (tasks it
starts inherit it): their writes renew the lease, and fail with :class:`LeaseLost` once
another controller holds it."""


class LeaseLost(Exception):
    """Another controller holds the deployment's lease now: this controller's task ends."""


def default_controller_id() -> str:
    """A controller process's id: host, pid and a random part (unique across restarts)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def held_elsewhere(owner: str | None, until: datetime | None, me: str, now: datetime) -> bool:
    """Whether a lease (``owner`` until ``until``) keeps controller ``me`` off at ``now``."""
    return bool(owner) and owner != me and until is not None and until > now


class Leases:
    """This controller's deployment leases (see the module's docstring)."""

    def __init__(self, harness: Harness, controller_id: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self.h = harness
        self.me = controller_id
        self.seconds = lease_seconds
        self.held: dict[str, int] = {}
        """Deployment id -> how many of this controller's tasks work on it under its lease."""
        self._renewer: asyncio.Task[None] | None = None

    def elsewhere(self, row: Deployment) -> bool:
        """Whether another controller holds ``row``'s lease now."""
        return held_elsewhere(row.lease_owner, row.lease_until, self.me, self.h.wall())

    def _fresh(self, row: Deployment, now: datetime) -> bool:
        """Whether ``row`` holds this controller's lease, renewed within the last third of it."""
        return (
            row.lease_owner == self.me
            and row.lease_until is not None
            and row.lease_until - now > timedelta(seconds=self.seconds * 2 / 3)
        )

    def stamp(self, row: Deployment) -> None:
        """Before a write of a task working under the lease (``WORKING_ON``): renew it, or
        :class:`LeaseLost` if another controller holds it now."""
        if row.id not in WORKING_ON.get():
            return
        now = self.h.wall()
        if held_elsewhere(row.lease_owner, row.lease_until, self.me, now):
            raise LeaseLost(f"deployment {row.id} is worked on by controller {row.lease_owner} now")
        row.lease_owner = self.me
        row.lease_until = now + timedelta(seconds=self.seconds)

    async def acquire(self, deployment_id: str) -> bool:
        """Take (or share) the deployment's lease; False if another controller holds it or the
        deployment is gone."""
        h = self.h
        if self.held.get(deployment_id, 0) > 0:
            self.held[deployment_id] += 1
            return True
        async with h.locks[deployment_id]:
            for attempt in range(2):
                row = await h.row(deployment_id)
                if row is None:
                    return False
                now = h.wall()
                if held_elsewhere(row.lease_owner, row.lease_until, self.me, now):
                    if attempt == 0:
                        h.drop_row(deployment_id)  # the copy may be old: read the store's
                        continue
                    return False
                if self._fresh(row, now):
                    break  # taken when the row was written (a create): nothing to write
                row.lease_owner = self.me
                row.lease_until = now + timedelta(seconds=self.seconds)
                try:
                    await h.save(row)
                except Conflict:
                    if attempt == 0:
                        continue  # read it again: another controller may have taken it
                    return False
                break
            self.held[deployment_id] = self.held.get(deployment_id, 0) + 1
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew())
        return True

    def release(self, deployment_id: str) -> None:
        """One task stopped working on the deployment; the last one gives the lease back."""
        left = self.held.get(deployment_id, 0) - 1
        if left > 0:
            self.held[deployment_id] = left
            return
        self.held.pop(deployment_id, None)
        self.h.spawn(self._give_back(deployment_id))

    async def _give_back(self, deployment_id: str) -> None:
        h = self.h
        async with h.locks[deployment_id]:
            if self.held.get(deployment_id, 0) > 0:
                return  # taken again meanwhile
            for attempt in range(2):
                row = await h.row(deployment_id)
                if row is None or row.lease_owner != self.me:
                    return
                row.lease_owner = None
                row.lease_until = None
                try:
                    await h.save(row)
                except Conflict:
                    if attempt == 0:
                        continue
                return

    async def give_back_all(self) -> None:
        """On a graceful stop (its tasks cancelled): give back every lease this controller holds
        in the store, so that another controller takes its work over at once."""
        self.held.clear()
        self.h.rows.clear()  # the rows' versions change
        try:
            released = await self.h.repo.release_leases(self.me)
        except Exception:  # they expire by themselves
            log.warning("giving back the deployment leases failed", exc_info=True)
            return
        if released:
            log.info("gave back the leases of %d deployment(s)", released)

    @contextlib.asynccontextmanager
    async def working_on(self, deployment_id: str, *, wait: bool = False) -> AsyncIterator[bool]:
        """Work on the deployment under its lease; yields False (and nothing is held) if another
        controller holds it — after waiting up to two lease times for it if ``wait``."""
        got = await self.acquire(deployment_id)
        if not got and wait:
            step = min(1.0, self.seconds / 3)
            for _ in range(int(2 * self.seconds / step) + 1):
                if got or self.h.closing:
                    break
                await asyncio.sleep(step)
                got = await self.acquire(deployment_id)
        if not got:
            yield False
            return
        token = WORKING_ON.set(WORKING_ON.get() | {deployment_id})
        try:
            yield True
        finally:
            WORKING_ON.reset(token)
            self.release(deployment_id)

    async def _renew(self) -> None:
        """Renew the held leases that no write renewed lately, while any is held."""
        h = self.h
        while self.held and not h.closing:
            await asyncio.sleep(self.seconds / 3)
            for deployment_id in list(self.held):
                try:
                    await self._renew_one(deployment_id)
                except Exception:  # the next round tries again; a lost lease shows at the next write
                    log.warning("renewing the lease of deployment %s failed", deployment_id, exc_info=True)

    async def _renew_one(self, deployment_id: str) -> None:
        h = self.h
        async with h.locks[deployment_id]:
            if deployment_id not in self.held:
                return
            row = await h.row(deployment_id)
            if row is None:
                return
            now = h.wall()
            if held_elsewhere(row.lease_owner, row.lease_until, self.me, now):
                log.warning(
                    "deployment %s: lease lost to controller %s; this controller's work on it ends",
                    deployment_id,
                    row.lease_owner,
                )
                return
            if self._fresh(row, now):
                return
            row.lease_owner = self.me
            row.lease_until = now + timedelta(seconds=self.seconds)
            with contextlib.suppress(Conflict):  # changed meanwhile: read again next round
                await h.save(row)
