"""Schema migrations of the store, run programmatically with Alembic (no ``alembic.ini``).

* :func:`upgrade` is what ``a67 migrate`` runs;
* :func:`ensure_schema` is what the controller runs at start-up: it migrates the
  embedded SQLite store by itself (when ``auto_migrate`` is on) and refuses to start
  on any other store whose schema is not at head, telling the operator what to run.

The functions here are synchronous (they use the sync driver of the same URL) except
:func:`ensure_schema`, which runs them in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

from controller.config import Settings
from controller.errors import FailedPrecondition
from controller.store.db import (
    create_sync_engine_for,
    is_sqlite_url,
    is_unavailable_error,
    redact,
    store_unavailable,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""The Alembic script directory (``env.py`` and ``versions/``)."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` for the store's migrations, targeting ``url`` if given."""
    config = Config()
    # ConfigParser interpolates "%": escape it in the path.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The revision this code's schema is at (the single head of the migrations)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(url: str) -> str | None:
    """The revision the store at ``url`` is at, or None for an empty (unmigrated) store.

    Raises ``Unavailable`` (``STORE_UNAVAILABLE``) if the store cannot be reached.
    """
    engine = create_sync_engine_for(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:
        if is_unavailable_error(exc):
            raise store_unavailable(exc) from exc
        raise
    finally:
        engine.dispose()


def is_up_to_date(url: str) -> bool:
    """Whether the store at ``url`` is at :func:`head_revision`."""
    return current_revision(url) == head_revision()


def is_known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this code's migrations (False: the store is newer)."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def upgrade(url: str, revision: str = "head") -> str:
    """Migrate the store at ``url`` up to ``revision`` (default: head); returns the revision reached.

    Raises ``Unavailable`` (``STORE_UNAVAILABLE``) if the store cannot be reached.
    """
    try:
        command.upgrade(alembic_config(url), revision)
    except Exception as exc:
        if is_unavailable_error(exc):
            raise store_unavailable(exc) from exc
        raise
    reached = current_revision(url)
    log.info("the store %s is at revision %s", redact(url), reached)
    return reached or ""


def is_embedded(settings: Settings) -> bool:
    """Whether the store is the embedded SQLite one (no URL set, or an SQLite URL)."""
    return not settings.store_url or is_sqlite_url(settings.store_url)


async def ensure_schema(settings: Settings) -> str:
    """Make sure the store's schema is at head before the controller serves; returns head.

    * at head: nothing to do;
    * embedded SQLite store and ``settings.auto_migrate``: migrate it now;
    * otherwise: ``FailedPrecondition`` (``SCHEMA_OUT_OF_DATE``) naming ``a67 migrate``,
      or (``SCHEMA_TOO_NEW``) if the store was migrated by a newer controller.

    Raises ``Unavailable`` (``STORE_UNAVAILABLE``) if the store cannot be reached.
    """
    url = settings.effective_store_url
    head = head_revision()
    current = await asyncio.to_thread(current_revision, url)
    if current == head:
        return head
    if current is not None and not is_known_revision(current):
        raise FailedPrecondition(
            f"The store schema is at {current}, which this controller does not know (it needs {head}): "
            "the store was migrated by a newer controller; run that version",
            reason="SCHEMA_TOO_NEW",
            metadata={"current": current, "required": head},
        )
    if is_embedded(settings) and settings.auto_migrate:
        reached = await asyncio.to_thread(upgrade, url)
        log.info("migrated the embedded SQLite store to %s", reached)
        return reached
    shown = current or "none (an empty store)"
    raise FailedPrecondition(
        f"The store schema is at {shown} but the controller needs {head}; run `a67 migrate` to upgrade it",
        reason="SCHEMA_OUT_OF_DATE",
        metadata={"current": current or "", "required": head},
    )


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "is_embedded",
    "is_known_revision",
    "is_up_to_date",
    "upgrade",
]
