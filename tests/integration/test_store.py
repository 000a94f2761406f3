"""The store and its repositories, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2_grpc
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError

from controller.errors import AlreadyExists, Unavailable
from controller.store import (
    AuthFailureRepository,
    ConsumeOutcome,
    RefreshTokenRepository,
    Store,
    UserRepository,
)
from controller.store.db import ensure_data_dir
from controller.store.models import (
    Base,
    DatabaseInstance,
    Deployment,
    Node,
    NodeEnrollmentToken,
    RefreshToken,
    StorageFile,
    User,
)
from tests.support import controller_settings, register, running_controller

T0 = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


@pytest.fixture
async def user(store: Store) -> User:
    return await UserRepository(store).create("owner@example.com", "hash")


# --- users --------------------------------------------------------------------------------------


async def test_create_user_normalises_email_and_reads_back(store: Store) -> None:
    users = UserRepository(store)
    created = await users.create("  Alice@Example.COM ", "argon2-hash", now=T0)

    assert created.email == "alice@example.com"
    assert not created.mfa_enabled
    assert created.active
    for lookup in ("alice@example.com", "ALICE@example.com", " alice@EXAMPLE.com"):
        found = await users.get_by_email(lookup)
        assert found is not None
        assert found.id == created.id
    by_id = await users.get(created.id)
    assert by_id is not None
    assert by_id.password_hash == "argon2-hash"
    assert by_id.created_at == T0
    assert_utc(by_id.created_at)
    assert by_id.last_login is None
    assert await users.get_by_email("bob@example.com") is None
    assert await users.get("00000000-0000-0000-0000-000000000000") is None


async def test_duplicate_email_is_already_exists(store: Store) -> None:
    users = UserRepository(store)
    await users.create("carol@example.com", "h1")

    with pytest.raises(AlreadyExists) as caught:
        await users.create("Carol@Example.com", "h2")

    assert caught.value.reason == "EMAIL_TAKEN"
    assert "already exists" in caught.value.message
    found = await users.get_by_email("carol@example.com")
    assert found is not None
    assert found.password_hash == "h1"


async def test_concurrent_signups_with_one_email_let_exactly_one_through(store: Store) -> None:
    users = UserRepository(store)

    results = await asyncio.gather(
        *(users.create("race@example.com", f"h{i}") for i in range(10)), return_exceptions=True
    )

    created = [r for r in results if isinstance(r, User)]
    refused = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(created) == 1
    assert len(refused) == 9
    assert all(r.reason == "EMAIL_TAKEN" for r in refused)


async def test_touch_last_login_and_update_password_hash(store: Store, user: User) -> None:
    users = UserRepository(store)
    when = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))

    assert await users.touch_last_login(user.id, when)
    assert await users.update_password_hash(user.id, "new-hash")

    reloaded = await users.get(user.id)
    assert reloaded is not None
    assert reloaded.last_login == when
    assert_utc(reloaded.last_login)
    assert reloaded.last_login.hour == 12
    assert reloaded.password_hash == "new-hash"
    assert not await users.touch_last_login("no-such-user", when)
    assert not await users.update_password_hash("no-such-user", "x")


async def test_naive_datetimes_are_refused(store: Store, user: User) -> None:
    with pytest.raises((ValueError, StatementError), match="naive"):
        await UserRepository(store).touch_last_login(user.id, datetime(2025, 1, 1))


# --- refresh tokens -----------------------------------------------------------------------------


async def test_refresh_token_rotation_outcomes(store: Store, user: User) -> None:
    tokens = RefreshTokenRepository(store)
    family = await tokens.create_family(user.id, now=T0)
    await tokens.add_token("jti-1", family, user.id, T0, T0 + timedelta(days=7))

    first = await tokens.consume("jti-1", replaced_by="jti-2", now=T0 + timedelta(minutes=5))
    assert first.outcome is ConsumeOutcome.OK
    assert first.ok
    assert (first.family_id, first.user_id) == (family, user.id)
    assert first.expires_at == T0 + timedelta(days=7)
    assert_utc(first.expires_at)

    again = await tokens.consume("jti-1", replaced_by="jti-3", now=T0 + timedelta(minutes=6))
    assert again.outcome is ConsumeOutcome.REUSED
    assert again.outcome == "reused"
    assert (again.family_id, again.user_id) == (family, user.id)

    unknown = await tokens.consume("never-issued", replaced_by="x", now=T0)
    assert unknown.outcome is ConsumeOutcome.UNKNOWN
    assert unknown.family_id is None

    async with store.session() as session:
        row = await session.get(RefreshToken, "jti-1")
    assert row is not None
    assert row.replaced_by == "jti-2"
    assert row.used_at == T0 + timedelta(minutes=5)
    assert_utc(row.used_at)
    assert_utc(row.issued_at)


async def test_revoked_family_refuses_its_unused_tokens(store: Store, user: User) -> None:
    tokens = RefreshTokenRepository(store)
    family = await tokens.create_family(user.id)
    await tokens.add_token("live", family, user.id, T0, T0 + timedelta(days=7))
    assert not await tokens.is_family_revoked(family)

    assert await tokens.revoke_family(family, "logout", T0)
    assert not await tokens.revoke_family(family, "reuse_detected", T0 + timedelta(seconds=1))

    assert await tokens.is_family_revoked(family)
    assert await tokens.is_family_revoked("no-such-family")
    result = await tokens.consume("live", replaced_by="next", now=T0)
    assert result.outcome is ConsumeOutcome.FAMILY_REVOKED
    assert result.family_id == family
    async with store.session() as session:
        row = await session.get(RefreshToken, "live")
        reason = await session.scalar(
            text("SELECT revoked_reason FROM refresh_token_families WHERE id = :id"), {"id": family}
        )
    assert row is not None
    assert row.used_at is None
    assert reason == "logout"


async def test_revoke_all_for_user(store: Store, user: User) -> None:
    tokens = RefreshTokenRepository(store)
    families = [await tokens.create_family(user.id) for _ in range(3)]
    await tokens.revoke_family(families[0], "logout", T0)

    assert await tokens.revoke_all_for_user(user.id, "password_changed", T0) == 2
    assert all([await tokens.is_family_revoked(f) for f in families])


async def test_concurrent_consumes_of_one_token_have_exactly_one_winner(store: Store, user: User) -> None:
    tokens = RefreshTokenRepository(store)
    family = await tokens.create_family(user.id)
    await tokens.add_token("contested", family, user.id, T0, T0 + timedelta(days=7))

    results = await asyncio.gather(
        *(tokens.consume("contested", replaced_by=f"next-{i}", now=T0) for i in range(20))
    )

    outcomes = [r.outcome for r in results]
    assert outcomes.count(ConsumeOutcome.OK) == 1
    assert outcomes.count(ConsumeOutcome.REUSED) == 19
    winner = outcomes.index(ConsumeOutcome.OK)
    async with store.session() as session:
        row = await session.get(RefreshToken, "contested")
    assert row is not None
    assert row.replaced_by == f"next-{winner}"


# --- authentication failures --------------------------------------------------------------------


async def test_auth_failures_count_in_a_fixed_window(store: Store) -> None:
    failures = AuthFailureRepository(store)
    key = "login:dave@example.com"

    assert await failures.get(key) is None
    counts = [await failures.record_failure(key, T0 + timedelta(seconds=s), 60) for s in (0, 10, 59)]
    assert counts == [1, 2, 3]
    row = await failures.get(key)
    assert row is not None
    assert row.failures == 3
    assert row.window_started_at == T0
    assert_utc(row.window_started_at)

    # The window started at T0 is over at T0+60s: a new one starts.
    assert await failures.record_failure(key, T0 + timedelta(seconds=60), 60) == 1
    assert await failures.record_failure(key, T0 + timedelta(seconds=61), 60) == 2

    await failures.lock(key, T0 + timedelta(minutes=15), T0)
    locked = await failures.get(key)
    assert locked is not None
    assert locked.locked_until == T0 + timedelta(minutes=15)
    assert locked.failures == 2

    await failures.reset(key)
    assert await failures.get(key) is None
    await failures.reset(key)  # idempotent


async def test_concurrent_auth_failures_are_all_counted(store: Store) -> None:
    failures = AuthFailureRepository(store)

    counts = await asyncio.gather(*(failures.record_failure("login:eve", T0, 300) for _ in range(10)))

    assert sorted(counts) == list(range(1, 11))
    row = await failures.get("login:eve")
    assert row is not None
    assert row.failures == 10


async def test_lock_creates_a_counter_when_there_is_none(store: Store) -> None:
    failures = AuthFailureRepository(store)
    await failures.lock("login:frank", T0 + timedelta(minutes=1), T0)
    row = await failures.get("login:frank")
    assert row is not None
    assert (row.failures, row.locked_until) == (0, T0 + timedelta(minutes=1))


# --- the other tables ---------------------------------------------------------------------------


async def test_resource_tables_round_trip_json_and_enforce_constraints(store: Store, user: User) -> None:
    capabilities = {"cpu_cores": 0.5, "memory_gb": 0.5, "disk_gb": 1, "max_concurrent_requests": 100}
    async with store.session() as session:
        node = Node(
            user_id=user.id, provider="render", endpoint="https://n1.example", capabilities=capabilities
        )
        other = Node(user_id=user.id, provider="flyio", endpoint="https://n2.example")
        session.add_all([node, other])
        session.add(
            Deployment(
                user_id=user.id,
                name="api",
                app_type="backend",
                manifest={"runtime": "python3.11", "replicas": 2, "env": {"KEY": "ciphertext"}},
                desired_replicas=2,
                endpoints=["https://api.example"],
                request_id="req-1",
            )
        )
        session.add(
            DatabaseInstance(
                user_id=user.id, name="main", provider="postgresql", connection={"endpoint": "db.example"}
            )
        )
        session.add(StorageFile(user_id=user.id, path="docs/a.pdf", size=3 * 2**32, chunks=[{"index": 0}]))
        session.add(NodeEnrollmentToken(user_id=user.id, token_hash="sha256:abc", expires_at=T0))

    async with store.session() as session:
        loaded = await session.get(Node, node.id)
        deployment = (await session.execute(select(Deployment))).scalar_one()
        stored_file = (await session.execute(select(StorageFile))).scalar_one()
    assert loaded is not None
    assert loaded.capabilities == capabilities
    assert loaded.credentials == {}
    assert loaded.status == "initializing"
    assert_utc(loaded.created_at)
    assert deployment.manifest["env"] == {"KEY": "ciphertext"}
    assert deployment.endpoints == ["https://api.example"]
    assert deployment.node_assignments == []
    assert deployment.current_replicas == 0
    assert stored_file.size == 3 * 2**32

    # Nodes without a fingerprint may coexist; a fingerprint is unique per user.
    async with store.session() as session:
        node_row = await session.get(Node, node.id)
        assert node_row is not None
        node_row.fingerprint = "fp-1"
    with pytest.raises(IntegrityError):
        await _set_fingerprint(store, other.id, "fp-1")
    with pytest.raises(IntegrityError):
        await _add(
            store, Deployment(user_id=user.id, name="api", app_type="worker", manifest={}, desired_replicas=1)
        )
    with pytest.raises(IntegrityError):  # foreign keys are enforced (PRAGMA foreign_keys on SQLite)
        await _add(store, Node(user_id="no-such-user", provider="render", endpoint="https://x"))


async def _set_fingerprint(store: Store, node_id: str, fingerprint: str) -> None:
    async with store.session() as session:
        node = await session.get(Node, node_id)
        assert node is not None
        node.fingerprint = fingerprint


async def _add(store: Store, row: Base) -> None:
    async with store.session() as session:
        session.add(row)


async def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'deep' / 'dir' / 'a67.db'}")
    try:
        async with store.session() as session:
            assert (await session.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await session.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await session.execute(text("PRAGMA busy_timeout"))).scalar() == 15_000
    finally:
        await store.close()
    assert (tmp_path / "deep" / "dir" / "a67.db").is_file()


# --- file permissions ---------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The common umask 022, under which files are created world-readable unless made private."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _store_files(db: Path) -> dict[str, int]:
    """The modes of the database file and its -wal and -shm files (which must all exist)."""
    return {
        path.name: _mode(path)
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))
    }


async def _write(store: Store) -> None:
    async with store.session() as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        await session.execute(text("INSERT INTO t VALUES (1)"))


@pytest.mark.usefixtures("open_umask")
async def test_a_new_sqlite_store_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "new" / "dir" / "a67.db"
    store = await Store.open(f"sqlite:///{db}")
    try:
        await _write(store)
        # -wal and -shm exist while a connection is open: SQLite made them after the write.
        assert _store_files(db) == {"a67.db": 0o600, "a67.db-wal": 0o600, "a67.db-shm": 0o600}
        assert _mode(db.parent) == 0o700  # the directory made for it
    finally:
        await store.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    store = await Store.open(f"sqlite:///{shared / 'a67.db'}")
    try:
        await _write(store)
        assert _mode(shared / "a67.db") == 0o600
        assert _mode(shared) == 0o755  # an existing directory (it may be /tmp) is left alone
    finally:
        await store.close()


@pytest.mark.usefixtures("open_umask")
async def test_an_older_versions_data_dir_and_store_files_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    db = data / "controller.db"
    older = sqlite3.connect(db)  # as an older version left it: WAL files present, all 0644
    try:
        older.execute("PRAGMA journal_mode=WAL")
        older.execute("CREATE TABLE t (x INTEGER)")
        older.commit()
        assert _store_files(db) == {
            "controller.db": 0o644,
            "controller.db-wal": 0o644,
            "controller.db-shm": 0o644,
        }
        assert _mode(data) == 0o755
        ensure_data_dir(data)
        assert _mode(data) == 0o700
        assert _store_files(db) == {
            "controller.db": 0o600,
            "controller.db-wal": 0o600,
            "controller.db-shm": 0o600,
        }
    finally:
        older.close()
    db.chmod(0o640)  # a store file elsewhere (A67_STORE_URL) is tightened when it is opened
    store = await Store.open(f"sqlite:///{db}")
    try:
        await _write(store)
        assert _store_files(db) == {
            "controller.db": 0o600,
            "controller.db-wal": 0o600,
            "controller.db-shm": 0o600,
        }
    finally:
        await store.close()


@pytest.mark.usefixtures("open_umask")
async def test_the_controller_keeps_its_data_dir_and_store_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    async with (
        running_controller(controller_settings(data)) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        await register(auth_pb2_grpc.AuthServiceStub(channel))  # a write
        assert _mode(data) == 0o700
        assert _store_files(data / "controller.db") == {
            "controller.db": 0o600,
            "controller.db-wal": 0o600,
            "controller.db-shm": 0o600,
        }


# --- the store being down -----------------------------------------------------------------------


async def test_unreachable_store_is_unavailable() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/a67"

    with pytest.raises(Unavailable) as caught:
        await Store.open(url)

    assert caught.value.reason == "STORE_UNAVAILABLE"
    assert "127.0.0.1" not in caught.value.message


async def test_store_going_away_makes_repositories_unavailable() -> None:
    store = await Store.open(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/a67", check=False)
    try:
        with pytest.raises(Unavailable) as caught:
            await UserRepository(store).get_by_email("a@example.com")
        assert caught.value.reason == "STORE_UNAVAILABLE"
        with pytest.raises(Unavailable):
            await store.ping()
    finally:
        await store.close()
