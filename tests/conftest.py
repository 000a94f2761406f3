"""Shared fixtures: store URLs (SQLite and PostgreSQL) and caches (Redis).

* ``store_url`` is parametrized over ``sqlite`` (a fresh file under ``tmp_path``) and
  ``postgresql`` (a fresh, uniquely named database, dropped afterwards), both empty;
* ``postgres_databases`` makes more such databases on demand;
* ``redis_url`` / ``redis_cache`` use Redis database 15 and a unique key prefix whose
  keys are deleted afterwards.

Servers are found at ``A67_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) and ``A67_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/15``). When one is unreachable its tests are skipped, except
under CI (``CI`` set and non-empty), where a missing server is a test failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from controller.cache.redis_cache import RedisCache

POSTGRES_ADMIN_URL = os.environ.get("A67_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("A67_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def service_missing(message: str) -> NoReturn:
    """Skip the test because a server is missing, or fail it under CI."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_prepared_transactions(url: str) -> None:
    """Skip (fail under CI) unless the PostgreSQL server behind ``url`` allows PREPARE TRANSACTION."""
    with psycopg.connect(_conninfo(url), connect_timeout=5) as conn:
        row = conn.execute("SHOW max_prepared_transactions").fetchone()
    if row is None or int(row[0]) <= 0:
        service_missing(
            "PostgreSQL has max_prepared_transactions = 0: cross-shard commits need PREPARE TRANSACTION "
            "(ALTER SYSTEM SET max_prepared_transactions = 100, then restart the server; .ci/run does)"
        )


def _conninfo(url: str) -> str:
    """A libpq URI (no SQLAlchemy driver suffix) for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDatabases:
    """Creates uniquely named empty databases on the test server and drops them."""

    def __init__(self, admin_url: str) -> None:
        self._admin = _conninfo(admin_url)
        self._base = make_url(admin_url).set(drivername="postgresql+psycopg")
        self._names: list[str] = []

    def create(self) -> str:
        """A fresh empty database; returns its SQLAlchemy URL (``postgresql+psycopg://…``)."""
        name = f"a67_test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self._admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._names.append(name)
        return self._base.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        """Drop the database behind ``url`` (closing any connections still open on it)."""
        name = make_url(url).database
        if name not in self._names:
            return
        with psycopg.connect(self._admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._names.remove(name)

    def drop_all(self) -> None:
        for name in list(self._names):
            self.drop(self._base.set(database=name).render_as_string(hide_password=False))


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The URL of the test PostgreSQL server's admin database; skips (fails in CI) if unreachable."""
    where = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=True)
    try:
        with psycopg.connect(_conninfo(POSTGRES_ADMIN_URL), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        service_missing(
            f"PostgreSQL is not reachable at {where} ({type(exc).__name__}): start it with "
            "`service postgresql start` (user postgres, trust auth, database `test`) "
            "or set A67_TEST_POSTGRES_URL"
        )
    return POSTGRES_ADMIN_URL


@pytest.fixture(scope="module")
def postgres_databases(postgres_admin_url: str) -> Iterator[PostgresDatabases]:
    """A factory of fresh databases; whatever it made is dropped when the module ends."""
    databases = PostgresDatabases(postgres_admin_url)
    try:
        yield databases
    finally:
        databases.drop_all()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty store: an SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'controller.db'}"
        return
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    url = databases.create()
    try:
        yield url
    finally:
        databases.drop(url)


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    """The test Redis URL (database 15); skips (fails in CI) if unreachable."""
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        service_missing(
            f"Redis is not reachable at {REDIS_TEST_URL} ({type(exc).__name__}): start it with "
            "`service redis-server start` or set A67_TEST_REDIS_URL"
        )
    finally:
        client.close()
    return REDIS_TEST_URL


@pytest.fixture
def redis_key_prefix(redis_server_url: str) -> Iterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    prefix = f"a67test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_server_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The URL of the test Redis (database 15). Use ``redis_key_prefix`` for keys."""
    return redis_server_url


@pytest.fixture
async def redis_cache(redis_url: str, redis_key_prefix: str) -> AsyncIterator[RedisCache]:
    """A :class:`RedisCache` on the test Redis whose keys are private to this test."""
    cache = RedisCache(redis_url, key_prefix=redis_key_prefix)
    try:
        yield cache
    finally:
        await cache.close()
