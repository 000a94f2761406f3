"""Email normalisation in the store: uniqueness of lookalikes, and migration 0003 of old rows.

Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from controller.errors import AlreadyExists
from controller.store.db import Store, create_sync_engine_for
from controller.store.migrate import current_revision, upgrade
from controller.store.repositories import UserRepository

PAIRS = [
    ("jos\u00e9@example.com", "jose\u0301@example.com"),
    ("ops@b\u00fccher.example", "ops@xn--bcher-kva.example"),
    ("adm@example.com", "\uff41dm@example.com"),
]


async def test_lookalikes_cannot_both_be_created_and_either_form_finds_the_account(store_url: str) -> None:
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    try:
        users = UserRepository(store)
        for first, second in PAIRS:
            created = await users.create(first, "hash")
            with pytest.raises(AlreadyExists):
                await users.create(second, "hash")
            for form in (first, second):
                found = await users.get_by_email(form)
                assert found is not None
                assert found.id == created.id
    finally:
        await store.close()


# What the old code stored (trimmed and lower-cased only), oldest first.
OLD_ROWS = [
    ("u1", "jose\u0301@example.com"),  # NFD: becomes NFC
    ("u2", "ops@b\u00fccher.example"),  # Unicode domain: becomes the A-label
    ("u3", "\uff42ob@example.com"),  # full-width, older than its normal twin
    ("u4", "bob@example.com"),  # already normal: keeps its email
    ("u5", "ada@example.com"),  # untouched
    ("u6", "stra\u00dfe@example.com"),  # ß: case folding makes it ss
    ("u7", "carol@b\u00fccher.example"),
    ("u8", "carol@xn--bcher-kva.example"),  # already normal; u7 is its lookalike
]


def _insert_old_rows(url: str) -> None:
    engine = create_sync_engine_for(url)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        with engine.begin() as conn:
            for index, (user_id, email) in enumerate(OLD_ROWS):
                conn.execute(
                    text(
                        "INSERT INTO users (id, email, password_hash, created_at, mfa_enabled, active) "
                        "VALUES (:id, :email, 'hash', :created_at, false, true)"
                    ),
                    {"id": user_id, "email": email, "created_at": t0 + timedelta(minutes=index)},
                )
    finally:
        engine.dispose()


def _emails(url: str) -> dict[str, str]:
    engine = create_sync_engine_for(url)
    try:
        with engine.connect() as conn:
            return {row[0]: row[1] for row in conn.execute(text("SELECT id, email FROM users"))}
    finally:
        engine.dispose()


async def test_migration_0003_normalises_stored_emails_and_keeps_lookalike_duplicates_apart(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(upgrade, store_url, "0002")
    await asyncio.to_thread(_insert_old_rows, store_url)

    with caplog.at_level(logging.WARNING):
        await asyncio.to_thread(upgrade, store_url, "0003")

    assert current_revision(store_url) == "0003"
    assert _emails(store_url) == {
        "u1": "jos\u00e9@example.com",
        "u2": "ops@xn--bcher-kva.example",
        "u3": "\uff42ob@example.com",  # its normal form belongs to u4
        "u4": "bob@example.com",
        "u5": "ada@example.com",
        "u6": "strasse@example.com",
        "u7": "carol@b\u00fccher.example",  # its normal form belongs to u8
        "u8": "carol@xn--bcher-kva.example",
    }
    assert "user ids u3, u7" in caplog.text
    assert "bob@" not in caplog.text  # ids only, no emails in the log

    store = await Store.open(store_url)
    try:
        users = UserRepository(store)
        for form, user_id in (
            ("JOSE\u0301@example.com", "u1"),
            ("ops@B\u00dcCHER.example", "u2"),
            ("\uff42ob@example.com", "u4"),
            ("Stra\u00dfe@Example.com", "u6"),
        ):
            found = await users.get_by_email(form)
            assert found is not None
            assert found.id == user_id
    finally:
        await store.close()
