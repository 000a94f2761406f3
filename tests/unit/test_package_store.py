"""Sources kept on the controller's disk by digest (controller/deployments/blobs.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from controller.deployments.blobs import PackageStore
from controller.errors import InvalidArgument, ResourceExhausted


async def test_an_inline_source_is_stored_once_by_digest(tmp_path: Path) -> None:
    store = PackageStore(tmp_path, max_bytes=1024)
    data = b"\x1f\x8b source bytes"
    first = await store.receive_bytes("user-1", data)
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.size == len(data)
    assert first.path.read_bytes() == data
    inode = first.path.stat().st_ino
    again = await store.receive_bytes("user-1", data)  # already whole: not written again
    assert again == first
    assert again.path.stat().st_ino == inode
    assert store.source("user-1", first.sha256) == first
    assert store.source("user-2", first.sha256) is None  # another user's looks missing
    assert list((tmp_path / "tmp").iterdir()) == []  # no temporary file left behind


async def test_an_inline_source_that_is_empty_or_too_large_is_refused_and_nothing_kept(
    tmp_path: Path,
) -> None:
    store = PackageStore(tmp_path, max_bytes=8)
    with pytest.raises(InvalidArgument, match="empty"):
        await store.receive_bytes("user-1", b"")
    with pytest.raises(ResourceExhausted) as raised:
        await store.receive_bytes("user-1", b"123456789")
    assert raised.value.reason == "SOURCE_TOO_LARGE"
    assert not (tmp_path / "sources" / "user-1").exists() or not any(
        (tmp_path / "sources" / "user-1").iterdir()
    )
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_damaged_copy_on_disk_is_replaced_not_trusted(tmp_path: Path) -> None:
    store = PackageStore(tmp_path, max_bytes=1024)
    data = b"the source"
    stored = await store.receive_bytes("user-1", data)
    stored.path.write_bytes(b"short")  # not the size its name promises
    again = await store.receive_bytes("user-1", data)
    assert again.path.read_bytes() == data
