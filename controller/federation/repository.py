"""Federated databases in the store (table ``database_instances``, spec §3.4, §6)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError

from controller.errors import AlreadyExists
from controller.store.db import Store, is_unavailable_error, store_unavailable
from controller.store.models import DatabaseInstance, utcnow
from controller.store.paging import keyset_page

WRITE_ORDER_WAIT_SECONDS = 10.0
"""The longest a write waits for another controller's write to the same database."""


class DatabaseRepository:
    """Reads and writes ``database_instances`` rows; callers pass the owner explicitly."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def store(self) -> Store:
        """The store the rows live in (the shards' write log lives there too)."""
        return self._store

    async def create(
        self,
        *,
        database_id: str,
        user_id: str,
        name: str,
        provider: str,
        connection: dict[str, Any],
        sharding: dict[str, Any],
        replication: dict[str, Any],
    ) -> DatabaseInstance:
        row = DatabaseInstance(
            id=database_id,
            user_id=user_id,
            name=name,
            provider=provider,
            connection=connection,
            sharding=sharding,
            replication=replication,
            schema_info={"version": 0, "tables": []},
        )
        try:
            async with self._store.session() as session:
                session.add(row)
        except IntegrityError as exc:
            raise AlreadyExists(
                f"A database named {name!r} already exists", reason="DATABASE_NAME_TAKEN"
            ) from exc
        return row

    async def get_for_user(self, user_id: str, database_id: str) -> DatabaseInstance | None:
        async with self._store.session() as session:
            return await session.scalar(
                select(DatabaseInstance).where(
                    DatabaseInstance.id == database_id, DatabaseInstance.user_id == user_id
                )
            )

    async def list_for_user(
        self, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[DatabaseInstance], str]:
        statement = select(DatabaseInstance).where(DatabaseInstance.user_id == user_id)
        return await keyset_page(self._store, statement, DatabaseInstance, page_size, page_token)

    async def delete(self, database_id: str) -> None:
        async with self._store.session() as session:
            await session.execute(delete(DatabaseInstance).where(DatabaseInstance.id == database_id))

    async def set_schema(
        self, database_id: str, schema_info: dict[str, Any], now: datetime | None = None
    ) -> None:
        async with self._store.session() as session:
            await session.execute(
                update(DatabaseInstance)
                .where(DatabaseInstance.id == database_id)
                .values(schema_info=schema_info, last_synced=now or utcnow())
            )

    @asynccontextmanager
    async def write_order(
        self, database_id: str, wait_seconds: float = WRITE_ORDER_WAIT_SECONDS
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Hold the database's write order across controllers, and give its stored
        ``replication`` (None: the row is gone) as of the moment it was taken.

        On PostgreSQL: a session advisory lock on a connection of its own, held until the
        block ends — or until the connection drops, so a controller that dies holding it
        frees it at once; waiting for it longer than ``wait_seconds`` is ``UNAVAILABLE``
        (``lock_timeout``), never a hang behind a paused controller. On SQLite (one
        controller per store) only the row is read."""
        key = f"a67:database-writes:{database_id}"
        try:
            async with self._store.engine.connect() as conn:
                postgres = conn.dialect.name == "postgresql"
                if postgres:
                    # for this transaction only: the connection goes back to the pool afterwards
                    await conn.execute(text(f"SET LOCAL lock_timeout = {max(1, int(wait_seconds * 1000))}"))
                    await conn.execute(
                        text("SELECT pg_advisory_lock(hashtextextended(:key, 0))"), {"key": key}
                    )
                stored = await conn.scalar(
                    select(DatabaseInstance.replication).where(DatabaseInstance.id == database_id)
                )
                await conn.commit()  # no transaction stays open while the lock is held
                try:
                    yield stored
                finally:
                    if postgres and not conn.closed and not conn.invalidated:
                        await conn.execute(
                            text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": key}
                        )
                        await conn.commit()
        except Exception as exc:
            if is_unavailable_error(exc):
                raise store_unavailable(exc) from exc
            raise

    async def set_replication(self, database_id: str, replication: dict[str, Any]) -> None:
        async with self._store.session() as session:
            await session.execute(
                update(DatabaseInstance)
                .where(DatabaseInstance.id == database_id)
                .values(replication=replication)
            )
