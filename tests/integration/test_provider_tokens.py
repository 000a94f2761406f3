"""Provider-token life cycle against a real OAuth 2.0 server process (tests/credentials/).

The refresher runs on a real store (SQLite) with the real vault and Authlib adapters;
only its clock, sleep and randomness are injected, so nothing waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from controller.credentials.providers import load_adapters
from controller.credentials.refresher import CREDENTIALS_EXPIRED, CREDENTIALS_REVOKED, Refresher
from controller.credentials.states import (
    ACTIVE,
    EXPIRED,
    OAUTH_TOKEN_PURPOSE,
    REFRESH_TOKEN_PURPOSE,
    REVOKED,
    CredentialStates,
    initial_state,
)
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.models import Node, NodeCredentialState, User, new_id
from controller.vault import Keyring, Vault
from tests.credentials.support import ROOT, FakeClock, OAuthServer

T0 = 1_900_000_000.0
LIFETIME = 3600.0


@pytest.fixture
def oauth(tmp_path: Path) -> Iterator[OAuthServer]:
    server = OAuthServer(tmp_path / "oauth-state.json")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Env:
    store: Store
    vault: Vault
    states: CredentialStates
    clock: FakeClock
    oauth: OAuthServer
    user_id: str
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    changed: list[tuple[str, int]] = field(default_factory=list)
    refreshers: list[Refresher] = field(default_factory=list)

    def refresher(self, **overrides: object) -> Refresher:
        async def alert(user_id: str, kind: str, message: str) -> None:
            self.alerts.append((user_id, kind, message))

        async def on_changed(node_id: str, version: int) -> None:
            self.changed.append((node_id, version))

        options: dict[str, object] = {
            "states": self.states,
            "vault": self.vault,
            "adapters": load_adapters(self.oauth.provider_config()),
            "rate_per_second": 20.0,
            "lease_seconds": 60.0,
            "poll_seconds": 30.0,
            "backoff_seconds": 5.0,
            "alert": alert,
            "on_changed": on_changed,
            "clock": self.clock,
            "sleep": self.clock.sleep,
            "rng": random.Random(7),
        }
        options.update(overrides)
        refresher = Refresher(**options)  # type: ignore[arg-type]
        self.refreshers.append(refresher)
        return refresher

    async def close(self) -> None:
        for refresher in self.refreshers:
            await refresher.stop()  # closes its adapters' connections
        await self.store.close()

    async def add_node(
        self, refresher: Refresher, refresh_token: str, *, obtained: float = T0, lifetime: float = LIFETIME
    ) -> str:
        node_id = new_id()
        expires = obtained + lifetime
        credentials = {
            "oauth_token": self.vault.encrypt_str("at-initial", owner=node_id, purpose=OAUTH_TOKEN_PURPOSE),
            "refresh_token": self.vault.encrypt_str(
                refresh_token, owner=node_id, purpose=REFRESH_TOKEN_PURPOSE
            ),
            "oauth_provider": "render",
            "oauth_expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
        }
        async with self.store.session() as session:
            session.add(
                Node(
                    id=node_id,
                    user_id=self.user_id,
                    provider="render",
                    endpoint="https://n.example",
                    capabilities={},
                    credentials=credentials,
                )
            )
            await session.flush()
            session.add(
                initial_state(
                    node_id,
                    self.user_id,
                    "render",
                    now=obtained,
                    expires_at=expires,
                    refresh_at=refresher.schedule(obtained, expires, "render", True),
                )
            )
        return node_id

    async def row(self, node_id: str) -> NodeCredentialState:
        row = await self.states.get(node_id)
        assert row is not None
        return row

    async def stored(self, node_id: str, key: str, purpose: str) -> str:
        async with self.store.session() as session:
            node = await session.get(Node, node_id)
            assert node is not None
            return self.vault.decrypt_str(node.credentials[key], owner=node_id, purpose=purpose)


@pytest.fixture
async def env(store_url: str, oauth: OAuthServer) -> AsyncIterator[Env]:
    """On SQLite and PostgreSQL (the leases and conditional writes are the store's)."""
    url = store_url
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    store = await Store.open(url)
    user_id = new_id()
    async with store.session() as session:
        session.add(User(id=user_id, email="ada@example.com", password_hash="x"))
    env = Env(store, Vault(Keyring.generate()), CredentialStates(store), FakeClock(T0), oauth, user_id)
    try:
        yield env
    finally:
        await env.close()


async def test_refreshes_near_expiry_and_stores_the_new_token_encrypted(env: Env) -> None:
    await env.oauth.seed("rt-1")
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-1")
    due = (await env.row(node_id)).refresh_at
    assert due is not None
    # share 0.75 ± 0.1 of the lifetime
    assert T0 + 0.65 * LIFETIME <= due.timestamp() <= T0 + 0.85 * LIFETIME

    env.clock.now = due.timestamp() - 1
    assert await refresher.run_once() == 0
    assert (await env.oauth.stats())["grants"] == 0

    env.clock.now = due.timestamp()
    assert await refresher.run_once() == 1
    row = await env.row(node_id)
    assert (row.state, row.version, row.failures, row.last_error) == (ACTIVE, 2, 0, None)
    assert row.expires_at is not None
    assert row.expires_at.timestamp() == env.clock.now + 3600
    assert row.refresh_at is not None
    assert env.clock.now + 0.65 * 3600 <= row.refresh_at.timestamp() <= env.clock.now + 0.85 * 3600
    token = await env.stored(node_id, "oauth_token", OAUTH_TOKEN_PURPOSE)
    stats = await env.oauth.stats()
    assert token in stats["access_tokens"]
    assert token != "at-initial"
    async with env.store.session() as session:
        node = await session.get(Node, node_id)
        assert node is not None
        assert token not in str(node.credentials)  # ciphertext only
    assert stats["grants"] == 1
    assert env.changed == [(node_id, 2)]


async def test_refresh_token_rotation_is_followed(env: Env) -> None:
    await env.oauth.seed("rt-old")
    await env.oauth.configure(rotate=True)
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-old")
    for expected_version in (2, 3):
        row = await env.row(node_id)
        assert row.refresh_at is not None
        env.clock.now = row.refresh_at.timestamp()
        assert await refresher.refresh_one(node_id) == "refreshed"
        assert (await env.row(node_id)).version == expected_version
    stored = await env.stored(node_id, "refresh_token", REFRESH_TOKEN_PURPOSE)
    valid = {t for t, e in (await env.oauth.stats())["refresh_tokens"].items() if e["valid"]}
    assert valid == {stored}  # the old ones are spent; the controller holds the live one
    assert stored != "rt-old"


async def test_invalid_grant_marks_the_token_revoked_and_alerts(env: Env) -> None:
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-never-issued")
    row = await env.row(node_id)
    assert row.refresh_at is not None
    env.clock.now = row.refresh_at.timestamp()
    assert await refresher.refresh_one(node_id) == REVOKED
    row = await env.row(node_id)
    assert (row.state, row.refresh_at, row.last_error, row.lease_owner) == (
        REVOKED,
        None,
        "invalid_grant",
        None,
    )
    assert [(u, k) for u, k, _ in env.alerts] == [(env.user_id, CREDENTIALS_REVOKED)]
    assert "rt-never-issued" not in env.alerts[0][2]
    assert await refresher.run_once() == 0  # no more attempts


async def test_invalid_grant_after_expiry_is_expired(env: Env) -> None:
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-unknown")
    env.clock.now = T0 + LIFETIME + 5
    assert await refresher.refresh_one(node_id) == EXPIRED
    assert [k for _, k, _ in env.alerts] == [CREDENTIALS_EXPIRED]


async def test_server_down_for_a_while_retries_with_backoff_before_expiry(env: Env) -> None:
    await env.oauth.seed("rt-1")
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-1")
    row = await env.row(node_id)
    assert row.refresh_at is not None
    env.clock.now = row.refresh_at.timestamp()
    env.oauth.stop()  # the provider is down (connection refused)
    delays = []
    for failures in (1, 2, 3, 4):
        before = env.clock.now
        assert await refresher.refresh_one(node_id) == "retry"
        row = await env.row(node_id)
        assert (row.state, row.failures, row.lease_owner) == (ACTIVE, failures, None)
        assert "connect" in (row.last_error or "")
        assert row.refresh_at is not None
        delays.append(row.refresh_at.timestamp() - before)
        assert row.refresh_at.timestamp() < T0 + LIFETIME  # still before the expiry
        env.clock.now = row.refresh_at.timestamp()
    # 5 s doubled per failure, ±20 % jitter
    for n, delay in enumerate(delays):
        assert 0.8 * 5 * 2**n <= delay <= 1.2 * 5 * 2**n
    env.oauth.start()  # back, on the same port, with the same tokens
    assert await refresher.refresh_one(node_id) == "refreshed"
    row = await env.row(node_id)
    assert (row.state, row.failures, row.last_error) == (ACTIVE, 0, None)
    assert env.alerts == []


async def test_a_long_outage_past_expiry_shows_expired_once_and_keeps_trying(env: Env) -> None:
    await env.oauth.configure(mode="unavailable")
    await env.oauth.seed("rt-1")
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-1")
    env.clock.now = T0 + LIFETIME - 2
    assert await refresher.refresh_one(node_id) == "retry"
    row = await env.row(node_id)
    assert row.refresh_at is not None
    assert row.refresh_at.timestamp() < T0 + LIFETIME  # squeezed before expiry
    assert row.last_error == "http_503"
    env.clock.now = row.refresh_at.timestamp() + 10  # now past the expiry
    assert await refresher.refresh_one(node_id) == "retry"
    assert (await env.row(node_id)).state == EXPIRED
    assert [k for _, k, _ in env.alerts] == [CREDENTIALS_EXPIRED]
    await env.oauth.configure(mode="ok")
    row = await env.row(node_id)
    assert row.refresh_at is not None
    env.clock.now = row.refresh_at.timestamp()
    assert await refresher.refresh_one(node_id) == "refreshed"
    assert (await env.row(node_id)).state == ACTIVE
    assert len(env.alerts) == 1


async def test_a_thousand_tokens_expiring_in_the_same_minute_refresh_without_a_herd(env: Env) -> None:
    if env.store.dialect_name != "sqlite":
        pytest.skip("the schedule is the store's business only through the lease: SQLite suffices")
    rate = 20.0
    refresher = env.refresher(rate_per_second=rate, concurrency=8)
    started: list[float] = []
    refresher.observer = lambda _node, now: started.append(now)
    tokens = [f"rt-{i}" for i in range(1000)]
    await env.oauth.seed(*tokens)
    rng = random.Random(3)
    for token in tokens:  # issued together: expiring within one minute of each other
        await env.add_node(refresher, token, obtained=T0 + rng.uniform(0, 60))
    refresher.start()
    try:
        for _ in range(60_000):
            if len(env.changed) == 1000:  # every new token stored
                break
            await asyncio.sleep(0.01)
    finally:
        await refresher.stop()
    spread = max(started) - min(started)
    per_second = Counter(int(t) for t in started)
    assert spread >= 0.15 * LIFETIME  # jitter ±10 % of the lifetime: about 12 minutes
    assert max(per_second.values()) <= rate
    assert max(started) < T0 + LIFETIME  # every one before its expiry
    async with env.store.session() as session:
        states = (await session.scalars(select(NodeCredentialState))).all()
    assert {(s.state, s.version) for s in states} == {(ACTIVE, 2)}


async def test_a_controller_killed_mid_refresh_holds_the_token_only_until_its_lease_ends(
    tmp_path: Path, oauth: OAuthServer
) -> None:
    """A real controller process takes the lease, the provider stalls, the process is
    killed (SIGKILL); another controller refreshes the token only once the lease ran out."""
    data_dir = tmp_path / "data"
    env_vars = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "A67_DATA_DIR": str(data_dir),
        "A67_LISTEN_ADDRESS": "127.0.0.1:0",
        "A67_NODE_LISTEN_ADDRESS": "127.0.0.1:0",
        "A67_XDS_LISTEN_ADDRESS": "127.0.0.1:0",
        "A67_PROVIDER_OAUTH": oauth.provider_config(),
        "A67_CREDENTIAL_REFRESH_POLL_SECONDS": "0.1",
        "A67_CREDENTIAL_REFRESH_LEASE_SECONDS": "120",
        "A67_CREDENTIAL_HTTP_TIMEOUT_SECONDS": "30",
    }
    # Prepare the store as the controller will find it: migrated, one node due now.
    from controller.config import Settings
    from controller.keys import load_key_material

    settings = Settings.from_env({}, data_dir=data_dir)
    data_dir.mkdir(mode=0o700)
    keys = load_key_material(settings)
    url = settings.effective_store_url
    upgrade(url)
    store = await Store.open(url)
    vault = Vault(keys.keyring)
    user_id = new_id()
    async with store.session() as session:
        session.add(User(id=user_id, email="ada@example.com", password_hash="x"))
    env = Env(store, vault, CredentialStates(store), FakeClock(0), oauth, user_id)
    await oauth.seed("rt-1")
    await oauth.configure(mode="stall")
    now = datetime.now(UTC).timestamp()
    node_id = await env.add_node(env.refresher(), "rt-1", obtained=now - 3000)  # due already

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli",
        "serve",
        cwd=ROOT,
        env=env_vars,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(3000):  # until its refresh reaches the (stalling) provider
            if (await oauth.stats())["stalled"] >= 1:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the controller process never asked the provider")
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await oauth.admin("release", {})
    await oauth.configure(mode="ok")

    row = await env.row(node_id)
    assert row.lease_owner is not None
    assert row.lease_until is not None
    lease_until = row.lease_until.timestamp()
    assert row.version == 1  # nothing stored by the dead controller

    env.clock.now = lease_until - 1  # a second controller, while the dead one's lease holds
    second = env.refresher()
    assert await second.run_once() == 0
    assert await second.refresh_one(node_id) == "skipped"
    assert (await oauth.stats())["grants"] == 0

    env.clock.now = lease_until  # the lease ran out
    assert await second.run_once() == 1
    row = await env.row(node_id)
    assert (row.state, row.version, row.lease_owner) == (ACTIVE, 2, None)
    stats = await oauth.stats()
    assert stats["grants"] == 1  # one refresh in all: the dead one never completed
    await env.close()


async def test_tokens_stored_before_their_provider_was_configured_are_scheduled(env: Env) -> None:
    await env.oauth.seed("rt-1")
    unconfigured = env.refresher(adapters={})
    node_id = await env.add_node(unconfigured, "rt-1")
    assert (await env.row(node_id)).refresh_at is None  # nothing could refresh it
    refresher = env.refresher()
    assert await refresher.adopt() == 1
    row = await env.row(node_id)
    assert row.refresh_at is not None
    assert T0 + 0.65 * LIFETIME <= row.refresh_at.timestamp() <= T0 + 0.85 * LIFETIME
    assert await refresher.adopt() == 0
    env.clock.now = row.refresh_at.timestamp()
    assert await refresher.refresh_one(node_id) == "refreshed"


async def test_a_deregistered_nodes_token_is_not_refreshed(env: Env) -> None:
    await env.oauth.seed("rt-1")
    refresher = env.refresher()
    node_id = await env.add_node(refresher, "rt-1")
    async with env.store.session() as session:
        node = await session.get(Node, node_id)
        assert node is not None
        node.status = "removed"
    env.clock.now = T0 + LIFETIME
    assert await refresher.run_once() == 0
    assert (await env.oauth.stats())["grants"] == 0
