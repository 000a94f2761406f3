"""Packages from users' sources: built in a worker thread straight to disk, found by digest.

A deployment's package is built from the user's source (inline bytes or an upload,
by digest) and its manifest (``package.py``); it is kept on disk by digest
(``blobs.PackageStore``), and a version stored before packages moved to disk is
written out from its row on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

from controller.deployments.blobs import PackageStore, Stored, is_sha256
from controller.deployments.package import build_package_file
from controller.deployments.package_unpack import PackageLimits
from controller.deployments.repository import DeploymentRepository
from controller.errors import FieldViolation, InvalidArgument, NotFound
from controller.store.models import DeploymentSource


class Sources:
    """Package building and look-up for the harness."""

    def __init__(self, packages: PackageStore, repo: DeploymentRepository) -> None:
        self.packages = packages
        self.repo = repo
        self.package_limits = PackageLimits(max_compressed_bytes=packages.max_bytes)
        self.share = False
        """Several controllers (``A67_SCALE_OUT``): sources are kept in the store as well as
        on the disk of the controller that received them, so a deployment by digest can go
        through any controller."""

    async def receive(
        self, user_id: str, chunks: AsyncIterable[bytes], *, expected_size: int = 0, expected_sha256: str = ""
    ) -> Stored:
        """An upload (``UploadSource``, ``UploadSourceBody``): on disk, and in the store when shared."""
        stored = await self.packages.receive(
            user_id, chunks, expected_size=expected_size, expected_sha256=expected_sha256
        )
        await self._keep(user_id, stored)
        return stored

    async def _keep(self, user_id: str, stored: Stored, data: bytes | None = None) -> None:
        """Shared: the source's bytes to the store too (``data``, if the caller has them)."""
        if self.share:
            if data is None:
                data = await asyncio.to_thread(stored.path.read_bytes)
            await self.repo.add_source(
                DeploymentSource(user_id=user_id, sha256=stored.sha256, data=data, size=stored.size)
            )

    async def _find(self, user_id: str, digest: str) -> Stored | None:
        """The user's source by digest: on this disk, else (shared) from the store to this disk."""
        found = self.packages.source(user_id, digest)
        if found is not None or not self.share:
            return found
        row = await self.repo.get_source(user_id, digest)
        if row is None:
            return None
        return await self.packages.put_source_bytes(user_id, digest, bytes(row.data))

    async def build_with_source(
        self, user_id: str, valid: Any, inline: bytes, source_sha256: str
    ) -> tuple[Stored, str]:
        """The package of ``valid`` from the inline source or the user's uploaded one, built in a
        worker thread straight to disk (by digest; the inline source is kept as an upload
        too), and the digest of the source it was built from."""
        if inline and source_sha256:
            raise InvalidArgument(
                "Give the source either inline or by digest, not both",
                field_violations=[
                    FieldViolation("source_sha256", "must be empty when source_tar_gz is given")
                ],
            )
        if inline:
            source = await self.packages.receive_bytes(user_id, inline)
            await self._keep(user_id, source, inline)  # it can be referred to by digest later
        else:
            digest = source_sha256.strip().lower()
            if not is_sha256(digest):
                raise InvalidArgument(
                    "Invalid source digest",
                    field_violations=[FieldViolation("source_sha256", "must be 64 hexadecimal characters")],
                )
            found = await self._find(user_id, digest)
            if found is None:
                raise NotFound(
                    f"Source {digest} was not found: upload it first (UploadSource)",
                    reason="SOURCE_NOT_FOUND",
                )
            source = found

        def build() -> tuple[str, int, Path]:
            return build_package_file(
                valid,
                source.path,
                self.packages.new_sink(),
                self.packages.packages_dir,
                limits=self.package_limits,
            )

        sha256, size, path = await asyncio.to_thread(build)  # one hop: the sink is a file too
        return Stored(sha256, size, path), source.sha256

    async def package_file(self, sha256: str) -> Stored | None:
        """The package ``sha256`` on disk (written out from the store if an older version kept
        its bytes in the row); None if it is unknown."""
        found = self.packages.package(sha256)
        if found is not None:
            return found
        row = await self.repo.get_package(sha256)
        if row is None or not row.data:
            return None
        return await self.packages.put_package_bytes(sha256, bytes(row.data))
