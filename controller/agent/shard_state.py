"""What a :class:`~controller.agent.shards.ShardStore` holds: its state, declared once for
the parts it is made of (:mod:`~controller.agent.shard_sqlite`,
:mod:`~controller.agent.shard_sqlite_txn`, :mod:`~controller.agent.shard_postgres`,
:mod:`~controller.agent.shard_transactions`), the error every part raises
(:class:`ShardError`) and an open transaction (:class:`_Transaction`).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.agent.shard_sqlite import _SqliteShard
    from controller.agent.shard_sqlite_txn import _Gate

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Deadline used when a command gives none.
DEFAULT_TIMEOUT_MS = 30_000


class ShardError(Exception):
    """A statement failed on its shard."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class _Transaction:
    """One open (or prepared) transaction on one shard of this agent."""

    id: str
    key: tuple[str, int]
    priority: int
    idle_timeout: float
    last_used: float
    state: str = "active"  # active → prepared
    conn: Any = None  # sqlite3.Connection, or a psycopg AsyncConnection while active
    statements: list[str] = field(default_factory=list)  # SQLite: the ones that changed rows
    distributed: bool = False  # may hold other shards: PostgreSQL lock waits are bounded
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _ShardStoreState:
    """The attributes of a :class:`~controller.agent.shards.ShardStore` (set in its
    ``__init__``), for the mixins it is made of."""

    _root: Path
    _postgres_url: str
    _clock: Callable[[], float]
    # SQLite
    _sqlite: dict[tuple[str, int], _SqliteShard]
    _sqlite_readers: dict[tuple[str, int], list[sqlite3.Connection]]
    # PostgreSQL
    _pg: dict[tuple[str, int], Any]
    _pg_lock: asyncio.Lock
    _pg_shards: Any
    _pg_pool: dict[tuple[str, int], list[Any]]
    _pg_slots: dict[tuple[str, int], asyncio.Semaphore]
    # transactions
    _transactions: dict[str, _Transaction]
    _gates: dict[tuple[str, int], _Gate]
    _restored: set[tuple[str, int]]
    _restore_lock: asyncio.Lock
    _reaper: asyncio.Task[None] | None
    _abandoning: set[asyncio.Task[None]]
