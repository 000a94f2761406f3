"""Group commits of the deployments repository: concurrent creates and updates share one
transaction, and one caller's failure never loses or commits another caller's rows.
On SQLite and on PostgreSQL alike."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.deployments.repository import Conflict, DeploymentRepository
from controller.errors import AlreadyExists
from controller.store import Store, UserRepository
from controller.store.models import Deployment, DeploymentPackage, utcnow


def deployment(user_id: str, name: str) -> Deployment:
    now = utcnow()
    return Deployment(
        user_id=user_id,
        name=name,
        app_type="backend",
        status="pending",
        manifest={"version": 1},
        node_assignments=[],
        current_replicas=0,
        desired_replicas=1,
        endpoints=[],
        created_at=now,
        updated_at=now,
    )


def package(digest: str) -> DeploymentPackage:
    return DeploymentPackage(sha256=digest * 64, data=b"", size=1, created_at=utcnow())


async def names(repo: DeploymentRepository) -> list[str]:
    return sorted(row.name for row in await repo.list_all())


async def test_concurrent_creates_commit_together_and_a_taken_name_fails_alone(store: Store) -> None:
    user = await UserRepository(store).create("batch@example.com", "hash")
    repo = DeploymentRepository(store)
    taken = deployment(user.id, "taken")
    await repo.create(taken, package("a"))
    batch = [deployment(user.id, f"app-{i}") for i in range(5)]
    batch.insert(2, deployment(user.id, "taken"))  # the same name again, in the middle
    results = await asyncio.gather(
        *(repo.create(d, package("b" if i % 2 else "c")) for i, d in enumerate(batch)),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results] == ["NoneType"] * 2 + ["AlreadyExists"] + ["NoneType"] * 3
    assert isinstance(results[2], AlreadyExists)
    assert await names(repo) == ["app-0", "app-1", "app-2", "app-3", "app-4", "taken"]
    kept = await repo.get_by_name(user.id, "taken")
    assert kept is not None
    assert kept.id == taken.id  # not overwritten
    for digest in "abc":
        assert await repo.get_package(digest * 64) is not None


async def test_concurrent_updates_one_bad_row_and_one_conflict_fail_alone(store: Store) -> None:
    user = await UserRepository(store).create("updates@example.com", "hash")
    repo = DeploymentRepository(store)
    rows = [deployment(user.id, f"app-{i}") for i in range(5)]
    for row in rows:
        await repo.create(row, package("a"))
    stale = await repo.get(rows[3].id)  # a copy that another writer overtakes
    assert stale is not None
    rows[3].status = "deploying"
    await repo.update(rows[3])
    for row in rows:
        row.status = "running"
    rows[1].manifest = {"not json": object()}  # breaks the shared statement's parameters
    stale.status = "failed"
    updates: list[Any] = [rows[0], rows[1], rows[2], stale, rows[4]]
    results = await asyncio.gather(*(repo.update(row) for row in updates), return_exceptions=True)
    assert results[0] is None
    assert results[2] is None
    assert results[4] is None
    assert isinstance(results[1], Exception)
    assert not isinstance(results[1], Conflict)
    assert isinstance(results[3], Conflict)
    stored = {row.name: row.status for row in await repo.list_all()}
    assert stored == {
        "app-0": "running",
        "app-1": "pending",
        "app-2": "running",
        "app-3": "deploying",
        "app-4": "running",
    }


async def test_updates_of_one_deployment_apply_in_order(store: Store) -> None:
    user = await UserRepository(store).create("order@example.com", "hash")
    repo = DeploymentRepository(store)
    row = deployment(user.id, "app")
    await repo.create(row, package("a"))
    for status in ("deploying", "running", "stopped"):
        row.status = status
        await repo.update(row)
    stored = await repo.get(row.id)
    assert stored is not None
    assert stored.status == "stopped"
    assert stored.updated_at == row.updated_at
