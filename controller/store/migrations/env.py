"""Alembic environment of the store: run programmatically by :mod:`controller.store.migrate`.

There is no ``alembic.ini`` on disk: ``migrate.alembic_config`` builds the Config and
passes either an open sync ``connection`` or the store ``url`` in ``config.attributes``.
SQLite gets batch mode (``render_as_batch``) so later ALTERs work there too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from controller.store.db import create_sync_engine_for, is_sqlite_url, sync_url
from controller.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no store URL: pass config.attributes['url'] or a connection")
    return str(url)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``--sql``) instead of running it."""
    url = sync_url(_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=is_sqlite_url(url),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on one opened from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_sync_engine_for(_url())
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
