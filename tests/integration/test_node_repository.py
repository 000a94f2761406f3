"""The node registry on SQLite and PostgreSQL: ownership, uniqueness, pagination, status writes."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.errors import AlreadyExists, InvalidArgument
from controller.nodes import repository as repository_module
from controller.nodes.repository import NodeRepository
from controller.store import Store, UserRepository, paging
from controller.store.models import Node, User
from controller.store.paging import decode_page_token, encode_page_token

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
CAPS: dict[str, Any] = {"cpu_cores": 2.0, "memory_gb": 4.0, "node_types": ["compute"]}


@pytest.fixture
async def alice(store: Store) -> User:
    return await UserRepository(store).create("alice@example.com", "hash")


@pytest.fixture
async def bob(store: Store) -> User:
    return await UserRepository(store).create("bob@example.com", "hash")


@pytest.fixture
def nodes(store: Store) -> NodeRepository:
    return NodeRepository(store)


async def make(
    nodes: NodeRepository,
    user: User,
    *,
    fingerprint: str | None = None,
    created_at: datetime | None = None,
    **extra: Any,
) -> Node:
    return await nodes.create(
        user_id=user.id,
        provider="render",
        endpoint="https://node.example.com",
        region="us-east-1",
        capabilities=CAPS,
        fingerprint=fingerprint,
        created_at=created_at,
        **extra,
    )


# --- create and get -----------------------------------------------------------------------------


async def test_create_and_read_back(nodes: NodeRepository, alice: User) -> None:
    created = await nodes.create(
        user_id=alice.id,
        provider="flyio",
        endpoint="https://n1.fly.dev",
        region="eu-west",
        capabilities=CAPS,
        fingerprint="fp-0123456789abcdef",
        credentials={"oauth_token": "a67v1:ciphertext"},
        cert_serial="abc123",
        created_at=T0,
    )
    got = await nodes.get(created.id)
    assert got is not None
    assert got.user_id == alice.id
    assert got.provider == "flyio"
    assert got.endpoint == "https://n1.fly.dev"
    assert got.region == "eu-west"
    assert got.status == "initializing"
    assert got.capabilities == CAPS
    assert got.credentials == {"oauth_token": "a67v1:ciphertext"}
    assert got.fingerprint == "fp-0123456789abcdef"
    assert got.cert_serial == "abc123"
    assert got.created_at == T0
    assert got.metrics_current is None
    assert got.last_heartbeat is None
    assert await nodes.get("00000000-0000-0000-0000-000000000000") is None


async def test_create_with_a_given_id(nodes: NodeRepository, alice: User) -> None:
    node = await make(nodes, alice, node_id="11111111-2222-3333-4444-555555555555")
    assert node.id == "11111111-2222-3333-4444-555555555555"
    assert await nodes.get(node.id) is not None


async def test_ownership_is_checked_in_the_query(nodes: NodeRepository, alice: User, bob: User) -> None:
    node = await make(nodes, alice)
    found = await nodes.get_for_user(alice.id, node.id)
    assert found is not None
    assert found.id == node.id
    assert await nodes.get_for_user(bob.id, node.id) is None
    assert await nodes.get_for_user(alice.id, "00000000-0000-0000-0000-000000000000") is None


async def test_fingerprints_are_unique_per_user(nodes: NodeRepository, alice: User, bob: User) -> None:
    first = await make(nodes, alice, fingerprint="fp-0123456789abcdef")
    with pytest.raises(AlreadyExists) as info:
        await make(nodes, alice, fingerprint="fp-0123456789abcdef")
    assert info.value.reason == "NODE_ALREADY_REGISTERED"
    assert info.value.metadata == {"node_id": first.id}

    # Another user may have an installation with the same fingerprint; nodes without one are fine.
    await make(nodes, bob, fingerprint="fp-0123456789abcdef")
    await make(nodes, alice)
    await make(nodes, alice)

    found = await nodes.get_by_fingerprint(alice.id, "fp-0123456789abcdef")
    assert found is not None
    assert found.id == first.id
    assert await nodes.get_by_fingerprint(alice.id, "fp-unknown-unknown") is None
    assert await nodes.count_for_user(alice.id) == 3
    assert await nodes.count_for_user(bob.id) == 1


async def test_concurrent_creates_of_one_fingerprint_let_exactly_one_through(
    nodes: NodeRepository, alice: User
) -> None:
    async def attempt() -> Node | AlreadyExists:
        try:
            return await make(nodes, alice, fingerprint="fp-race-0123456789")
        except AlreadyExists as exc:
            return exc

    results = await asyncio.gather(*(attempt() for _ in range(8)))
    winners = [r for r in results if isinstance(r, Node)]
    losers = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(winners) == 1
    assert len(losers) == 7
    assert {e.metadata["node_id"] for e in losers} == {winners[0].id}


# --- listing ------------------------------------------------------------------------------------


async def test_list_pages_by_created_at_then_id(nodes: NodeRepository, alice: User, bob: User) -> None:
    made = []
    for i in range(7):
        # Pairs share a creation time, so the id breaks ties.
        made.append(await make(nodes, alice, created_at=T0 + timedelta(seconds=i // 2)))
    await make(nodes, bob, created_at=T0)
    expected = [n.id for n in sorted(made, key=lambda n: (n.created_at, n.id))]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = await nodes.list_for_user(alice.id, page_size=3, page_token=token)
        pages += 1
        seen.extend(n.id for n in page)
        assert len(page) <= 3
        if not token:
            break
    assert seen == expected
    assert pages == 3

    page, token = await nodes.list_for_user(alice.id, page_size=7)
    assert [n.id for n in page] == expected
    assert token == ""
    page, _ = await nodes.list_for_user(bob.id)
    assert len(page) == 1


async def test_list_leaves_out_removed_nodes_unless_asked(nodes: NodeRepository, alice: User) -> None:
    kept = await make(nodes, alice, created_at=T0)
    gone = await make(nodes, alice, created_at=T0 + timedelta(seconds=1))
    assert await nodes.mark_removed(gone.id, T0)
    page, _ = await nodes.list_for_user(alice.id)
    assert [n.id for n in page] == [kept.id]
    page, _ = await nodes.list_for_user(alice.id, include_removed=True)
    assert [n.id for n in page] == [kept.id, gone.id]


async def test_page_size_default_and_clamp(
    nodes: NodeRepository, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        await make(nodes, alice, created_at=T0 + timedelta(seconds=i))
    monkeypatch.setattr(paging, "DEFAULT_PAGE_SIZE", 3)
    monkeypatch.setattr(paging, "MAX_PAGE_SIZE", 4)
    page, token = await nodes.list_for_user(alice.id, page_size=0)
    assert len(page) == 3
    assert token
    page, token = await nodes.list_for_user(alice.id, page_size=10_000)
    assert len(page) == 4
    assert token


def test_real_page_size_limits() -> None:
    assert repository_module.DEFAULT_PAGE_SIZE == 50
    assert repository_module.MAX_PAGE_SIZE == 500


async def test_negative_page_size_is_invalid(nodes: NodeRepository, alice: User) -> None:
    with pytest.raises(InvalidArgument) as info:
        await nodes.list_for_user(alice.id, page_size=-1)
    assert [v.field for v in info.value.field_violations] == ["page_size"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        "a",
        _b64(b"not json"),
        _b64(json.dumps({"a": 1}).encode()),
        _b64(json.dumps(["2025-01-01T00:00:00", "id"]).encode()),  # naive time
        _b64(json.dumps(["yesterday", "id"]).encode()),
        _b64(json.dumps(["2025-01-01T00:00:00+00:00", ""]).encode()),
        _b64(json.dumps(["2025-01-01T00:00:00+00:00", 5]).encode()),
        _b64(b"\xff\xfe"),
        "x" * 1000,
    ],
)
async def test_malformed_page_tokens_are_invalid_argument(
    nodes: NodeRepository, alice: User, token: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await nodes.list_for_user(alice.id, page_token=token)
    assert [v.field for v in info.value.field_violations] == ["page_token"]


def test_page_tokens_round_trip() -> None:
    token = encode_page_token(T0, "some-id")
    assert "=" not in token
    assert decode_page_token(token) == (T0, "some-id")


# --- writes -------------------------------------------------------------------------------------


async def test_update_status(nodes: NodeRepository, alice: User) -> None:
    node = await make(nodes, alice)
    assert await nodes.update_status(node.id, "ready", now=T0)
    got = await nodes.get(node.id)
    assert got is not None
    assert got.status == "ready"
    assert not await nodes.update_status("00000000-0000-0000-0000-000000000000", "ready", now=T0)
    assert await nodes.update_status(node.id, "busy")  # now defaults to the current time
    with pytest.raises(ValueError, match="unknown node status"):
        await nodes.update_status(node.id, "sleepy", now=T0)


async def test_record_heartbeat_never_goes_back(nodes: NodeRepository, alice: User) -> None:
    node = await make(nodes, alice)
    metrics = {"cpu_percent": 12.5, "memory_percent": 40.0}
    assert await nodes.record_heartbeat(node.id, last_heartbeat=T0, metrics=metrics)
    got = await nodes.get(node.id)
    assert got is not None
    assert got.last_heartbeat == T0
    assert got.metrics_current == metrics
    assert got.last_metrics_update == T0

    later = T0 + timedelta(seconds=30)
    assert await nodes.record_heartbeat(node.id, last_heartbeat=later, metrics=None)
    got = await nodes.get(node.id)
    assert got is not None
    assert got.last_heartbeat == later
    assert got.metrics_current == metrics  # untouched without metrics
    assert got.last_metrics_update == T0

    assert not await nodes.record_heartbeat(node.id, last_heartbeat=T0, metrics={"cpu_percent": 99.0})
    got = await nodes.get(node.id)
    assert got is not None
    assert got.last_heartbeat == later
    assert got.metrics_current == metrics


async def test_certificates_and_removal(nodes: NodeRepository, alice: User) -> None:
    node = await make(nodes, alice, fingerprint="fp-0123456789abcdef")
    assert await nodes.get_by_certificate(node.id, "abc") is None
    assert await nodes.set_certificate(node.id, "abc")
    found = await nodes.get_by_certificate(node.id, "abc")
    assert found is not None
    assert found.id == node.id
    assert await nodes.get_by_certificate(node.id, "abd") is None
    assert await nodes.get_by_certificate(node.id, "") is None

    assert await nodes.mark_removed(node.id, T0)
    got = await nodes.get(node.id)
    assert got is not None
    assert got.status == "removed"
    assert got.cert_serial is None
    assert got.fingerprint is None
    assert await nodes.get_by_certificate(node.id, "abc") is None

    # Removed is terminal for status, heartbeat and certificate writes.
    assert not await nodes.update_status(node.id, "ready", now=T0)
    assert not await nodes.record_heartbeat(node.id, last_heartbeat=T0, metrics=None)
    assert not await nodes.set_certificate(node.id, "def")
    assert await nodes.mark_removed(node.id, T0)  # idempotent
    assert await nodes.update_status(node.id, "removed")
    assert await nodes.mark_removed(node.id)
    got = await nodes.get(node.id)
    assert got is not None
    assert got.status == "removed"
    assert got.cert_serial is None

    # The installation may enroll again as a new node.
    again = await make(nodes, alice, fingerprint="fp-0123456789abcdef")
    assert again.id != node.id
    assert not await nodes.mark_removed("00000000-0000-0000-0000-000000000000", T0)


async def test_list_active_spans_users_and_skips_removed(
    nodes: NodeRepository, alice: User, bob: User
) -> None:
    a = await make(nodes, alice, created_at=T0)
    b = await make(nodes, bob, created_at=T0 + timedelta(seconds=1))
    c = await make(nodes, alice, created_at=T0 + timedelta(seconds=2))
    await nodes.update_status(b.id, "failed", now=T0)
    await nodes.mark_removed(c.id, T0)
    assert [n.id for n in await nodes.list_active()] == [a.id, b.id]


async def test_delete(nodes: NodeRepository, alice: User) -> None:
    node = await make(nodes, alice)
    assert await nodes.delete(node.id)
    assert await nodes.get(node.id) is None
    assert not await nodes.delete(node.id)
