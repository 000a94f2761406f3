"""Users' sources shared between controllers through the store (SQLite and PostgreSQL):
with ``A67_SCALE_OUT`` a source uploaded to one controller is found by digest by another,
which writes it to its own disk; it stays the uploading user's; alone, a controller keeps
sources on its disk only."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import delete, func, select

from controller.deployments.blobs import PackageStore
from controller.deployments.repository import DeploymentRepository
from controller.deployments.sources import Sources
from controller.store.models import DeploymentSource, User
from tests.support import migrated_store


async def _chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def test_a_source_uploaded_to_one_controller_is_found_by_another(
    store_url: str, tmp_path: Path
) -> None:
    async with migrated_store(store_url) as store:
        async with store.session() as session:
            session.add_all([User(id="u1", email="ada@example.com", password_hash="x"),
                             User(id="u2", email="bob@example.com", password_hash="x")])  # fmt: skip
        repo = DeploymentRepository(store)
        here, there = Sources(PackageStore(tmp_path / "a"), repo), Sources(PackageStore(tmp_path / "b"), repo)
        data = b"a source archive" * 1000
        digest = hashlib.sha256(data).hexdigest()

        # alone (not shared): on the receiving controller's disk only
        await here.receive("u1", _chunks(data[:7000], data[7000:]))
        assert await there._find("u1", digest) is None
        async with store.session() as session:
            assert await session.scalar(select(func.count()).select_from(DeploymentSource)) == 0

        here.share = there.share = True
        stored = await here.receive("u1", _chunks(data), expected_sha256=digest)
        assert stored.sha256 == digest
        found = await there._find("u1", digest)  # another controller: from the store to its disk
        assert found is not None
        assert found.path == tmp_path / "b" / "sources" / "u1" / digest
        assert found.path.read_bytes() == data
        assert await there._find("u2", digest) is None  # another user's source looks missing
        await here.receive("u1", _chunks(data))  # the same upload again: kept once
        async with store.session() as session:
            assert await session.scalar(select(func.count()).select_from(DeploymentSource)) == 1

        # a user removed: their sources go with them
        async with store.session() as session:
            await session.execute(delete(User).where(User.id == "u1"))
        async with store.session() as session:
            assert await session.scalar(select(func.count()).select_from(DeploymentSource)) == 0
