"""Deployments and their packages in the store.

Each method is one unit of work. Deployment rows are read and written whole:
the service serialises changes to one deployment (a lock per deployment), so a
read-modify-write never races with itself inside one controller.

Uniqueness is settled by the database: ``(user_id, name)`` and
``(user_id, request_id)`` are unique constraints, and :meth:`create` reports
which one a concurrent insert lost on.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from controller.errors import AlreadyExists, Unavailable
from controller.store.db import Store
from controller.store.models import Deployment, DeploymentPackage, DeploymentSource, utcnow
from controller.store.paging import DEFAULT_PAGE_SIZE, keyset_page

NAME_TAKEN = "DEPLOYMENT_NAME_TAKEN"

log = logging.getLogger("a67.deployments")

UPDATE_BATCH_ROWS = 200
"""Deployment updates written in one store transaction, at most (see :meth:`DeploymentRepository.update`)."""
CREATE_BATCH_ROWS = 100
"""New deployments inserted in one store transaction, at most (see :meth:`DeploymentRepository.create`)."""

_MUTABLE = (
    "status",
    "manifest",
    "node_assignments",
    "current_replicas",
    "desired_replicas",
    "endpoints",
    "deployed_at",
    "last_scaled_at",
    "lease_owner",
    "lease_until",
)
"""The columns a deployment's changes write (name, owner and request id never change)."""
_CHECKED = ("status", "node_assignments", "desired_replicas", "lease_owner")
"""What tells a write of ours from another writer's at the same ``updated_at`` (see ``_write_batch``)."""


_TABLE: Table = Deployment.__table__  # type: ignore[assignment]
_UPDATE = (
    _TABLE.update()
    .where(_TABLE.c.id == bindparam("b_id"), _TABLE.c.updated_at == bindparam("b_expected"))
    .values(
        {name: bindparam(f"b_{name}", type_=_TABLE.c[name].type) for name in _MUTABLE}
        | {"updated_at": bindparam("b_version", type_=_TABLE.c.updated_at.type)}
    )
)
"""One deployment's changes, written only if its row is still at the version read."""


class RequestIdTaken(Exception):
    """A concurrent create with the same request id won: read that deployment instead."""


class Conflict(Exception):
    """The deployment row changed in the store since it was read (another writer), or is gone."""


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Answer one caller of a group commit: done, or ``error`` (a cancellation if not an Exception)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error if isinstance(error, Exception) else asyncio.CancelledError())


def _next_version(previous: datetime | None, now: datetime) -> datetime:
    """``updated_at`` for a write: now, but always later than the version it replaces."""
    if previous is not None and now <= previous:
        return previous + timedelta(microseconds=1)
    return now


class DeploymentRepository:
    """Deployment rows and package blobs."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[Deployment, datetime | None, datetime, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._creates: list[tuple[Deployment, DeploymentPackage, asyncio.Future[None]]] = []
        self._creator: asyncio.Task[None] | None = None

    async def create(self, deployment: Deployment, package: DeploymentPackage) -> None:
        """Insert the deployment and (unless already kept) its package, in one transaction.

        ``AlreadyExists`` (``DEPLOYMENT_NAME_TAKEN``) if the name is taken;
        :class:`RequestIdTaken` if a concurrent create with the same request id won.

        Concurrent creates share one transaction (group commit, at most
        :data:`CREATE_BATCH_ROWS`); if any of them breaks a unique constraint, the
        shared transaction is rolled back and each create is tried in a transaction of
        its own, so one create's failure never loses (or commits) another's rows.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._creates.append((deployment, package, future))
        if self._creator is None or self._creator.done():
            self._creator = asyncio.ensure_future(self._create_pending())
        try:
            await asyncio.shield(future)
        except IntegrityError as exc:
            if deployment.request_id and await self.get_by_request_id(
                deployment.user_id, deployment.request_id
            ):
                raise RequestIdTaken from exc
            raise AlreadyExists(
                f"A deployment named {deployment.name!r} already exists",
                reason=NAME_TAKEN,
                metadata={"name": deployment.name},
            ) from exc

    async def _create_pending(self) -> None:
        while self._creates:
            batch = self._creates[:CREATE_BATCH_ROWS]
            del self._creates[:CREATE_BATCH_ROWS]
            try:
                await self._insert(batch)
            except IntegrityError as exc:
                if len(batch) == 1:
                    _settle(batch[0][2], exc)
                    continue
                for one in batch:  # find the creates that fail: each alone
                    try:
                        await self._insert([one])
                    except BaseException as exc:
                        _settle(one[2], exc)
                        if not isinstance(exc, Exception):
                            raise
                    else:
                        _settle(one[2], None)
                continue
            except BaseException as exc:
                for _, _, future in batch:
                    _settle(future, exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, _, future in batch:
                _settle(future, None)

    async def _insert(self, batch: list[tuple[Deployment, DeploymentPackage, asyncio.Future[None]]]) -> None:
        """One transaction: the packages not yet kept, then the deployments (one ``executemany``
        each). A write first, no read: an SQLite transaction that reads, then writes, fails at
        once ("database is locked") if another connection wrote in between."""
        packages = {package.sha256: package for _, package, _ in batch}
        async with self._store.session() as session:
            await session.execute(
                self._insert_package(), [self._package_values(p) for p in packages.values()]
            )
            session.add_all([deployment for deployment, _, _ in batch])

    @staticmethod
    def _package_values(package: DeploymentPackage) -> dict[str, Any]:
        return {
            "sha256": package.sha256,
            "data": package.data,
            "size": package.size,
            "created_at": package.created_at or utcnow(),
        }

    def _insert_package(self) -> Any:
        """``INSERT`` of package rows unless one with its digest is kept (either dialect)."""
        if self._store.dialect_name == "postgresql":
            return postgresql_insert(DeploymentPackage).on_conflict_do_nothing()
        return sqlite_insert(DeploymentPackage).on_conflict_do_nothing()

    async def get(self, deployment_id: str) -> Deployment | None:
        async with self._store.session() as session:
            return await session.get(Deployment, deployment_id)

    async def get_for_user(self, user_id: str, deployment_id: str) -> Deployment | None:
        async with self._store.session() as session:
            result = await session.execute(
                select(Deployment).where(Deployment.id == deployment_id, Deployment.user_id == user_id)
            )
            return result.scalar_one_or_none()

    async def get_by_request_id(self, user_id: str, request_id: str) -> Deployment | None:
        async with self._store.session() as session:
            result = await session.execute(
                select(Deployment).where(Deployment.user_id == user_id, Deployment.request_id == request_id)
            )
            return result.scalar_one_or_none()

    async def get_by_name(self, user_id: str, name: str) -> Deployment | None:
        async with self._store.session() as session:
            result = await session.execute(
                select(Deployment).where(Deployment.user_id == user_id, Deployment.name == name)
            )
            return result.scalar_one_or_none()

    async def list_for_user(
        self, user_id: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[Deployment], str]:
        """One page of the user's deployments, oldest first, and the next page's token ("" = last)."""
        statement = select(Deployment).where(Deployment.user_id == user_id)
        return await keyset_page(self._store, statement, Deployment, page_size, page_token)

    async def list_versions(self) -> list[Any]:
        """Every deployment's id, version (``updated_at``), status and lease, oldest first: what
        the reconciler reads each pass (whole rows only of those that changed, :meth:`get_many`)."""
        async with self._store.session() as session:
            result = await session.execute(
                select(
                    _TABLE.c.id,
                    _TABLE.c.updated_at,
                    _TABLE.c.status,
                    _TABLE.c.lease_owner,
                    _TABLE.c.lease_until,
                ).order_by(_TABLE.c.created_at, _TABLE.c.id)
            )
            return list(result.all())

    async def get_many(self, deployment_ids: list[str]) -> list[Deployment]:
        """The rows of ``deployment_ids`` that exist (any order)."""
        rows: list[Deployment] = []
        async with self._store.session() as session:
            for start in range(0, len(deployment_ids), 500):
                result = await session.execute(
                    select(Deployment).where(Deployment.id.in_(deployment_ids[start : start + 500]))
                )
                rows.extend(result.scalars())
        return rows

    async def list_all(self) -> list[Deployment]:
        """Every deployment (for the reconciler and the in-memory assignment index)."""
        async with self._store.session() as session:
            result = await session.execute(select(Deployment).order_by(Deployment.created_at, Deployment.id))
            return list(result.scalars())

    async def save(self, deployment: Deployment) -> None:
        """Write the deployment's mutable fields back."""
        deployment.updated_at = utcnow()
        async with self._store.session() as session:
            await session.merge(deployment)

    async def update(self, deployment: Deployment) -> None:
        """Write the deployment's mutable fields if its row is still the version it was read at.

        The version is ``updated_at``: the row is written only ``WHERE updated_at`` is the
        value ``deployment`` holds (no read first), and gets a later one; :class:`Conflict`
        if another writer changed (or deleted) the row meanwhile. Concurrent updates of
        different deployments share one transaction (group commit, at most
        :data:`UPDATE_BATCH_ROWS`): each is one statement, so each is all or nothing, and
        each caller returns once its row is committed.
        """
        expected = deployment.updated_at
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((deployment, expected, _next_version(expected, utcnow()), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())
        await asyncio.shield(future)

    async def _write_pending(self) -> None:
        while self._pending:
            batch = self._pending[:UPDATE_BATCH_ROWS]
            del self._pending[:UPDATE_BATCH_ROWS]
            try:
                written = await self._write_batch(batch)
            except Unavailable as exc:  # the store, not a row: every caller gets it
                for _, _, _, future in batch:
                    _settle(future, exc)
                continue
            except BaseException as exc:
                if len(batch) == 1 or not isinstance(exc, Exception):
                    for _, _, _, future in batch:
                        _settle(future, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                # one row's values broke the shared statement: write each alone, so only its
                # caller gets the error and nobody else's change is lost
                written = set()
                for one in batch:
                    try:
                        written |= await self._write_batch([one])
                    except Exception as single:
                        _settle(one[3], single)
            for deployment, _, version, future in batch:
                if future.done():
                    continue
                if deployment.id in written:
                    deployment.updated_at = version
                    future.set_result(None)
                else:
                    future.set_exception(
                        Conflict(f"deployment {deployment.id} changed in the store meanwhile")
                    )

    async def _write_batch(
        self, batch: list[tuple[Deployment, datetime | None, datetime, asyncio.Future[None]]]
    ) -> set[str]:
        """One transaction, one ``executemany``: the ids whose rows were written."""
        params = [
            {
                "b_id": deployment.id,
                "b_expected": expected,
                "b_version": version,
                **{f"b_{name}": getattr(deployment, name) for name in _MUTABLE},
            }
            for deployment, expected, version, _ in batch
        ]
        async with self._store.session() as session:
            connection = await session.connection()
            result = await connection.execute(_UPDATE, params)
            if getattr(result, "rowcount", -1) == len(batch):
                return {deployment.id for deployment, _, _, _ in batch}
            # some rows had changed: the ones now at the version and values this batch wrote are
            # ours (another controller may have written the same microsecond: the values differ,
            # its lease owner at least)
            rows = await connection.execute(
                select(_TABLE.c.id, _TABLE.c.updated_at, *(_TABLE.c[name] for name in _CHECKED)).where(
                    _TABLE.c.id.in_([p["b_id"] for p in params])
                )
            )
            now = {row.id: tuple(row)[1:] for row in rows}
            return {
                p["b_id"]
                for p in params
                if now.get(p["b_id"]) == (p["b_version"], *(p[f"b_{name}"] for name in _CHECKED))
            }

    async def release_leases(self, owner: str) -> int:
        """Clear every deployment lease ``owner`` holds (a new version of each row: a copy read
        before is not written back over it); how many."""
        async with self._store.session() as session:
            result = await session.execute(
                _TABLE.update()
                .where(_TABLE.c.lease_owner == owner)
                .values(lease_owner=None, lease_until=None, updated_at=utcnow())
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def delete(self, deployment_id: str) -> bool:
        async with self._store.session() as session:
            result = await session.execute(delete(Deployment).where(Deployment.id == deployment_id))
            return bool(getattr(result, "rowcount", 0))

    async def add_package(self, package: DeploymentPackage) -> None:
        """Keep ``package`` unless a package with its checksum is already kept."""
        await self._add_once(package, package.sha256)

    async def add_source(self, source: DeploymentSource) -> None:
        """Keep a user's source unless the user already has one with its checksum."""
        await self._add_once(source, (source.user_id, source.sha256))

    async def _add_once(self, row: DeploymentPackage | DeploymentSource, key: object) -> None:
        """Insert ``row`` unless a row with its primary ``key`` is there (content-addressed:
        the one there is the same)."""
        try:
            async with self._store.session() as session:
                if await session.get(type(row), key) is None:
                    session.add(row)
        except IntegrityError:  # a concurrent insert of the same content
            pass

    async def get_source(self, user_id: str, sha256: str) -> DeploymentSource | None:
        async with self._store.session() as session:
            return await session.get(DeploymentSource, (user_id, sha256))

    async def get_package(self, sha256: str) -> DeploymentPackage | None:
        async with self._store.session() as session:
            return await session.get(DeploymentPackage, sha256)
