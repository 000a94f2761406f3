"""The controller's relational store: SQLAlchemy models, the async :class:`Store`,
repositories and Alembic migrations (PostgreSQL in production, SQLite embedded).

Typical use::

    store = await Store.open(settings.effective_store_url)
    users = UserRepository(store)
    ...
    await store.close()

Start-up runs :func:`controller.store.migrate.ensure_schema` first.
"""

from controller.store.db import STORE_UNAVAILABLE, Store, create_engine_for, create_sync_engine_for
from controller.store.repositories import (
    AuthFailureRepository,
    ConsumeOutcome,
    ConsumeResult,
    RefreshTokenRepository,
    UserRepository,
)

__all__ = [
    "STORE_UNAVAILABLE",
    "AuthFailureRepository",
    "ConsumeOutcome",
    "ConsumeResult",
    "RefreshTokenRepository",
    "Store",
    "UserRepository",
    "create_engine_for",
    "create_sync_engine_for",
]
