"""Deployments and their packages in the store.

Each method is one unit of work. Deployment rows are read and written whole:
the service serialises changes to one deployment (a lock per deployment), so a
read-modify-write never races with itself inside one controller.

Uniqueness is settled by the database: ``(user_id, name)`` and
``(user_id, request_id)`` are unique constraints, and :meth:`create` reports
which one a concurrent insert lost on.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from controller.errors import AlreadyExists
from controller.store.db import Store
from controller.store.models import Deployment, DeploymentPackage, utcnow
from controller.store.paging import DEFAULT_PAGE_SIZE, keyset_page

NAME_TAKEN = "DEPLOYMENT_NAME_TAKEN"


class RequestIdTaken(Exception):
    """A concurrent create with the same request id won: read that deployment instead."""


class DeploymentRepository:
    """Deployment rows and package blobs."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(self, deployment: Deployment, package: DeploymentPackage) -> None:
        """Insert the deployment and (unless already kept) its package, in one transaction.

        ``AlreadyExists`` (``DEPLOYMENT_NAME_TAKEN``) if the name is taken;
        :class:`RequestIdTaken` if a concurrent create with the same request id won.
        """
        try:
            async with self._store.session() as session:
                if await session.get(DeploymentPackage, package.sha256) is None:
                    session.add(package)
                session.add(deployment)
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

    async def delete(self, deployment_id: str) -> bool:
        async with self._store.session() as session:
            result = await session.execute(delete(Deployment).where(Deployment.id == deployment_id))
            return bool(getattr(result, "rowcount", 0))

    async def add_package(self, package: DeploymentPackage) -> None:
        """Keep ``package`` unless a package with its checksum is already kept."""
        try:
            async with self._store.session() as session:
                if await session.get(DeploymentPackage, package.sha256) is None:
                    session.add(package)
        except IntegrityError:  # a concurrent insert of the same package
            pass

    async def get_package(self, sha256: str) -> DeploymentPackage | None:
        async with self._store.session() as session:
            return await session.get(DeploymentPackage, sha256)
