"""Master-key rotation: find every stored secret, count them per key id, rewrap them.

Every vault ciphertext the store holds is listed in :data:`LOCATIONS` (table, column,
where in the column, and the owner and purpose the vault binds it to):

===================  ===============================================  ==============================
table                where                                            owner / purpose
===================  ===============================================  ==============================
nodes                ``credentials.oauth_token``, ``credentials.      node id / ``node-oauth-token``,
                     refresh_token``                                  ``node-oauth-refresh-token``
deployments          every ``env_sealed`` in ``manifest`` (the        deployment id /
                     current version and kept ones)                   ``deployment-env``
database_instances   ``connection.credentials_encrypted``             database id /
                                                                      ``database-credentials``
storage_files        ``encryption.wrapped_key``                       ``user:<id>`` /
                                                                      ``storage.file-key:<key id>``
user_mfa             ``secret_encrypted``                             ``user:<id>`` / ``mfa-totp``
===================  ===============================================  ==============================

:func:`count_by_key` reads them all and answers "how many secrets per master key id"
(``a67 vault status``). :class:`Rewrapper` moves every secret that is not under the
primary key to it, in batches of rows (one short transaction each, the event loop
yielding between them so the API keeps answering). Each row is written back with a
compare-and-set on the column it read, so a concurrent change of the row (a deployment
update) is never overwritten: that row is simply read again on the next pass. Progress
lives in the data itself (each ciphertext names its key), so a rewrap interrupted by a
restart resumes where it was: the next pass skips what is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import InstrumentedAttribute

from controller.leases import LoopLeases, my_turn
from controller.store.db import Store
from controller.store.models import DatabaseInstance, Deployment, Node, StorageFile, UserMfa
from controller.vault.audit import audit_context
from controller.vault.envelope import FORMAT_VERSION, Vault, VaultError
from controller.vault.keyring import Keyring

log = logging.getLogger(__name__)

REWRAP_LEASE = "vault-rewrap"
"""The rewrap's loop lease: one controller sharing the store rewraps at a time."""

BATCH_ROWS = 200
"""Rows read and written per transaction."""

UNKNOWN = "?"
"""Key id reported for a value that is not a vault ciphertext."""


@dataclass(frozen=True)
class Secret:
    """One vault ciphertext in a row, and how to put a new one in its place."""

    owner: str
    purpose: str
    token: str
    path: tuple[str | int, ...]
    """Where in the column's value (empty: the column itself)."""


def _key_id(token: str) -> str:
    if not token.startswith(FORMAT_VERSION + ":"):
        return UNKNOWN
    return token.split(":", 2)[1] or UNKNOWN


def _walk_env(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every ``env_sealed`` string in a deployment's manifest JSON."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "env_sealed" and isinstance(item, str):
                yield (*path, key), item
            else:
                yield from _walk_env(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_env(item, (*path, index))


def _set(value: Any, path: tuple[str | int, ...], new: str) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        copy[head] = _set(value[head], rest, new)
        return copy
    items = list(value)
    items[head] = _set(items[head], rest, new)  # type: ignore[index]
    return items


@dataclass(frozen=True)
class Location:
    """A table column that holds vault ciphertexts."""

    name: str
    model: type[Any]
    key: InstrumentedAttribute[Any]
    column: InstrumentedAttribute[Any]
    extra: tuple[InstrumentedAttribute[Any], ...]
    secrets: Callable[[Any, Any, tuple[Any, ...]], list[Secret]]
    """``(row key, column value, extra values)`` → the secrets in it."""


def _node_secrets(node_id: Any, credentials: Any, _extra: tuple[Any, ...]) -> list[Secret]:
    found = []
    if isinstance(credentials, dict):
        for name, purpose in (
            ("oauth_token", "node-oauth-token"),
            ("refresh_token", "node-oauth-refresh-token"),
        ):
            token = credentials.get(name)
            if isinstance(token, str) and token:
                found.append(Secret(str(node_id), purpose, token, (name,)))
    return found


def _deployment_secrets(deployment_id: Any, manifest: Any, _extra: tuple[Any, ...]) -> list[Secret]:
    return [Secret(str(deployment_id), "deployment-env", token, path) for path, token in _walk_env(manifest)]


def _database_secrets(database_id: Any, connection: Any, _extra: tuple[Any, ...]) -> list[Secret]:
    token = connection.get("credentials_encrypted") if isinstance(connection, dict) else None
    if isinstance(token, str) and token:
        return [Secret(str(database_id), "database-credentials", token, ("credentials_encrypted",))]
    return []


def _file_secrets(_file_id: Any, encryption: Any, extra: tuple[Any, ...]) -> list[Secret]:
    if not isinstance(encryption, dict):
        return []
    token, key_id = encryption.get("wrapped_key"), encryption.get("key_id")
    if isinstance(token, str) and token and key_id:
        return [Secret(f"user:{extra[0]}", f"storage.file-key:{key_id}", token, ("wrapped_key",))]
    return []


def _mfa_secrets(user_id: Any, sealed: Any, _extra: tuple[Any, ...]) -> list[Secret]:
    if isinstance(sealed, str) and sealed:
        return [Secret(f"user:{user_id}", "mfa-totp", sealed, ())]
    return []


LOCATIONS: tuple[Location, ...] = (
    Location("node provider tokens", Node, Node.id, Node.credentials, (), _node_secrets),
    Location(
        "deployment env values", Deployment, Deployment.id, Deployment.manifest, (), _deployment_secrets
    ),
    Location(
        "database credentials",
        DatabaseInstance,
        DatabaseInstance.id,
        DatabaseInstance.connection,
        (),
        _database_secrets,
    ),
    Location(
        "storage file keys",
        StorageFile,
        StorageFile.id,
        StorageFile.encryption,
        (StorageFile.user_id,),
        _file_secrets,
    ),
    Location("MFA secrets", UserMfa, UserMfa.user_id, UserMfa.secret_encrypted, (), _mfa_secrets),
)


async def _batches(store: Store, location: Location) -> Any:
    """Rows ``(key, value, extra…)`` of a location in key order, a batch at a time."""
    last: Any = None
    while True:
        query = select(location.key, location.column, *location.extra).order_by(location.key)
        if last is not None:
            query = query.where(location.key > last)
        async with store.session() as session:
            rows = (await session.execute(query.limit(BATCH_ROWS))).all()
        if not rows:
            return
        yield rows
        last = rows[-1][0]


async def count_by_key(store: Store) -> dict[str, dict[str, int]]:
    """``{location name: {key id: secrets}}`` over every stored secret."""
    result: dict[str, dict[str, int]] = {}
    for location in LOCATIONS:
        counts: Counter[str] = Counter()
        async for rows in _batches(store, location):
            for row in rows:
                for secret in location.secrets(row[0], row[1], tuple(row[2:])):
                    counts[_key_id(secret.token)] += 1
            await asyncio.sleep(0)
        result[location.name] = dict(counts)
    return result


def totals(by_location: dict[str, dict[str, int]]) -> dict[str, int]:
    """Secrets per key id over all locations."""
    total: Counter[str] = Counter()
    for counts in by_location.values():
        total.update(counts)
    return dict(total)


@dataclass
class RewrapProgress:
    """What the last (or running) pass did."""

    running: bool = False
    passes: int = 0
    rewrapped: int = 0
    conflicts: int = 0
    failed: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    primary: str = ""
    errors: list[str] = field(default_factory=list)


class Rewrapper:
    """Moves every stored secret to the vault's primary key, in the background.

    :meth:`run_pass` does one pass over every location; :meth:`start` runs a pass at
    start-up and whenever the keyring's primary key changes (``keyring_source``, if
    given, is polled every ``poll_seconds`` and its keyring swapped into the vault).
    """

    def __init__(
        self,
        store: Store,
        vault: Vault,
        *,
        keyring_source: Callable[[], Keyring | None] | None = None,
        poll_seconds: float = 10.0,
        batch_pause_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._vault = vault
        self._source = keyring_source
        self._poll = poll_seconds
        self._pause = batch_pause_seconds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.loop_leases: LoopLeases | None = None
        """Set by the server: one controller sharing the store rewraps at a time
        (controller/leases.py)."""
        self._done_for: str | None = None
        self.progress = RewrapProgress()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vault-rewrap")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reload_keyring(self) -> bool:
        """Swap in the source's keyring if it changed; whether it did."""
        if self._source is None:
            return False
        try:
            ring = self._source()
        except Exception as exc:  # a half-edited file: keep the current ring
            log.warning("cannot reload the vault keyring: %s", exc)
            return False
        if ring is None or ring == self._vault.keyring:
            return False
        self._vault.replace_keyring(ring)
        log.info("vault keyring reloaded: keys %s, primary %s", ", ".join(ring.key_ids), ring.primary_id)
        return True

    async def _run(self) -> None:
        while True:
            try:
                self.reload_keyring()
                if self._done_for != self._vault.keyring.primary_id and await my_turn(
                    self.loop_leases, REWRAP_LEASE, self._poll
                ):
                    await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down, say: try again later
                log.warning("vault rewrap pass failed, retrying: %s", type(exc).__name__)
            await asyncio.sleep(self._poll)

    async def run_pass(self) -> RewrapProgress:
        """Rewrap every secret not under the primary key; the pass's progress."""
        primary = self._vault.keyring.primary_id
        progress = RewrapProgress(running=True, started_at=self._clock(), primary=primary)
        progress.passes = self.progress.passes + 1
        self.progress = progress
        clean = True
        for location in LOCATIONS:
            async for rows in _batches(self._store, location):
                if self._vault.keyring.primary_id != primary:
                    clean = False  # rotated again meanwhile: the next pass picks it up
                    break
                await self._rewrap_rows(location, rows, progress)
                await asyncio.sleep(self._pause)
        progress.running = False
        progress.finished_at = self._clock()
        if clean and progress.conflicts == 0 and progress.failed == 0:
            self._done_for = primary
        if progress.rewrapped or progress.failed:
            log.info(
                "vault rewrap to %s: %d secrets rewrapped, %d rows changed meanwhile, %d failed",
                primary,
                progress.rewrapped,
                progress.conflicts,
                progress.failed,
            )
        return progress

    async def _rewrap_rows(self, location: Location, rows: list[Any], progress: RewrapProgress) -> None:
        primary = self._vault.keyring.primary_id
        changes: list[tuple[Any, Any, Any, int]] = []
        with audit_context(actor="controller", reason="master key rotation: rewrap"):
            for row in rows:
                key, value = row[0], row[1]
                new_value = value
                moved = 0
                for secret in location.secrets(key, value, tuple(row[2:])):
                    if _key_id(secret.token) == primary:
                        continue
                    try:
                        fresh = self._vault.rewrap(secret.token, owner=secret.owner, purpose=secret.purpose)
                    except VaultError as exc:
                        progress.failed += 1
                        if len(progress.errors) < 20:
                            progress.errors.append(f"{location.name} {key}: {type(exc).__name__}")
                        continue
                    new_value = _set(new_value, secret.path, fresh)
                    moved += 1
                if moved:
                    changes.append((key, value, new_value, moved))
        if not changes:
            return
        table = location.model.__table__
        column = table.c[location.column.key]
        statement = (
            update(table)
            .where(
                table.c[location.key.key] == bindparam("_key"),
                column == bindparam("_old", type_=column.type),
            )
            .values({column.key: bindparam("_new", type_=column.type)})
        )
        rewrapped = conflicts = 0
        async with self._store.session() as session:
            connection = await session.connection()
            params = [{"_key": key, "_old": old, "_new": new} for key, old, new, _ in changes]
            result = await connection.execute(statement, params)
            if result.rowcount == len(changes):
                rewrapped = sum(moved for *_, moved in changes)
            else:  # some row changed meanwhile: the others are written; find which one(s) by key
                written = await connection.execute(
                    select(table.c[location.key.key], column).where(
                        table.c[location.key.key].in_([key for key, *_ in changes])
                    )
                )
                now = {key: value for key, value in written.all()}
                for key, _old, new, moved in changes:
                    if now.get(key) == new:
                        rewrapped += moved
                    else:
                        conflicts += 1
        # Counted once committed.
        progress.rewrapped += rewrapped
        progress.conflicts += conflicts


__all__ = [
    "LOCATIONS",
    "RewrapProgress",
    "Rewrapper",
    "count_by_key",
    "totals",
]
