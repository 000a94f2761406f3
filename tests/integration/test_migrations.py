"""Alembic migrations from an empty store, and the start-up schema check (``ensure_schema``)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from controller.config import Settings
from controller.errors import FailedPrecondition, Unavailable
from controller.store.db import create_sync_engine_for
from controller.store.migrate import (
    alembic_config,
    current_revision,
    ensure_schema,
    head_revision,
    is_up_to_date,
    upgrade,
)
from controller.store.models import Base

if TYPE_CHECKING:
    from tests.conftest import PostgresDatabases

TABLES = {
    "users",
    "nodes",
    "deployments",
    "database_instances",
    "storage_files",
    "refresh_token_families",
    "refresh_tokens",
    "auth_failures",
    "node_enrollment_tokens",
    "deployment_packages",
    "alerts",
    "user_mfa",
    "mfa_recovery_codes",
    "mfa_challenges",
    "secret_audit_events",
    "node_credential_states",
    "controllers",
}


def _tables(url: str) -> set[str]:
    engine = create_sync_engine_for(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _set_revision(url: str, revision: str) -> None:
    engine = create_sync_engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :rev"), {"rev": revision})
    finally:
        engine.dispose()


def test_head_revision_is_the_latest_migration() -> None:
    assert head_revision() == "0014"


def test_upgrade_from_empty_reaches_head_and_creates_every_table(store_url: str) -> None:
    assert current_revision(store_url) is None
    assert not is_up_to_date(store_url)

    assert upgrade(store_url) == head_revision()

    assert current_revision(store_url) == head_revision()
    assert is_up_to_date(store_url)
    assert _tables(store_url) >= TABLES | {"alembic_version"}
    upgrade(store_url)  # a second run is a no-op
    assert current_revision(store_url) == head_revision()


def test_migrations_create_exactly_the_models_schema(store_url: str) -> None:
    upgrade(store_url)
    engine = create_sync_engine_for(store_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_downgrade_to_base_and_up_again(store_url: str) -> None:
    upgrade(store_url)
    command.downgrade(alembic_config(store_url), "base")
    assert current_revision(store_url) is None
    assert not (_tables(store_url) & TABLES)
    upgrade(store_url)
    assert _tables(store_url) >= TABLES


async def test_ensure_schema_migrates_the_embedded_sqlite_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "not" / "yet" / "there")
    caplog.set_level(logging.INFO, logger="controller.store.migrate")

    assert await ensure_schema(settings) == head_revision()

    assert (tmp_path / "not" / "yet" / "there" / "controller.db").is_file()
    assert is_up_to_date(settings.effective_store_url)
    assert f"migrated the embedded SQLite store to {head_revision()}" in caplog.text

    caplog.clear()
    assert await ensure_schema(settings) == head_revision()  # up to date: nothing to do
    assert "migrated" not in caplog.text


async def test_ensure_schema_migrates_an_explicit_sqlite_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'a67.db'}"
    assert await ensure_schema(Settings(data_dir=tmp_path, store_url=url)) == head_revision()
    assert is_up_to_date(url)


async def test_ensure_schema_refuses_sqlite_when_auto_migrate_is_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auto_migrate=False)

    with pytest.raises(FailedPrecondition) as caught:
        await ensure_schema(settings)

    assert caught.value.reason == "SCHEMA_OUT_OF_DATE"
    assert "`a67 migrate`" in caught.value.message
    assert current_revision(settings.effective_store_url) is None


@pytest.mark.postgres
async def test_ensure_schema_never_migrates_postgresql_implicitly(
    postgres_databases: PostgresDatabases,
) -> None:
    url = postgres_databases.create()
    settings = Settings(store_url=url, auto_migrate=True)

    with pytest.raises(FailedPrecondition) as caught:
        await ensure_schema(settings)

    assert caught.value.reason == "SCHEMA_OUT_OF_DATE"
    assert "run `a67 migrate` to upgrade it" in caught.value.message
    assert f"needs {head_revision()}" in caught.value.message
    assert current_revision(url) is None  # untouched

    upgrade(url)
    assert await ensure_schema(settings) == head_revision()


async def test_ensure_schema_refuses_a_store_from_a_newer_controller(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.effective_store_url)
    _set_revision(settings.effective_store_url, "9999_from_the_future")

    with pytest.raises(FailedPrecondition) as caught:
        await ensure_schema(settings)

    assert caught.value.reason == "SCHEMA_TOO_NEW"
    assert "9999_from_the_future" in caught.value.message


async def test_ensure_schema_on_an_unreachable_store_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(data_dir=tmp_path, store_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/a67")

    with pytest.raises(Unavailable) as caught:
        await ensure_schema(settings)

    assert caught.value.reason == "STORE_UNAVAILABLE"
