"""One writer at a time for the embedded (SQLite) store.

SQLite has a single write lock per database. Left to itself, every pooled
connection races for it: a transaction takes it at its first write and keeps it
until COMMIT, across however many event-loop iterations the unit of work
spans, and every other writer's thread sleeps in SQLite's busy handler
(retrying with sleeps of up to 100 ms) for up to the busy timeout, holding a
pooled connection meanwhile. Under a burst that ends in ``database is locked``
after 15 s, or in the pool's 30 s checkout timeout.

:class:`WriteGate` queues writers on the event loop instead: a transaction takes
the gate (an :class:`asyncio.Lock`, first come first served) right before its
first write statement, and gives it back when its connection returns to the
pool, after COMMIT or ROLLBACK. So at most one connection is ever in a write
transaction, no thread waits on SQLite's lock, and reads, which never take the
gate, run beside the writer on other pooled connections (WAL journal: readers
and the writer do not block each other).

Reads that come before a session's first write run outside any transaction
(the SQLite driver opens one implicitly before the first write), exactly as
without the gate. PostgreSQL has no gate: its row locks let writers run
concurrently.

A session that opens a second session *in the same task* and writes in both
would wait for itself: the second one goes without the gate (SQLite's busy
timeout applies to it, as before) and a warning is logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.util import await_

log = logging.getLogger(__name__)

SLOW_HOLD_SECONDS = 1.0
"""A write transaction that keeps the gate longer than this is logged (with its first write):
every other writer waited that long."""

_READ_ONLY = re.compile(r"\s*\(*\s*(SELECT|PRAGMA|EXPLAIN)\b", re.IGNORECASE)


def is_write_statement(statement: str) -> bool:
    """Whether ``statement`` needs SQLite's write lock (or opens a transaction that will).

    Anything but a plain read counts: a ``SAVEPOINT`` opens a transaction whose
    later writes would fail at once if another connection wrote meanwhile, and a
    ``WITH`` may end in an ``INSERT``.

    >>> is_write_statement("SELECT deployments.id FROM deployments")
    False
    >>> is_write_statement("  (SELECT 1) UNION (SELECT 2)")
    False
    >>> is_write_statement("UPDATE deployments SET status=? WHERE id=?")
    True
    >>> is_write_statement("SAVEPOINT sa_savepoint_1")
    True
    >>> is_write_statement("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x")
    True
    """
    return _READ_ONLY.match(statement) is None


class WriteGate:
    """Admits one write transaction at a time on an engine's connections (see the module doc)."""

    def __init__(self, timeout_seconds: float) -> None:
        self._lock = asyncio.Lock()
        self._timeout = timeout_seconds
        self._holder: dict[Any, Any] | None = None
        """The ``info`` dict of the pooled connection in a write transaction (None: the gate is free)."""
        self._holder_task: asyncio.Task[Any] | None = None
        self._waiting = 0
        self._since = 0.0
        self._first = ""
        self.admitted = 0
        """Write transactions admitted so far (for tests and statistics)."""

    @property
    def held(self) -> bool:
        """Whether a write transaction is open."""
        return self._holder is not None

    @property
    def waiting(self) -> int:
        """How many transactions are queued for the gate right now."""
        return self._waiting

    def install(self, engine: Engine) -> None:
        """Gate every write transaction on ``engine``'s connections (the sync engine of an async one)."""
        event.listen(engine, "before_cursor_execute", self._before_cursor_execute)
        event.listen(engine.pool, "checkin", self._checkin)
        # A connection that is invalidated (a driver error) or detached may come back with a
        # fresh ``info`` dict, or never: the gate goes free when that happens, never later.
        event.listen(engine.pool, "invalidate", self._lost)
        event.listen(engine.pool, "soft_invalidate", self._lost)
        event.listen(engine.pool, "detach", self._detached)

    def _before_cursor_execute(
        self,
        conn: Any,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> tuple[str, Any]:
        record = conn.info  # the pooled connection's own dict: the same object at check-in
        if record is self._holder or not is_write_statement(statement):
            return statement, parameters
        task = asyncio.current_task()
        if self._holder is not None and task is not None and task is self._holder_task:
            log.warning(
                "a second store session of the same task writes while the first holds the "
                "write gate; it waits on SQLite's busy timeout instead"
            )
            return statement, parameters
        await_(self._acquire(conn))
        self._holder = record
        self._holder_task = task
        self._since = time.monotonic()
        self._first = statement
        self.admitted += 1
        return statement, parameters

    async def _acquire(self, conn: Any) -> None:
        self._waiting += 1
        try:
            async with asyncio.timeout(self._timeout):
                await self._lock.acquire()
        except TimeoutError:
            # what SQLite itself answers after its busy timeout: the store is too busy
            raise conn.dialect.loaded_dbapi.OperationalError(
                "database is locked (waited for the store's write gate)"
            ) from None
        finally:
            self._waiting -= 1

    def _lost(self, dbapi_connection: Any, record: Any, _exception: BaseException | None) -> None:
        self._checkin(dbapi_connection, record)

    def _detached(self, dbapi_connection: Any, record: Any) -> None:
        self._checkin(dbapi_connection, record)

    def _checkin(self, _dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info is self._holder:
            held = time.monotonic() - self._since
            if held > SLOW_HOLD_SECONDS:
                log.warning(
                    "a write transaction kept the store's write gate %.2f s (%d waiting); first write: %.120s",
                    held,
                    self._waiting,
                    self._first,
                )
            self._holder = None
            self._holder_task = None
            if self._lock.locked():
                self._lock.release()


__all__ = ["WriteGate", "is_write_statement"]
