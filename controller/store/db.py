"""Engines and sessions of the store: one async facade over SQLite and PostgreSQL.

Settings keep plain SQLAlchemy URLs (``sqlite:///path``, ``postgresql+psycopg://…``);
this module picks the async driver for the running controller (``aiosqlite``, or
psycopg 3 in async mode) and the sync driver for migrations (``pysqlite``, psycopg 3).

SQLite connections are set up for a server with concurrent writers: WAL journal (reads
never wait for the writer), foreign keys on, and one writer at a time: write
transactions queue on the event loop for the store's :class:`~controller.store.writer.WriteGate`
instead of racing for SQLite's write lock (the busy timeout is only a fallback, for
other processes). PostgreSQL keeps its concurrent writers.

Connection failures surface as :class:`controller.errors.Unavailable` with reason
``STORE_UNAVAILABLE`` and never leak the URL (which may hold a password).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool

from controller.errors import Unavailable
from controller.store.writer import WriteGate

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_SECONDS = 15.0
"""How long an SQLite writer waits for the write lock (its turn at the store's write gate,
or SQLite's lock held by another process) before giving up."""

SQLITE_POOL_SIZE = 10
SQLITE_POOL_OVERFLOW = 30
"""Connections to an SQLite file: kept open, and opened beyond those at busy times. Writers
queued for the write gate each hold one while they wait, so there are more than
SQLAlchemy's default 5 + 10 to leave readers some (each is a thread of aiosqlite)."""

CONNECT_TIMEOUT_SECONDS = 5
"""How long a PostgreSQL connection attempt may take."""

STORE_UNAVAILABLE = "STORE_UNAVAILABLE"

PRIVATE_DIR_MODE = 0o700
"""The data directory, and directories made for an SQLite file: only the owner."""

PRIVATE_FILE_MODE = 0o600
"""The SQLite database and its side files: only the owner reads and writes them."""

DEFAULT_STORE_FILE = "controller.db"
"""The embedded store's file in the data directory (see ``Settings.effective_store_url``)."""

SQLITE_SIDE_FILES = ("", "-wal", "-shm", "-journal")
"""Suffixes of the database file and the files SQLite keeps next to it."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
}
_SYNC_DRIVERS = {
    "sqlite": "sqlite+pysqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "sqlite+aiosqlite": "sqlite+pysqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
}


def _as_url(url: str | URL) -> URL:
    return url if isinstance(url, URL) else make_url(url)


def is_sqlite_url(url: str | URL) -> bool:
    """Whether ``url`` names an SQLite database (any driver)."""
    return _as_url(url).get_backend_name() == "sqlite"


def async_url(url: str | URL) -> URL:
    """``url`` with the async driver the controller uses for its backend."""
    parsed = _as_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def sync_url(url: str | URL) -> URL:
    """``url`` with the sync driver that migrations use for its backend."""
    parsed = _as_url(url)
    driver = _SYNC_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def redact(url: str | URL) -> str:
    """``url`` as text with any password masked, for logs and messages."""
    return _as_url(url).render_as_string(hide_password=True)


def is_memory_sqlite(url: str | URL) -> bool:
    """Whether ``url`` is an in-memory SQLite database (nothing on disk)."""
    parsed = _as_url(url)
    return is_sqlite_url(parsed) and (
        parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
    )


def sqlite_path(url: str | URL) -> Path | None:
    """The file an SQLite ``url`` names, or ``None`` (in-memory, or not SQLite)."""
    parsed = _as_url(url)
    if not is_sqlite_url(parsed) or is_memory_sqlite(parsed) or not parsed.database:
        return None
    database = parsed.database
    if database.startswith("file:"):
        database = database[len("file:") :].split("?", 1)[0]
    return Path(database).expanduser()


def ensure_sqlite_parent(url: str | URL) -> None:
    """Prepare the SQLite file ``url`` names, if it names one, so that nobody else can read it.

    A missing parent directory is created 0700 (an existing one is left alone: it
    may be shared, like ``/tmp``; the data directory is tightened by
    :func:`ensure_data_dir`). The database file is created empty with mode 0600
    if missing, and it and its ``-wal``, ``-shm`` and ``-journal`` files are
    tightened to 0600 if they exist. SQLite creates the ``-wal`` and ``-shm``
    files later with the database file's permissions, so they are 0600 too.
    """
    path = sqlite_path(url)
    if path is None:
        return
    path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, PRIVATE_FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)  # an empty file is an empty SQLite database
    for suffix in SQLITE_SIDE_FILES:
        tighten(path.with_name(path.name + suffix), PRIVATE_FILE_MODE)


def ensure_data_dir(directory: Path) -> Path:
    """Create the data directory 0700, or tighten an existing one to 0700.

    Also tightens the default store's files in it (from an older version) to 0600.
    Returns ``directory``. The CLI and the server call this at start.
    """
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    tighten(directory, PRIVATE_DIR_MODE)
    for suffix in SQLITE_SIDE_FILES:
        tighten(directory / f"{DEFAULT_STORE_FILE}{suffix}", PRIVATE_FILE_MODE)
    return directory


def tighten(path: Path, mode: int) -> bool:
    """Remove every permission bit of ``path`` beyond ``mode`` (0600, 0700); True if it changed.

    A missing path is fine (False). A symlink is not followed.
    """
    try:
        current = stat.S_IMODE(path.lstat().st_mode)
    except FileNotFoundError:
        return False
    if path.is_symlink() or current & ~mode == 0:
        return False
    os.chmod(path, current & mode)
    log.warning("tightened permissions of %s from %o to %o", path, current, current & mode)
    return True


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class RollbackFirstConnection(sqlite3.Connection):
    """An SQLite connection that rolls back what it has open before it closes.

    Python's ``sqlite3`` closes with ``sqlite3_close_v2``: while a statement of the connection
    has not been reset (a cursor stepped into a ``SELECT`` and still referenced), the
    connection only becomes a "zombie", and its transaction, with SQLite's write lock, stays
    open until that cursor is freed. SQLAlchemy closes a connection that way when it is
    invalidated, which is what a task cancelled in the middle of a statement does (a client
    that breaks an upload); the cursor may then live in an exception's traceback, and once
    the controller's collector freezes it (``nodes/collector.py``), for good: every later
    write waited out the busy timeout and failed. A rollback first ends the transaction at
    once (SQLite aborts the pending statements), so a closed connection holds no lock.
    """

    def close(self) -> None:
        try:
            if self.in_transaction:
                self.rollback()
        except sqlite3.Error as exc:  # already closed, or the file is gone: close says the rest
            log.debug("rollback before closing an SQLite connection failed: %s", exc)
        super().close()


def _engine_options(url: URL) -> dict[str, Any]:
    if is_sqlite_url(url):
        options: dict[str, Any] = {
            "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "factory": RollbackFirstConnection}
        }
        if is_memory_sqlite(url):
            # One shared connection, or every connection would see its own empty database.
            options["poolclass"] = StaticPool
            options["connect_args"]["check_same_thread"] = False
        else:
            options["pool_size"] = SQLITE_POOL_SIZE
            options["max_overflow"] = SQLITE_POOL_OVERFLOW
        return options
    if url.get_backend_name() == "postgresql":
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}}
    return {}


def create_engine_for(url: str | URL) -> AsyncEngine:
    """The async engine for the store at ``url`` (a plain sync-style URL is fine).

    An SQLite file gets a :class:`WriteGate` (see :func:`write_gate_of`): one write
    transaction at a time. An in-memory database has one shared connection, and no gate.
    """
    parsed = async_url(url)
    ensure_sqlite_parent(parsed)
    engine = create_async_engine(parsed, **_engine_options(parsed))
    if is_sqlite_url(parsed):
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
        if not is_memory_sqlite(parsed):
            gate = WriteGate(SQLITE_BUSY_TIMEOUT_SECONDS)
            gate.install(engine.sync_engine)
            _GATES[engine.sync_engine] = gate
    return engine


_GATES: weakref.WeakKeyDictionary[Engine, WriteGate] = weakref.WeakKeyDictionary()


def write_gate_of(engine: AsyncEngine) -> WriteGate | None:
    """The write gate of an engine made by :func:`create_engine_for` (None: PostgreSQL, memory)."""
    return _GATES.get(engine.sync_engine)


def create_sync_engine_for(url: str | URL) -> Engine:
    """The sync engine for the store at ``url``, for migrations and tooling."""
    parsed = sync_url(url)
    ensure_sqlite_parent(parsed)
    engine = create_engine(parsed, **_engine_options(parsed))
    if is_sqlite_url(parsed):
        event.listen(engine, "connect", _set_sqlite_pragmas)
    return engine


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)
"""SQLAlchemy errors that mean "the store cannot be reached or is too busy right now"."""


def is_unavailable_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the store is unreachable rather than that the request is wrong."""
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def store_unavailable(exc: BaseException) -> Unavailable:
    """The caller-facing error for a store failure (logged here, without the URL)."""
    log.warning("the store is unavailable: %s: %s", type(exc).__name__, getattr(exc, "orig", exc))
    return Unavailable("The store is unavailable; try again", reason=STORE_UNAVAILABLE)


class Store:
    """The controller's handle on its relational store.

    Use :meth:`open` to make one and :meth:`close` when done. :meth:`session` is the
    unit of work: it commits when its block ends normally and rolls back otherwise.
    Objects loaded in a session stay usable after it (``expire_on_commit=False``).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, class_=AsyncSession)

    @classmethod
    async def open(cls, url: str | URL, *, check: bool = True) -> Store:
        """Open the store at ``url``; with ``check`` (default), fail now if it is unreachable.

        Raises :class:`controller.errors.Unavailable` (``STORE_UNAVAILABLE``).
        """
        store = cls(create_engine_for(url))
        if check:
            try:
                await store.ping()
            except BaseException:
                await store.close()
                raise
        return store

    @property
    def engine(self) -> AsyncEngine:
        """The underlying async engine."""
        return self._engine

    @property
    def write_gate(self) -> WriteGate | None:
        """The SQLite file's write gate (one write transaction at a time); None on PostgreSQL."""
        return write_gate_of(self._engine)

    @property
    def dialect_name(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @property
    def url(self) -> str:
        """The store's URL with any password masked."""
        return redact(self._engine.url)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session inside a transaction: committed on normal exit, rolled back on error."""
        try:
            async with self._sessions.begin() as session:
                yield session
        except Exception as exc:
            if is_unavailable_error(exc):
                raise store_unavailable(exc) from exc
            raise

    async def ping(self) -> None:
        """Round-trip to the store; raises ``Unavailable`` if it cannot be reached."""
        try:
            async with self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            if is_unavailable_error(exc):
                raise store_unavailable(exc) from exc
            raise


__all__ = [
    "STORE_UNAVAILABLE",
    "Store",
    "async_url",
    "create_engine_for",
    "create_sync_engine_for",
    "ensure_data_dir",
    "ensure_sqlite_parent",
    "is_memory_sqlite",
    "is_sqlite_url",
    "is_unavailable_error",
    "redact",
    "sqlite_path",
    "store_unavailable",
    "sync_url",
    "tighten",
    "write_gate_of",
]
