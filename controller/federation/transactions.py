"""Transactions on federated databases: held shard transactions and two-phase commit.

A transaction (``BeginTransaction``) is bound to its caller and database. Each
statement (``ExecuteQuery`` with ``transaction_id``) runs on the primaries of the
shards it routes to, in a transaction the agent holds open on that shard
(``shard_transaction`` commands, :mod:`controller.agent.shards`). A transaction that
is not ``distributed`` stays on one shard: a statement that would touch a second is
refused (``FAILED_PRECONDITION``, reason ``TRANSACTION_SPANS_SHARDS``).

Commit
    One shard: the shard commits (one phase). Several shards: **two-phase commit**
    coordinated here, with the store's ``database_transactions`` table as the
    durable decision log:

    1. ``state = preparing`` (the participants were logged before each shard was
       first sent a statement);
    2. ``PREPARE`` on every participant (PostgreSQL ``PREPARE TRANSACTION``; SQLite:
       an fsynced redo log on the agent); any failure → ``aborted`` → ``ROLLBACK``;
    3. ``state = committed`` — **the commit point**;
    4. ``COMMIT`` on every participant; then ``resolved_at``.

Recovery (presumed abort)
    :meth:`TransactionManager.recover` reads every unresolved row — at start and every
    :data:`RECOVERY_INTERVAL_SECONDS` — except the transactions this controller is
    still running. An ``active``/``preparing`` row becomes ``aborted`` when the
    controller that ran it (the row's ``controller_id``) is gone: this controller
    before a restart (a controller keeps its id), a row from before migration 0013
    (no ``controller_id``), or a controller no longer serving the store
    (:func:`controller.registry.live_controllers`, read at most once per pass and only
    when a row of another controller is in question); another live controller's
    transactions are left to it. The abort is conditional (the row must still be in
    the state read), and so are this controller's own steps of a commit (``preparing``
    only from ``active``, ``committed`` only from ``preparing``): a controller taken
    for gone (paused past the stale time) that resumes finds its transaction aborted
    and rolls it back instead of committing it. Then the outcome (``COMMIT`` for
    ``committed``, ``ROLLBACK`` for ``aborted``) is sent to every participant until
    each has acknowledged it, whichever controller decided it. Agents
    treat the outcome of a transaction they do not know as already applied, and a
    restarted agent brings back its prepared SQLite transactions from their redo logs
    before it runs anything else on the shard, so every crash point — before prepare,
    after some prepares, after the decision, after some commits, of the controller or
    of an agent — ends with every participant committed or every one rolled back.
    Resolved rows are deleted :data:`DECISION_LOG_RETENTION` (7 days) after resolution.
    A :class:`TransactionLog` without a controller id (tests, tools) is the only
    controller on its store: every unresolved row not running here is its own.

Timeouts
    A transaction idle for ``idle_timeout_ms`` (default 60 s), or not committed
    within ``timeout_ms`` (default 10 min), is rolled back by :meth:`reap` (on an
    injected clock). Agents roll back an open, unprepared shard transaction on their
    own after twice the idle timeout plus 30 s, and as soon as their stream to the
    controller is replaced, so a shard is never held for a controller that went away
    (a one-phase COMMIT the shard no longer knows is therefore an abort, never a
    success). Any failed statement rolls the whole transaction back.

Not found
    Another user's transaction id, or one of another database, is ``NOT_FOUND``
    (reason ``TRANSACTION_NOT_FOUND``), exactly like a missing one; the database is
    checked first and a foreign database stays ``PERMISSION_DENIED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from automator67.v1 import node_pb2
from sqlalchemy import delete, select, update

from controller.errors import (
    Aborted,
    ControllerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from controller.federation.query import ShardError, ShardResult
from controller.federation.results import ShardResults
from controller.federation.shards import ResultCaps, collect, open_rows
from controller.nodes.sessions import StreamRegistry
from controller.registry import STALE_SECONDS, live_controllers
from controller.store.db import Store
from controller.store.models import DatabaseTransaction, utcnow
from controller.wire import decode_result

log = logging.getLogger("a67.federation.transactions")

DEFAULT_IDLE_TIMEOUT_MS = 60_000
DEFAULT_TIMEOUT_MS = 600_000
MAX_TIMEOUT_MS = 3_600_000
# How often idle transactions are reaped and the decision log is scanned.
RECOVERY_INTERVAL_SECONDS = 1.0
DECISION_LOG_RETENTION = timedelta(days=7)
"""Resolved rows of the decision log are deleted this long after their resolution (a
transaction id then reads as not found)."""
PRUNE_INTERVAL_SECONDS = 600.0
"""How often the recovery loop deletes expired rows of the decision log."""
# How long a shard transaction command (prepare, commit, rollback) may take.
COMMAND_SECONDS = 10.0
# Ended transactions remembered in memory, for a clear answer to a late statement.
ENDED_MEMORY = 10_000

# How a shard's error kinds map to SQLSTATE-like codes (40001: retry the transaction).
TRANSACTION_SQLSTATES = {"constraint": "23000", "invalid": "42000", "conflict": "40001"}

ACTIONS = node_pb2.ShardTransactionAction
ACTIVE, PREPARING, COMMITTED, ABORTED = "active", "preparing", "committed", "aborted"


class CrashPoint(Exception):
    """Raised by a test hook to stop a commit at a step, as a controller crash would."""


StepHook = Callable[[str], Awaitable[None]]
"""Called at each step of a commit (``prepared:<shard>``, ``decided``, ``committed:<shard>``)."""


@dataclass(eq=False)
class Transaction:
    id: str
    user_id: str
    database_id: str
    distributed: bool
    idle_timeout: float
    timeout: float
    started: float
    last_used: float
    created_at: datetime
    priority: int
    state: str = ACTIVE
    participants: dict[int, str] = field(default_factory=dict)  # shard → node (the primary)
    begun: set[int] = field(default_factory=set)  # shards with an open shard transaction
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conflict: bool = False
    ended_because: str = ""
    writes: dict[int, list[str]] = field(default_factory=dict)  # shard → write statements, in order

    @property
    def expires_at(self) -> datetime:
        return self.created_at + timedelta(seconds=self.timeout)


class TransactionLog:
    """The ``database_transactions`` table, written by the controller ``controller_id``
    (``controllers.id``; None: the only controller on the store, see the module's
    docstring). ``wall`` and ``stale_seconds`` say which controllers are live."""

    def __init__(
        self,
        store: Store,
        controller_id: str | None = None,
        *,
        wall: Callable[[], datetime] = utcnow,
        stale_seconds: float = STALE_SECONDS,
    ) -> None:
        self._store = store
        self.controller_id = controller_id
        self._wall = wall
        self._stale_seconds = stale_seconds

    async def create(self, txn: Transaction) -> None:
        async with self._store.session() as session:
            session.add(
                DatabaseTransaction(
                    id=txn.id,
                    user_id=txn.user_id,
                    database_id=txn.database_id,
                    distributed=txn.distributed,
                    state=ACTIVE,
                    participants=[],
                    created_at=txn.created_at,
                    updated_at=txn.created_at,
                    controller_id=self.controller_id,
                )
            )

    async def set(self, transaction_id: str, **values: Any) -> None:
        values.setdefault("updated_at", utcnow())
        async with self._store.session() as session:
            await session.execute(
                update(DatabaseTransaction).where(DatabaseTransaction.id == transaction_id).values(**values)
            )

    async def advance(self, transaction_id: str, was: str, state: str, *, decided: bool = True) -> bool:
        """Move a transaction from state ``was`` to ``state`` (``decided``: and stamp
        ``decided_at``), only if it is still in ``was`` and unresolved; whether it was."""
        now = utcnow()
        values: dict[str, Any] = {"state": state, "updated_at": now}
        if decided:
            values["decided_at"] = now
        async with self._store.session() as session:
            done = await session.execute(
                update(DatabaseTransaction)
                .where(DatabaseTransaction.id == transaction_id)
                .where(DatabaseTransaction.state == was)
                .where(DatabaseTransaction.resolved_at.is_(None))
                .values(**values)
            )
            return bool(getattr(done, "rowcount", 0) == 1)

    async def presume_abort(self, transaction_id: str, was: str) -> bool:
        """Mark a transaction left in state ``was`` aborted, only if it is still in that
        state and unresolved (its controller may have decided it since it was read);
        whether it was."""
        return await self.advance(transaction_id, was, ABORTED)

    async def live_controllers(self) -> frozenset[str]:
        """The ids of the controllers serving the store now (one query)."""
        return frozenset(
            await live_controllers(self._store, wall=self._wall, stale_seconds=self._stale_seconds)
        )

    async def get(self, transaction_id: str) -> DatabaseTransaction | None:
        async with self._store.session() as session:
            return await session.get(DatabaseTransaction, transaction_id)

    async def prune(self, resolved_before: datetime, *, batch: int = 1000) -> int:
        """Delete rows resolved before ``resolved_before`` (at most ``batch``); how many.
        Unresolved rows are never deleted: recovery still needs them."""
        async with self._store.session() as session:
            ids = list(
                await session.scalars(
                    select(DatabaseTransaction.id)
                    .where(DatabaseTransaction.resolved_at.is_not(None))
                    .where(DatabaseTransaction.resolved_at < resolved_before)
                    .limit(batch)
                )
            )
            if ids:
                await session.execute(delete(DatabaseTransaction).where(DatabaseTransaction.id.in_(ids)))
            return len(ids)

    async def unresolved(self) -> list[DatabaseTransaction]:
        async with self._store.session() as session:
            rows = await session.scalars(
                select(DatabaseTransaction)
                .where(DatabaseTransaction.resolved_at.is_(None))
                .order_by(DatabaseTransaction.created_at)
                .limit(1000)
            )
            return list(rows)


def participants_json(participants: dict[int, str]) -> list[dict[str, Any]]:
    return [{"shard": s, "node": n} for s, n in sorted(participants.items())]


class TransactionManager:
    def __init__(
        self,
        *,
        log_store: TransactionLog,
        streams: StreamRegistry,
        clock: Callable[[], float] = time.monotonic,
        recovery_interval: float = RECOVERY_INTERVAL_SECONDS,
        results: ShardResults,
    ) -> None:
        self._log = log_store
        self._streams = streams
        self._results = results
        """Where statements' rows arrive (``PushShardResult``, the data path)."""
        self._clock = clock
        self._interval = recovery_interval
        self._live: dict[str, Transaction] = {}
        self._ended: OrderedDict[str, tuple[str, str, str]] = OrderedDict()  # id → (user, db, why)
        self._task: asyncio.Task[None] | None = None
        self._pruned_at: float | None = None
        self._recovering = asyncio.Lock()
        self.step_hook: StepHook | None = None

    # -- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="transaction-recovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.reap()
                await self.recover()
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("transaction recovery pass failed", exc_info=True)
            await asyncio.sleep(self._interval)

    # -- begin / look up

    async def begin(
        self, user_id: str, database_id: str, *, distributed: bool, idle_timeout_ms: int, timeout_ms: int
    ) -> Transaction:
        violations = []
        if not 0 <= idle_timeout_ms <= MAX_TIMEOUT_MS:
            violations.append(
                FieldViolation("idle_timeout_ms", f"must be between 0 (default) and {MAX_TIMEOUT_MS}")
            )
        if not 0 <= timeout_ms <= MAX_TIMEOUT_MS:
            violations.append(
                FieldViolation("timeout_ms", f"must be between 0 (default) and {MAX_TIMEOUT_MS}")
            )
        if violations:
            raise InvalidArgument("The transaction's timeouts are out of range", field_violations=violations)
        now = self._clock()
        txn = Transaction(
            id=str(uuid.uuid4()),
            user_id=user_id,
            database_id=database_id,
            distributed=distributed,
            idle_timeout=(idle_timeout_ms or DEFAULT_IDLE_TIMEOUT_MS) / 1000,
            timeout=(timeout_ms or DEFAULT_TIMEOUT_MS) / 1000,
            started=now,
            last_used=now,
            created_at=utcnow(),
            priority=time.time_ns() // 1000,
        )
        self._live[txn.id] = txn
        try:
            await self._log.create(txn)
        except BaseException:
            self._live.pop(txn.id, None)
            raise
        return txn

    async def get(self, user_id: str, database_id: str, transaction_id: str) -> Transaction:
        """The caller's live transaction on ``database_id``; NOT_FOUND / ABORTED otherwise."""
        txn = self._live.get(transaction_id)
        if txn is not None and txn.user_id == user_id and txn.database_id == database_id:
            return txn
        ended = self._ended.get(transaction_id)
        if ended is not None and ended[:2] == (user_id, database_id):
            raise _ended_error(transaction_id, ended[2])
        row = await self._log.get(transaction_id) if _looks_like_id(transaction_id) else None
        if row is not None and row.user_id == user_id and row.database_id == database_id:
            if row.state == COMMITTED:
                raise _ended_error(transaction_id, COMMITTED)
            raise _ended_error(transaction_id, "the controller restarted" if row.state == ACTIVE else ABORTED)
        raise NotFound(
            f"You have no transaction {transaction_id!r} on this database", reason="TRANSACTION_NOT_FOUND"
        )

    def live(self) -> list[Transaction]:
        return list(self._live.values())

    # -- statements

    def check_shards(self, txn: Transaction, shards: Iterable[int]) -> None:
        """Refuse a statement that would take a single-shard transaction to a second shard."""
        wanted = set(txn.participants) | set(shards)
        if not txn.distributed and len(wanted) > 1:
            first = min(txn.participants) if txn.participants else min(wanted)
            others = sorted(wanted - {first})
            raise FailedPrecondition(
                f"the transaction is on shard {first} and this statement would touch shard(s) "
                f"{', '.join(map(str, others))}; begin the transaction with distributed=true to span shards",
                reason="TRANSACTION_SPANS_SHARDS",
                metadata={"shard": str(others[0]), "shards": ",".join(map(str, others))},
            )

    async def enlist(self, txn: Transaction, shards: dict[int, str]) -> None:
        """Log the participants a statement adds (before any of them is sent a statement)."""
        new = {s: n for s, n in shards.items() if s not in txn.participants}
        if new:
            txn.participants.update(new)
            await self._log.set(txn.id, participants=participants_json(txn.participants))

    def executor(
        self, txn: Transaction, timeout_s: float, shards: int = 1, caps: ResultCaps | None = None
    ) -> TransactionExecutor:
        """The executor of one statement of ``txn`` that runs on ``shards`` shards, each
        returning at most ``caps`` (none: no cap)."""
        return TransactionExecutor(self, txn, timeout_s, shards, caps or ResultCaps())

    def touch(self, txn: Transaction) -> None:
        txn.last_used = self._clock()

    def agent_idle_ms(self, txn: Transaction) -> int:
        return int(min(2 * txn.idle_timeout + 30, MAX_TIMEOUT_MS / 1000) * 1000)

    # -- commit / rollback

    async def commit(self, txn: Transaction) -> Transaction:
        async with txn.lock:
            self.require_active(txn)
            shards = sorted(txn.begun)
            try:
                if len(shards) <= 1:
                    await self._commit_one(txn, shards)
                else:
                    await self._commit_two_phase(txn, shards)
            finally:
                self._end(txn)
        return txn

    async def rollback(self, txn: Transaction, why: str = ABORTED) -> Transaction:
        async with txn.lock:
            self.require_active(txn)
            await self._abort(txn, why)
        return txn

    async def abort_after_error(self, txn: Transaction, error: BaseException) -> ControllerError:
        """Roll ``txn`` back after a failed statement; the error to give the caller."""
        await self._abort(txn, "a statement failed")
        conflict = txn.conflict
        message = getattr(error, "message", str(error))
        if conflict:
            return Aborted(
                f"the transaction conflicted with another one and was rolled back; retry it ({message})",
                reason="TRANSACTION_CONFLICT",
            )
        if isinstance(error, ControllerError):
            error.message = f"{message}; the transaction was rolled back"
            error.args = (error.message,)
            return error
        return Unavailable(f"{message}; the transaction was rolled back", reason="TRANSACTION_ABORTED")

    def require_active(self, txn: Transaction) -> None:
        if txn.state != ACTIVE or txn.id not in self._live:
            raise _ended_error(txn.id, txn.ended_because or txn.state)

    async def _abort(self, txn: Transaction, why: str) -> None:
        txn.state = ABORTED
        txn.ended_because = why
        self._end(txn)
        await self._log.set(txn.id, state=ABORTED, decided_at=utcnow())
        if await self._send_all(
            txn.id, txn.database_id, txn.participants, ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK
        ):
            await self._log.set(txn.id, resolved_at=utcnow())

    async def _commit_one(self, txn: Transaction, shards: list[int]) -> None:
        if shards:
            shard = shards[0]
            try:
                await self._command(txn.id, txn.database_id, shard, txn.participants[shard],
                                    ACTIONS.SHARD_TRANSACTION_ACTION_COMMIT, one_phase=True)  # fmt: skip
            except ShardError as exc:
                if exc.sqlstate == "transaction_missing" or not exc.retryable:
                    txn.state = ABORTED
                    await self._log.set(txn.id, state=ABORTED, decided_at=utcnow(), resolved_at=utcnow())
                    raise Aborted(
                        f"the commit failed and the transaction was rolled back: {exc.message}",
                        reason="TRANSACTION_ABORTED",
                    ) from exc
                raise Unavailable(
                    f"the outcome of the commit is unknown: shard {shard} did not answer ({exc.message})",
                    reason="TRANSACTION_OUTCOME_UNKNOWN",
                ) from exc
        txn.state = COMMITTED
        now = utcnow()
        await self._log.set(txn.id, state=COMMITTED, decided_at=now, resolved_at=now)

    async def _commit_two_phase(self, txn: Transaction, shards: list[int]) -> None:
        hook = self.step_hook
        if not await self._log.advance(txn.id, ACTIVE, PREPARING, decided=False):
            await self._taken_over(txn)
        txn.state = PREPARING
        failure: ShardError | None = None

        async def prepare(shard: int) -> None:
            await self._command(txn.id, txn.database_id, shard, txn.participants[shard],
                                ACTIONS.SHARD_TRANSACTION_ACTION_PREPARE)  # fmt: skip
            if hook is not None:
                await hook(f"prepared:{shard}")

        try:
            if hook is not None:
                await hook("preparing")
                for shard in shards:  # one at a time, so a test can stop between them
                    await prepare(shard)
            else:
                await asyncio.gather(*(prepare(s) for s in shards))
        except ShardError as exc:
            failure = exc
        if failure is not None:
            txn.state = ABORTED
            txn.ended_because = "a shard could not prepare"
            await self._log.set(txn.id, state=ABORTED, decided_at=utcnow())
            if await self._send_all(txn.id, txn.database_id, txn.participants,
                                    ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK):  # fmt: skip
                await self._log.set(txn.id, resolved_at=utcnow())
            raise Aborted(
                f"the transaction was rolled back: shard {failure.shard} could not prepare ({failure.message})",
                reason="TRANSACTION_ABORTED",
                metadata={"shard": str(failure.shard)},
            )
        if not await self._log.advance(txn.id, PREPARING, COMMITTED):  # the commit point
            await self._taken_over(txn)
        txn.state = COMMITTED
        if hook is not None:
            await hook("decided")
        done = True
        for shard in shards:
            try:
                await self._command(txn.id, txn.database_id, shard, txn.participants[shard],
                                    ACTIONS.SHARD_TRANSACTION_ACTION_COMMIT)  # fmt: skip
            except ShardError as exc:
                done = False
                log.warning(
                    "transaction %s: shard %d has not committed yet (%s); recovery will", txn.id, shard, exc
                )
            if hook is not None:
                await hook(f"committed:{shard}")
        if done:
            await self._log.set(txn.id, resolved_at=utcnow())

    async def _taken_over(self, txn: Transaction) -> None:
        """Another controller's recovery presumed ``txn`` aborted (this one was taken for
        gone, e.g. paused past the stale time): roll it back here too, and raise."""
        txn.state = ABORTED
        txn.ended_because = "presumed aborted by another controller's recovery"
        log.warning("transaction %s was presumed aborted by another controller: rolled back", txn.id)
        if await self._send_all(txn.id, txn.database_id, txn.participants,
                                ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK):  # fmt: skip
            await self._log.set(txn.id, resolved_at=utcnow())
        raise Aborted(f"the transaction was rolled back: {txn.ended_because}", reason="TRANSACTION_ABORTED")

    def _end(self, txn: Transaction) -> None:
        if self._live.pop(txn.id, None) is not None:
            self._ended[txn.id] = (txn.user_id, txn.database_id, txn.ended_because or txn.state)
            while len(self._ended) > ENDED_MEMORY:
                self._ended.popitem(last=False)

    # -- timeouts and recovery

    async def reap(self) -> int:
        """Roll back transactions idle past their idle timeout or past their timeout; how many."""
        now = self._clock()
        expired = [
            t for t in list(self._live.values())
            if t.state == ACTIVE and not t.lock.locked()
            and (now - t.last_used > t.idle_timeout or now - t.started > t.timeout)
        ]  # fmt: skip
        for txn in expired:
            why = "idle timeout" if now - txn.last_used > txn.idle_timeout else "timeout"
            log.info("transaction %s rolled back: %s", txn.id, why)
            async with txn.lock:
                if txn.state == ACTIVE and txn.id in self._live:
                    await self._abort(txn, f"rolled back after its {why}")
        return len(expired)

    async def recover(self) -> int:
        """One pass over the decision log; how many transactions were resolved.

        An undecided (``active``/``preparing``) row is presumed aborted only when its
        controller is gone (see the module's docstring); the live controllers are read
        once, and only if a row of another controller is in question. A decided row
        (``committed``/``aborted``) is finished whoever decided it, even while its own
        controller may still be sending the outcome: the decision is durable, agents
        apply a COMMIT or ROLLBACK they no longer know as already applied, and setting
        ``resolved_at`` twice is harmless, so resolving it twice costs a few commands
        and skipping it would leave it to a controller that may be about to die."""
        async with self._recovering:
            resolved = 0
            me = self._log.controller_id
            live: frozenset[str] | None = None  # read when first needed
            for row in await self._log.unresolved():
                if row.id in self._live:
                    continue  # still running here
                state = row.state
                owner = row.controller_id
                if state in (ACTIVE, PREPARING) and me is not None and owner is not None and owner != me:
                    if live is None:
                        live = await self._log.live_controllers()
                    if owner in live:
                        continue  # another live controller's transaction: its own to finish
                if state in (ACTIVE, PREPARING):  # presumed abort
                    # only if still so: a transaction committed (and ended here) between the
                    # read above and now is not left behind, and its decision stands
                    if not await self._log.presume_abort(row.id, row.state):
                        continue
                    state = ABORTED
                    log.info("transaction %s (%s when it was left) aborted by recovery", row.id, row.state)
                participants = {int(p["shard"]): str(p["node"]) for p in row.participants or []}
                action = (
                    ACTIONS.SHARD_TRANSACTION_ACTION_COMMIT
                    if state == COMMITTED
                    else ACTIONS.SHARD_TRANSACTION_ACTION_ROLLBACK
                )
                if await self._send_all(row.id, row.database_id, participants, action):
                    await self._log.set(row.id, resolved_at=utcnow())
                    resolved += 1
                    log.info("transaction %s resolved by recovery: %s", row.id, state)
            return resolved

    async def prune(self, now: datetime | None = None) -> int:
        """Delete the decision log's rows resolved more than :data:`DECISION_LOG_RETENTION`
        ago, at most once per :data:`PRUNE_INTERVAL_SECONDS` (on the injected clock)."""
        tick = self._clock()
        if self._pruned_at is not None and tick - self._pruned_at < PRUNE_INTERVAL_SECONDS:
            return 0
        self._pruned_at = tick
        cutoff = (now or utcnow()) - DECISION_LOG_RETENTION
        total = 0
        while deleted := await self._log.prune(cutoff):
            total += deleted
        if total:
            log.info("deleted %d decision-log rows resolved before %s", total, cutoff.isoformat())
        return total

    # -- commands

    async def _send_all(
        self, transaction_id: str, database_id: str, participants: dict[int, str], action: int
    ) -> bool:
        """Send ``action`` to every participant; whether all acknowledged it."""
        results = await asyncio.gather(
            *(self._command(transaction_id, database_id, s, n, action) for s, n in participants.items()),
            return_exceptions=True,
        )
        for shard, result in zip(participants, results, strict=True):
            if isinstance(result, BaseException):
                log.info("transaction %s: shard %d: %s", transaction_id, shard, result)
        return not any(isinstance(r, BaseException) for r in results)

    async def _command(
        self,
        transaction_id: str,
        database_id: str,
        shard: int,
        node_id: str,
        action: int,
        *,
        sql: str = "",
        seconds: float = COMMAND_SECONDS,
        idle_timeout_ms: int = 0,
        priority: int = 0,
        holds_nothing: bool = False,
        distributed: bool = False,
        one_phase: bool = False,
    ) -> ShardResult:
        """One ``shard_transaction`` command; ``one_phase`` for the COMMIT of a transaction
        on one shard, where a shard that no longer knows it means it was rolled back."""
        command = node_pb2.NodeCommand(
            command_id=str(uuid.uuid4()),
            shard_transaction=node_pb2.ShardTransaction(
                database_id=database_id,
                shard_index=shard,
                transaction_id=transaction_id,
                action=action,  # type: ignore[arg-type]
                sql=sql,
                timeout_ms=max(1, int(seconds * 1000)),
                idle_timeout_ms=idle_timeout_ms,
                priority=priority,
                holds_nothing=holds_nothing,
                distributed=distributed,
            ),
        )
        try:
            result = await self._streams.send_command(node_id, command, seconds + 0.5)
        except ControllerError as exc:
            raise ShardError(shard, f"node {node_id}: {exc.message}", retryable=True) from exc
        if result.ok:
            if action in (ACTIONS.SHARD_TRANSACTION_ACTION_BEGIN, ACTIONS.SHARD_TRANSACTION_ACTION_EXECUTE):
                columns, rows, rowcount = decode_result(result.payload)
                return ShardResult(columns=columns, rows=rows, rows_affected=rowcount)
            if one_phase and json.loads(result.payload or b"{}").get("state") == "unknown":
                # Never prepared, so "resolved before" can only mean rolled back (idle too
                # long, the agent restarted, or its stream to this controller broke).
                raise ShardError(
                    shard,
                    f"node {node_id} no longer held the transaction: it was rolled back there",
                    retryable=False,
                    sqlstate="transaction_missing",
                )
            return ShardResult(columns=[], rows=[])
        kind = json.loads(result.payload or b"{}").get("error_kind", "invalid")
        if kind == "timeout":
            raise TimeoutError
        raise ShardError(
            shard,
            f"node {node_id}: {result.error_message}",
            retryable=kind == "unavailable",
            sqlstate=TRANSACTION_SQLSTATES.get(kind, kind),
        )

    async def _statement(
        self,
        txn: Transaction,
        shard: int,
        action: int,
        sql: str,
        seconds: float,
        caps: ResultCaps,
        *,
        holds_nothing: bool,
    ) -> ShardResult:
        """A ``BEGIN`` (with sql) or ``EXECUTE`` step whose rows come back over
        ``PushShardResult`` in batches, within ``caps`` (as other statements' rows do)."""
        node_id = txn.participants[shard]
        command = node_pb2.NodeCommand(
            command_id=str(uuid.uuid4()),
            shard_transaction=node_pb2.ShardTransaction(
                database_id=txn.database_id,
                shard_index=shard,
                transaction_id=txn.id,
                action=action,  # type: ignore[arg-type]
                sql=sql,
                timeout_ms=max(1, int(seconds * 1000)),
                idle_timeout_ms=self.agent_idle_ms(txn),
                priority=txn.priority,
                holds_nothing=holds_nothing,
                distributed=txn.distributed,
                push_rows=True,
                max_rows=caps.rows,
                max_bytes=caps.bytes,
                inline_ok=True,
            ),
        )
        rows = await open_rows(
            self._streams, self._results, node_id, shard, command, caps, seconds, TRANSACTION_SQLSTATES
        )
        result = await collect(rows, is_write=False)
        return ShardResult(columns=result.columns, rows=result.rows, rows_affected=rows.rowcount)


class TransactionExecutor:
    """The :class:`~controller.federation.query.ShardExecutor` of statements in a transaction."""

    def __init__(
        self, manager: TransactionManager, txn: Transaction, timeout_s: float, shards: int, caps: ResultCaps
    ) -> None:
        self._manager = manager
        self._txn = txn
        self._timeout = timeout_s
        self._shards = shards
        self._caps = caps

    async def run(self, shard: int, sql: str, deadline: float) -> ShardResult:
        txn = self._txn
        begin = shard not in txn.begun
        # waiting is deadlock-free only for a transaction that holds no shard and asks for one
        holds_nothing = not txn.begun and self._shards == 1
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        if begin:
            txn.begun.add(shard)  # a failed BEGIN leaves nothing behind; ROLLBACK of it is harmless
        try:
            return await self._manager._statement(
                txn,
                shard,
                ACTIONS.SHARD_TRANSACTION_ACTION_BEGIN if begin else ACTIONS.SHARD_TRANSACTION_ACTION_EXECUTE,
                sql,
                remaining,
                self._caps,
                holds_nothing=begin and holds_nothing,
            )
        except ShardError as exc:
            if exc.sqlstate == "40001":
                txn.conflict = True
            # Any failure ends the transaction: the caller rolls it back.
            raise ShardError(shard, exc.message, retryable=False, sqlstate=exc.sqlstate) from exc


def _ended_error(transaction_id: str, why: str) -> ControllerError:
    if why == COMMITTED:
        return FailedPrecondition(
            f"transaction {transaction_id} is already committed", reason="TRANSACTION_COMMITTED"
        )
    detail = "" if why == ABORTED else f" ({why})"
    return Aborted(f"transaction {transaction_id} was rolled back{detail}", reason="TRANSACTION_ABORTED")


def _looks_like_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36
