"""Master-key rotation (issue 16): ``a67 vault rotate/status/retire`` against a running
controller that rewraps every stored secret, a rewrap resumed after an interruption,
concurrent row changes never overwritten, and the append-only audit log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from controller.server import Controller
from controller.store.db import Store
from controller.store.models import (
    DatabaseInstance,
    Deployment,
    Node,
    SecretAuditEvent,
    StorageFile,
    User,
    new_id,
)
from controller.vault import Keyring, Vault
from controller.vault.audit import SecretAuditLog, audit_context
from controller.vault.rewrap import Rewrapper, count_by_key, totals
from tests.integration.test_cli import until
from tests.support import controller_settings, running_controller

ROOT = Path(__file__).resolve().parents[2]


async def _seed(
    store: Store, vault: Vault, users: int = 2, per_user: int = 3, *, deployments: bool = True
) -> dict[str, Any]:
    """Users with nodes, deployments (env in two versions), databases and files, all sealed."""
    made: dict[str, Any] = {"plain": {}}
    async with store.session() as session:
        for u in range(users):
            user = User(id=new_id(), email=f"u{u}@example.com", password_hash="x")
            session.add(user)
            await session.flush()
            for i in range(per_user):
                node_id, dep_id, db_id, file_id = new_id(), new_id(), new_id(), new_id()
                token = f"provider-token-{u}-{i}"
                session.add(
                    Node(
                        id=node_id,
                        user_id=user.id,
                        provider="render",
                        endpoint="https://n.example",
                        credentials={
                            "oauth_token": vault.encrypt_str(
                                token, owner=node_id, purpose="node-oauth-token"
                            ),
                            "oauth_provider": "render",
                        },
                    )
                )
                env = vault.encrypt_str('{"A": "1"}', owner=dep_id, purpose="deployment-env")
                old_env = vault.encrypt_str('{"A": "0"}', owner=dep_id, purpose="deployment-env")
                if deployments:
                    session.add(
                        Deployment(
                            id=dep_id,
                            user_id=user.id,
                            name=f"app{i}",
                            app_type="python",
                            manifest={"env_sealed": env, "versions": [{"env_sealed": old_env, "version": 1}]},
                            desired_replicas=1,
                        )
                    )
                session.add(
                    DatabaseInstance(
                        id=db_id,
                        user_id=user.id,
                        name=f"db{i}",
                        provider="agents",
                        connection={
                            "credentials_encrypted": vault.encrypt_str(
                                "postgres://u:p@h/db", owner=db_id, purpose="database-credentials"
                            )
                        },
                    )
                )
                session.add(
                    StorageFile(
                        id=file_id,
                        user_id=user.id,
                        path=f"/f{i}",
                        size=1,
                        encryption={
                            "key_id": "fk1",
                            "wrapped_key": vault.encrypt(
                                b"k" * 32, owner=f"user:{user.id}", purpose="storage.file-key:fk1"
                            ),
                        },
                    )
                )
                made["plain"][node_id] = token
    return made


async def _decrypt_all(store: Store, vault: Vault) -> int:
    """Decrypt every seeded secret (raises if any does not); how many."""
    n = 0
    async with store.session() as session:
        for node in (await session.execute(select(Node))).scalars():
            vault.decrypt_str(node.credentials["oauth_token"], owner=node.id, purpose="node-oauth-token")
            n += 1
        for dep in (await session.execute(select(Deployment))).scalars():
            vault.decrypt_str(dep.manifest["env_sealed"], owner=dep.id, purpose="deployment-env")
            vault.decrypt_str(
                dep.manifest["versions"][0]["env_sealed"], owner=dep.id, purpose="deployment-env"
            )
            n += 2
        for db in (await session.execute(select(DatabaseInstance))).scalars():
            vault.decrypt_str(
                db.connection["credentials_encrypted"], owner=db.id, purpose="database-credentials"
            )
            n += 1
        for f in (await session.execute(select(StorageFile))).scalars():
            vault.decrypt(
                f.encryption["wrapped_key"], owner=f"user:{f.user_id}", purpose="storage.file-key:fk1"
            )
            n += 1
    return n


def _a67(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    env.update(A67_DATA_DIR=str(data_dir), A67_CONFIG_DIR=str(data_dir / "cli"), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


async def test_rotate_status_retire_against_a_running_controller(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = controller_settings(data, vault_keyring_poll_seconds=0.1)
    async with running_controller(settings) as controller:
        assert controller.vault is not None
        await _seed(controller.store, controller.vault)
        status = await asyncio.to_thread(_a67, data, "vault", "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["keys"] == [
            {"key_id": "k1", "in_keyring": True, "primary": True, "secrets": 30}
        ]
        # The primary key cannot be retired; a key still in use neither.
        refused = await asyncio.to_thread(_a67, data, "vault", "retire", "k1")
        assert refused.returncode == 6, refused.stderr
        assert "primary" in refused.stderr

        rotated = await asyncio.to_thread(_a67, data, "vault", "rotate", "--json")
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout)["primary"] == "k2"
        assert (data / "keys" / "master.keys").stat().st_mode & 0o077 == 0

        async def rewrapped() -> bool:
            counts = totals(await count_by_key(controller.store))
            return counts == {"k2": 30}

        await until(rewrapped, "the running controller to rewrap every secret under k2")
        assert controller.vault.keyring.primary_id == "k2"
        # New secrets use k2 at once.
        assert controller.vault.encrypt_str("x", owner="o", purpose="p").startswith("a67v1:k2:")
        status = json.loads((await asyncio.to_thread(_a67, data, "vault", "status", "--json")).stdout)
        assert status["rewrap_pending"] == 0
        retired = await asyncio.to_thread(_a67, data, "vault", "retire", "k1")
        assert retired.returncode == 0, retired.stderr

        async def reloaded() -> bool:
            return controller.vault is not None and controller.vault.keyring.key_ids == ("k2",)

        await until(reloaded, "the controller to drop k1")
        assert await _decrypt_all(controller.store, controller.vault) == 30


async def test_retire_is_refused_while_a_secret_uses_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # No rewrap runs: the controller is stopped when the key is rotated.
    async with running_controller(controller_settings(data)) as controller:
        assert controller.vault is not None
        # (no deployments: these rows are not real ones a restarted controller could load)
        await _seed(controller.store, controller.vault, users=1, per_user=1, deployments=False)
    assert (await asyncio.to_thread(_a67, data, "vault", "rotate")).returncode == 0
    refused = await asyncio.to_thread(_a67, data, "vault", "retire", "k1")
    assert refused.returncode == 6
    assert "3 stored secrets still use master key k1" in refused.stderr
    shown = await asyncio.to_thread(_a67, data, "vault", "status")
    assert "3 secrets still to rewrap to k2" in shown.stdout
    # A restarted controller finishes the rewrap on its own.
    async with running_controller(controller_settings(data, vault_keyring_poll_seconds=0.1)) as controller:

        async def done() -> bool:
            return totals(await count_by_key(controller.store)) == {"k2": 3}

        await until(done, "the rewrap after a restart")
    assert (await asyncio.to_thread(_a67, data, "vault", "retire", "k1")).returncode == 0


async def test_an_interrupted_rewrap_resumes_and_never_overwrites_a_changed_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = Keyring.generate("k1")
    vault = Vault(ring)
    await _seed(store, vault, users=3, per_user=10)  # 150 secrets in 5 tables
    monkeypatch.setattr("controller.vault.rewrap.BATCH_ROWS", 7)
    vault.replace_keyring(ring.rotate())

    # "Killed" after its first batch: some secrets moved, the rest not.
    first = Rewrapper(store, vault, batch_pause_seconds=0.001)
    task = asyncio.create_task(first.run_pass())
    while first.progress.rewrapped == 0:  # noqa: ASYNC110 - stepping the loop by hand
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = totals(await count_by_key(store))
    assert partial["k2"] > 0
    assert partial["k1"] > 0

    # A deployment changes meanwhile (under the old key): the rewrap must not undo it.
    async with store.session() as session:
        dep = (await session.execute(select(Deployment).order_by(Deployment.id.desc()).limit(1))).scalar_one()
        changed = dict(dep.manifest)
        changed["note"] = "updated by someone else"
        await session.execute(update(Deployment).where(Deployment.id == dep.id).values(manifest=changed))

    again = await Rewrapper(store, vault).run_pass()  # "after the restart"
    assert again.failed == 0
    assert again.rewrapped == partial["k1"]  # exactly what was left; nothing twice
    assert totals(await count_by_key(store)) == {"k2": 150}
    async with store.session() as session:
        assert (await session.get(Deployment, dep.id)).manifest["note"] == "updated by someone else"  # type: ignore[union-attr]
    assert await _decrypt_all(store, vault) == 150


async def test_every_decryption_is_audited_append_only(store: Store) -> None:
    vault = Vault(Keyring.generate("k1"))
    audit = SecretAuditLog(store)
    vault.set_auditor(audit.record)
    made = await _seed(store, vault, users=2, per_user=1)
    node_id = next(iter(made["plain"]))
    async with store.session() as session:
        node = await session.get(Node, node_id)
    assert node is not None
    with audit_context(actor=f"node:{node_id}", reason="credential delivery"):
        vault.decrypt_str(node.credentials["oauth_token"], owner=node_id, purpose="node-oauth-token")
    await _decrypt_all(store, vault)  # default actor/reason: the controller and the calling code
    await audit.flush()
    events, _ = await audit.list_for_user(node.user_id, page_size=100)
    assert len(events) == 1 + 5  # this user's: the delivery, then their five secrets
    newest_last = list(reversed(events))
    assert newest_last[0].actor == f"node:{node_id}"
    assert newest_last[0].reason == "credential delivery"
    assert newest_last[0].secret_owner == node_id
    assert newest_last[0].key_id == "k1"
    assert {e.reason for e in newest_last[1:]} == {"_decrypt_all"}
    assert all(e.user_id == node.user_id for e in events)
    for event in events:  # never the value
        assert made["plain"][node_id] not in repr(vars(event))
    # Append-only: the store itself refuses changes.
    for statement in ("UPDATE secret_audit_events SET reason = 'x'", "DELETE FROM secret_audit_events"):
        with pytest.raises(Exception, match="append-only"):
            async with store.session() as session:
                await session.execute(text(statement))
    async with store.session() as session:
        assert len((await session.execute(select(SecretAuditEvent))).all()) == 1 + 10


async def test_the_audit_log_over_grpc_lists_only_the_callers_events(controller: Controller) -> None:
    import grpc
    from automator67.v1 import auth_pb2, auth_pb2_grpc

    from tests.support import bearer, register

    assert controller.vault is not None
    async with grpc.aio.insecure_channel(controller.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        ada = await register(stub)
        bob = await register(stub, email="bob@example.com")
        sealed = controller.vault.encrypt_str("s", owner=f"user:{ada.user_id}", purpose="test-secret")
        for _ in range(3):
            controller.vault.decrypt_str(sealed, owner=f"user:{ada.user_id}", purpose="test-secret")
        page = await stub.ListSecretAuditEvents(
            auth_pb2.ListSecretAuditEventsRequest(page_size=2), metadata=bearer(ada.access_token)
        )
        assert len(page.events) == 2
        assert page.next_page_token
        rest = await stub.ListSecretAuditEvents(
            auth_pb2.ListSecretAuditEventsRequest(page_token=page.next_page_token),
            metadata=bearer(ada.access_token),
        )
        assert len(rest.events) == 1
        assert not rest.next_page_token
        assert {e.secret_purpose for e in [*page.events, *rest.events]} == {"test-secret"}
        none = await stub.ListSecretAuditEvents(
            auth_pb2.ListSecretAuditEventsRequest(), metadata=bearer(bob.access_token)
        )
        assert list(none.events) == []


async def test_a_row_changed_between_read_and_write_is_left_alone(store: Store) -> None:
    from controller.vault.rewrap import LOCATIONS, RewrapProgress, _batches

    ring = Keyring.generate("k1")
    vault = Vault(ring)
    await _seed(store, vault, users=1, per_user=2)
    vault.replace_keyring(ring.rotate())
    location = next(loc for loc in LOCATIONS if loc.model is Deployment)
    rows = [row async for batch in _batches(store, location) for row in batch]
    async with store.session() as session:  # someone updates the first deployment meanwhile
        manifest = dict(rows[0][1], note="theirs")
        await session.execute(update(Deployment).where(Deployment.id == rows[0][0]).values(manifest=manifest))
    progress = RewrapProgress()
    await Rewrapper(store, vault)._rewrap_rows(location, rows, progress)
    assert (progress.conflicts, progress.rewrapped) == (1, 2)  # the other row's two env values
    async with store.session() as session:
        first = await session.get(Deployment, rows[0][0])
    assert first is not None
    assert first.manifest["note"] == "theirs"
    assert first.manifest["env_sealed"].startswith("a67v1:k1:")  # next pass moves it
