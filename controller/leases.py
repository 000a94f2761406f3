"""Leases of the fleet-wide loops: the work that must happen once among the controllers
sharing a store.

The deployments' reconciler, the federated transactions' recovery, storage garbage
collection and the vault's key rewrap each run in every controller process, but only the
one holding the loop's lease does a pass. A lease is a row of ``loop_leases``: its holder
(a controller's id), until when, and a **fencing token** that grows by one at every
change of holder (Chubby's sequencers, Kleppmann's fencing tokens).

* :meth:`LoopLeases.turn` before each pass: renews this controller's lease, or takes a
  free or expired one, or its own from before a restart (a controller keeps its id across
  restarts), with a new token; or answers None (another controller holds it:
  skip the pass). Both are one conditional ``UPDATE``, so two controllers racing for a
  lease cannot both win (PostgreSQL re-checks the condition on the row it waited for;
  SQLite runs one writer at a time).
* :meth:`Fence.guard` inside a pass's own store transaction: the transaction goes on only
  while the lease row still names this holder and token and has not expired, and it holds
  the row until it commits (PostgreSQL: a row lock; SQLite: the write lock), so a
  controller taking the lease over waits for it. A controller paused past its lease
  (SIGSTOP, a VM freeze, a partition) that resumes in the middle of a pass finds its next
  guarded write refused (:class:`LeaseLost`) and ends the pass without writing.
* :meth:`LoopLeases.release` on a graceful stop: the lease expires at once, so another
  controller takes it on its next turn instead of waiting it out.

Times are the controllers' wall clocks (like the deployments' leases): a lease must be
much longer than their skew. One controller alone takes every lease on its first turn;
the cost is one small write per pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.db import Store
from controller.store.models import LoopLease, utcnow

log = logging.getLogger("a67.leases")

MIN_LEASE_SECONDS = 15.0
"""The shortest lease a loop gets, whatever its interval: a dead controller's loops move to
another controller after at most this long plus one interval."""


class LeaseLost(Exception):
    """Another controller holds the loop's lease now (or it expired): the pass ends."""


def lease_seconds(interval_seconds: float) -> float:
    """A loop's lease for a pass every ``interval_seconds``: three intervals (a holder
    renews at every pass, so one slow pass does not lose it), at least
    :data:`MIN_LEASE_SECONDS`.

    >>> lease_seconds(1.0), lease_seconds(30.0)
    (15.0, 90.0)
    """
    return max(MIN_LEASE_SECONDS, 3 * interval_seconds)


@dataclass(frozen=True)
class Fence:
    """This controller's hold on a loop's lease: the token its writes are fenced with."""

    name: str
    holder: str
    token: int
    wall: Callable[[], datetime]
    seconds: float
    """The lease's length: on PostgreSQL, a guarded transaction left idle this long (its
    controller paused in the middle of it) is ended by the server, which frees the lease
    row for the controller taking over."""

    async def guard(self, session: AsyncSession) -> None:
        """Go on with ``session``'s transaction only while this lease holds (see the module
        docstring); :class:`LeaseLost` otherwise (the caller's transaction rolls back)."""
        if session.get_bind().dialect.name == "postgresql":
            ms = max(1, int(self.seconds * 1000))
            await session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {ms}"))
        result = await session.execute(
            update(LoopLease)
            .where(
                LoopLease.name == self.name,
                LoopLease.holder == self.holder,
                LoopLease.token == self.token,
                LoopLease.expires_at > self.wall(),
            )
            .values(token=LoopLease.token)  # a write: the row is held until the commit
        )
        if getattr(result, "rowcount", 1) != 1:
            raise LeaseLost(f"the lease of {self.name!r} (token {self.token}) is no longer this controller's")


class LoopLeases:
    """The loop leases of one controller (see the module docstring)."""

    def __init__(self, store: Store, holder: str, *, wall: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.holder = holder
        self.wall = wall
        self._held: dict[str, Fence] = {}
        """The leases this controller held at its last turn, by name."""

    def held(self, name: str) -> Fence | None:
        """This controller's fence for ``name`` as of its last turn (no store read)."""
        return self._held.get(name)

    async def turn(self, name: str, seconds: float) -> Fence | None:
        """Renew or take the lease of loop ``name`` for ``seconds``; None if another
        controller holds it (this controller skips the pass)."""
        now = self.wall()
        until = now + timedelta(seconds=seconds)
        async with self.store.session() as session:
            fence = self._held.get(name)
            token = None if fence is None else fence.token
            if token is not None:
                renewed = await session.execute(
                    update(LoopLease)
                    .where(
                        LoopLease.name == name,
                        LoopLease.holder == self.holder,
                        LoopLease.token == token,
                        LoopLease.expires_at > now,
                    )
                    .values(expires_at=until)
                )
                if getattr(renewed, "rowcount", 0) == 1:
                    return Fence(name, self.holder, token, self.wall, seconds)
            taken = await session.execute(
                update(LoopLease)
                .where(
                    LoopLease.name == name,
                    # expired, or this controller's (restarted under the same id): a new token
                    (LoopLease.expires_at <= now) | (LoopLease.holder == self.holder),
                )
                .values(holder=self.holder, token=LoopLease.token + 1, acquired_at=now, expires_at=until)
            )
            if getattr(taken, "rowcount", 0) == 1:
                token = (
                    await session.execute(select(LoopLease.token).where(LoopLease.name == name))
                ).scalar_one()
            elif (
                await session.execute(select(LoopLease.holder).where(LoopLease.name == name))
            ).scalar_one_or_none() is not None:
                self._lost(name)
                return None
            else:
                token = None  # no row yet: made below
        if token is None:
            token = 1
            try:
                async with self.store.session() as session:
                    session.add(
                        LoopLease(
                            name=name, holder=self.holder, token=token, acquired_at=now, expires_at=until
                        )
                    )
            except IntegrityError:  # another controller made it first
                self._lost(name)
                return None
        if fence is None or fence.token != token:
            log.info("this controller runs the %s loop now (lease token %d)", name, token)
        fence = self._held[name] = Fence(name, self.holder, token, self.wall, seconds)
        return fence

    def _lost(self, name: str) -> None:
        if self._held.pop(name, None) is not None:
            log.warning("another controller runs the %s loop now: this one stops running it", name)
        return None

    async def release(self) -> None:
        """Graceful stop: end every lease this controller holds, so others take them at once."""
        held, self._held = self._held, {}
        if not held:
            return
        now = self.wall()
        try:
            async with self.store.session() as session:
                for name, fence in held.items():
                    await session.execute(
                        update(LoopLease)
                        .where(
                            LoopLease.name == name,
                            LoopLease.holder == self.holder,
                            LoopLease.token == fence.token,
                        )
                        .values(expires_at=now)
                    )
        except Exception:
            log.warning("giving back the loop leases failed (they expire on their own)", exc_info=True)


async def my_turn(leases: LoopLeases | None, name: str, interval_seconds: float) -> Fence | bool:
    """Whether this controller runs loop ``name``'s pass now: its fence (the lease renewed
    or taken), False if another controller holds the lease, True with no leases (tests)."""
    if leases is None:
        return True
    fence = await leases.turn(name, lease_seconds(interval_seconds))
    return False if fence is None else fence
