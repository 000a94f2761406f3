"""Tenant isolation of PostgreSQL shards, enforced by PostgreSQL itself (no router involved).

Two agents (two ``ShardStore`` instances with their own data dirs) serve two users'
databases from one PostgreSQL database through the same superuser URL. The attacker's
statements run directly on the attacker's shard, as the agent runs them, and every
attempt to reach the victim's schema, or the server as a superuser, must fail while the
victim's tables and rows stay exactly as they were.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc
from psycopg import sql

from controller.agent.pg_shards import ROLE_PREFIX, SECRET_FILE, agent_tag, load_secret, shard_password
from controller.agent.shards import ShardError, ShardStore
from controller.server import Controller
from tests.conftest import PostgresDatabases
from tests.support import bearer, controller_settings, register, running_controller

pytestmark = pytest.mark.postgres


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


class Server:
    """A fresh PostgreSQL database for one test, the agents on it, and their cleanup."""

    def __init__(self, databases: PostgresDatabases, admin_url: str, tmp: Path) -> None:
        self._databases = databases
        self._sqlalchemy_url = databases.create()
        self.url = _libpq(self._sqlalchemy_url)  # the superuser's URL to the fresh database
        self.admin_url = admin_url
        self.tmp = tmp
        self.stores: list[ShardStore] = []
        self.data_dirs: list[Path] = []
        self.extra_roles: list[str] = []

    def agent(self, name: str, url: str | None = None) -> ShardStore:
        data_dir = self.tmp / name
        self.data_dirs.append(data_dir)
        store = ShardStore(data_dir, url or self.url)
        self.stores.append(store)
        return store

    def query(self, statement: str | sql.Composable, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``statement`` as the superuser on the shard database."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(statement, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def schema_of(self, database_id: str) -> str:
        """The one schema holding shard 0 of ``database_id`` (whatever an agent named it)."""
        key = database_id.replace("-", "_")
        rows = self.query(
            "SELECT nspname FROM pg_namespace WHERE replace(nspname, '-', '_') LIKE %s",
            (f"%{key}\\_0",),
        )
        assert len(rows) == 1, rows
        return str(rows[0][0])

    def snapshot(self, schema: str) -> dict[str, Any]:
        """Everything in ``schema``: objects, owners, columns, and every row as text."""
        objects = self.query(
            "SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s ORDER BY 1",
            (schema,),
        )
        columns = self.query(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = %s ORDER BY table_name, ordinal_position",
            (schema,),
        )
        rows = {
            name: self.query(
                sql.SQL("SELECT r::text FROM {} r ORDER BY 1").format(sql.Identifier(schema, name))
            )
            for name, kind, _ in objects
            if kind == "r"
        }
        acl = self.query(
            "SELECT nspacl::text, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (schema,)
        )
        return {"objects": objects, "columns": columns, "rows": rows, "schema": acl}

    def cleanup(self) -> None:
        self._databases.drop(self._sqlalchemy_url)  # the schemas, and the roles' grants on it
        roles: list[str] = []
        for data_dir in self.data_dirs:
            if (data_dir / "shards" / SECRET_FILE).exists():
                prefix = ROLE_PREFIX + agent_tag(load_secret(data_dir))
                with psycopg.connect(_libpq(self.admin_url), autocommit=True) as conn:
                    found = conn.execute(
                        "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,)
                    )
                    roles += [r[0] for r in found.fetchall()]
        with psycopg.connect(_libpq(self.admin_url), autocommit=True) as conn:
            for role in [*roles, *self.extra_roles]:  # shard roles first: an extra role may have made them
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
async def server(
    postgres_databases: PostgresDatabases, postgres_admin_url: str, tmp_path: Path
) -> Iterator[Server]:
    env = Server(postgres_databases, postgres_admin_url, tmp_path)
    try:
        yield env
    finally:
        for store in env.stores:
            await store.close()
        env.cleanup()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


VICTIM_ROWS = "INSERT INTO t (id, note, data) VALUES (1, 'alpha', '\\x00ff'), (2, 'the secret', NULL), (3, NULL, '\\x01')"


async def _two_tenants(server: Server) -> tuple[ShardStore, str, ShardStore, str]:
    victim, attacker = server.agent("agent-a"), server.agent("agent-b")
    victim_db, attacker_db = _unique("victim"), _unique("attacker")
    for store, db in ((victim, victim_db), (attacker, attacker_db)):
        await store.execute(db, 0, "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT, data BYTEA)", 5000)
        await store.execute(db, 0, "CREATE INDEX t_note ON t (note)", 5000)
    await victim.execute(victim_db, 0, VICTIM_ROWS, 5000)
    await victim.execute(victim_db, 0, "CREATE VIEW v AS SELECT id FROM t", 5000)
    await attacker.execute(attacker_db, 0, "INSERT INTO t (id, note) VALUES (1, 'mine')", 5000)
    return victim, victim_db, attacker, attacker_db


# (statement, a fragment of the error it must fail with); {v} is the victim's schema
ATTACKS = [
    ("SELECT query_to_xml('SELECT * FROM {v}.t', true, false, '')", "permission denied for schema"),
    ("SELECT * FROM {v}.t", "permission denied for schema"),
    ("SELECT note FROM {v}.v", "permission denied for schema"),
    ("UPDATE {v}.t SET note = 'owned'", "permission denied for schema"),
    ("INSERT INTO {v}.t (id, note) VALUES (99, 'planted')", "permission denied for schema"),
    ("DELETE FROM {v}.t", "permission denied for schema"),
    ("TRUNCATE {v}.t", "permission denied for schema"),
    ("DROP TABLE IF EXISTS {v}.t", "permission denied for schema"),
    ("DROP INDEX {v}.t_note", "permission denied for schema"),
    ("DROP SCHEMA {v} CASCADE", "must be owner of schema"),
    ("CREATE TABLE {v}.t2 (id INTEGER)", "permission denied for schema"),
    ("ALTER TABLE {v}.t ADD COLUMN x INTEGER", "permission denied for schema"),
    ("ALTER SCHEMA {v} OWNER TO CURRENT_USER", "must be owner of schema"),
    ("GRANT USAGE ON SCHEMA {v} TO CURRENT_USER", "permission denied for schema"),
    ("SET ROLE {v}", "permission denied to set role"),
    ("SET ROLE postgres", "permission denied to set role"),
    ("SET SESSION AUTHORIZATION postgres", "permission denied to set session authorization"),
    ("SELECT pg_read_file('PG_VERSION')", "permission denied for function pg_read_file"),
    ("SELECT current_setting('data_directory')", "data_directory"),
    ("SELECT lo_import('/etc/hostname')", "permission denied for function lo_import"),
    ("COPY (SELECT 1) TO '/tmp/a67-shard-isolation'", "must be superuser"),
    ("CREATE SCHEMA squatter", "permission denied for database"),
    ("CREATE TEMPORARY TABLE scratch (id INTEGER)", "permission denied to create temporary tables"),
    ("CREATE ROLE intruder", "permission denied to create role"),
    ("ALTER ROLE CURRENT_USER SUPERUSER", "must be superuser"),
]


async def test_attacks_from_another_tenants_shard_fail_and_change_nothing(server: Server) -> None:
    victim, victim_db, attacker, attacker_db = await _two_tenants(server)
    schema = server.schema_of(victim_db)
    quoted = sql.Identifier(schema).as_string()
    before = server.snapshot(schema)
    assert before["rows"]["t"] == [
        ('(1,alpha,"\\\\x00ff")',),
        ('(2,"the secret",)',),
        ('(3,,"\\\\x01")',),
    ]

    for statement, fragment in ATTACKS:
        attack = statement.format(v=quoted)
        with pytest.raises(ShardError) as info:
            await attacker.execute(attacker_db, 0, attack, 5000)
        assert fragment in str(info.value), (attack, str(info.value))
        assert info.value.kind in ("invalid", "constraint"), attack

    # search_path is no way in either: the victim's schema is not usable, so nothing resolves
    value = sql.Literal(quoted).as_string()
    await attacker.execute(attacker_db, 0, f"SELECT set_config('search_path', {value}, false)", 5000)
    for write in ("INSERT INTO t (id, note) VALUES (99, 'planted')", "DELETE FROM t", "DROP TABLE t"):
        with pytest.raises(ShardError) as info:
            await attacker.execute(attacker_db, 0, write, 5000)
        assert "does not exist" in str(info.value), write
    # …and RESET brings back the attacker's own schema, pinned on its role
    await attacker.execute(attacker_db, 0, "RESET search_path", 5000)
    _, rows, _ = await attacker.execute(attacker_db, 0, "SELECT current_schema(), note FROM t", 5000)
    assert rows == [(server.schema_of(attacker_db), "mine")]

    # catalogue reads stay possible (PostgreSQL allows them to every role): names, never rows
    _, rows, _ = await attacker.execute(
        attacker_db, 0, "SELECT query_to_xml('SELECT nspname FROM pg_namespace', true, false, '')::text", 5000
    )
    assert "the secret" not in str(rows)

    assert server.snapshot(schema) == before
    _, rows, _ = await victim.execute(victim_db, 0, "SELECT id, note FROM t ORDER BY id", 5000)
    assert rows == [(1, "alpha"), (2, "the secret"), (3, None)]


async def test_statements_never_run_as_the_superuser(server: Server) -> None:
    store = server.agent("agent-a")
    db = _unique("db")
    _, rows, _ = await store.execute(
        db,
        0,
        "SELECT current_user, r.rolsuper, current_schema() FROM pg_roles r WHERE r.rolname = current_user",
        5000,
    )
    [(user, superuser, schema)] = rows
    assert superuser is False
    assert user == schema == server.schema_of(db)
    assert user != server.query("SELECT current_user")[0][0]
    [(attributes,)] = server.query(
        "SELECT (rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolreplication, rolbypassrls, "
        "rolconnlimit)::text FROM pg_roles WHERE rolname = %s",
        (user,),
    )
    assert attributes == "(t,f,f,f,f,f,f,40)"  # one connection per open transaction, and slack
    config = server.query("SELECT unnest(rolconfig) FROM pg_roles WHERE rolname = %s", (user,))
    assert config == [(f'search_path="{schema}"',)]
    # the role owns its schema and nothing grants PUBLIC anything on it or on schema public
    [(owner,)] = server.query(
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (schema,)
    )
    assert owner == user
    grants = server.query(
        "SELECT pg_get_userbyid(a.grantee), a.privilege_type FROM pg_namespace n, aclexplode(n.nspacl) a "
        "WHERE n.nspname = %s ORDER BY 2",
        (schema,),
    )
    assert grants == [(user, "CREATE"), (user, "USAGE")]
    assert server.query(
        "SELECT has_schema_privilege(%s, 'public', 'USAGE'), has_schema_privilege(%s, 'public', 'CREATE'), "
        "has_database_privilege(%s, current_database(), 'TEMPORARY')",
        (user, user, user),
    ) == [(False, False, False)]


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether ``password`` is the one behind a PostgreSQL SCRAM-SHA-256 verifier."""
    method, rest = verifier.split("$", 1)
    assert method == "SCRAM-SHA-256"
    params, keys = rest.split("$")
    iterations, salt = params.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


async def test_role_password_comes_from_a_private_secret_and_is_never_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = server.agent("agent-a")
    db = _unique("db")
    await store.execute(db, 0, "SELECT 1", 5000)
    path = server.tmp / "agent-a" / "shards" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    role = server.schema_of(db)
    password = shard_password(load_secret(server.tmp / "agent-a"), role)
    [(verifier,)] = server.query("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
    assert verifier.startswith("SCRAM-SHA-256$")  # only the verifier reached the server
    assert _scram_matches(verifier, password)
    assert not _scram_matches(verifier, password + "x")
    with pytest.raises(ShardError) as info:
        await store.execute(db, 0, "SELEC 1", 5000)
    for text in (caplog.text, str(info.value), path.read_text()):
        assert password not in text
    # a restarted agent derives the same password again and reconnects
    await store.close()
    again = server.agent("agent-a")
    _, rows, _ = await again.execute(db, 0, "SELECT current_user", 5000)
    assert rows == [(role,)]
    assert password not in caplog.text


async def test_replicas_of_one_shard_on_two_agents_get_separate_schemas(server: Server) -> None:
    first, second = server.agent("agent-a"), server.agent("agent-b")
    db = _unique("db")
    for store in (first, second):
        await store.execute(db, 0, "CREATE TABLE t (id INTEGER PRIMARY KEY)", 5000)
        await store.execute(db, 0, "INSERT INTO t VALUES (1)", 5000)  # the write every replica gets
    for store in (first, second):
        _, rows, _ = await store.execute(db, 0, "SELECT id FROM t", 5000)
        assert rows == [(1,)]
    owners = server.query(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY 1", (f"%{db}\\_0",)
    )
    assert len(owners) == 2


async def test_schemas_of_older_agents_are_adopted_with_their_contents(server: Server) -> None:
    db = _unique("db")
    legacy = f"a67_{db.replace('-', '_')}_0"
    server.query(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(legacy)))
    for statement in (
        "CREATE TABLE {s}.t (id SERIAL PRIMARY KEY, note TEXT)",
        "INSERT INTO {s}.t (note) VALUES ('old'), ('rows')",
        "CREATE SEQUENCE {s}.counter",
        "CREATE VIEW {s}.v AS SELECT note FROM {s}.t",
        "CREATE TYPE {s}.mood AS ENUM ('ok', 'not ok')",
        "CREATE FUNCTION {s}.twice(x INTEGER) RETURNS INTEGER LANGUAGE sql AS 'SELECT x * 2'",
    ):
        server.query(sql.SQL(statement).format(s=sql.Identifier(legacy)))
    store = server.agent("agent-a")
    _, rows, _ = await store.execute(db, 0, "SELECT id, note FROM t ORDER BY id", 5000)
    assert rows == [(1, "old"), (2, "rows")]
    await store.execute(db, 0, "INSERT INTO t (note) VALUES ('new')", 5000)  # needs the serial's sequence
    _, rows, _ = await store.execute(
        db, 0, "SELECT nextval('counter'), twice(21), 'ok'::mood::text, count(*) FROM v", 5000
    )
    assert rows == [(1, 42, "ok", 3)]
    schema = server.schema_of(db)
    assert schema != legacy
    assert server.query("SELECT 1 FROM pg_namespace WHERE nspname = %s", (legacy,)) == []
    owners = server.query(
        "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s "
        "UNION SELECT DISTINCT pg_get_userbyid(t.typowner) FROM pg_type t JOIN pg_namespace n "
        "ON n.oid = t.typnamespace WHERE n.nspname = %s "
        "UNION SELECT DISTINCT pg_get_userbyid(p.proowner) FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = %s "
        "UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s",
        (schema, schema, schema, schema),
    )
    assert owners == [(schema,)]


# -- less than a superuser ---------------------------------------------------------------------------


def _plain_role(server: Server, *, create: bool, createrole: bool = False) -> str:
    role = f"a67_test_plain_{uuid.uuid4().hex[:12]}"
    server.extra_roles.append(role)
    server.query(
        sql.SQL("CREATE ROLE {} LOGIN {}").format(
            sql.Identifier(role), sql.SQL("CREATEROLE" if createrole else "")
        )
    )
    if create:
        database = server.query("SELECT current_database()")[0][0]
        server.query(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    return psycopg.conninfo.make_conninfo(server.url, user=role)


async def test_createrole_and_create_on_the_database_are_enough_for_a_role_per_shard(server: Server) -> None:
    url = _plain_role(server, create=True, createrole=True)
    victim, attacker = server.agent("agent-a", url), server.agent("agent-b", url)
    victim_db, attacker_db = _unique("victim"), _unique("attacker")
    for store, db in ((victim, victim_db), (attacker, attacker_db)):
        await store.execute(db, 0, "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)", 5000)
    await victim.execute(victim_db, 0, "INSERT INTO t VALUES (1, 'the secret')", 5000)
    schema = server.schema_of(victim_db)
    before = server.snapshot(schema)
    _, rows, _ = await attacker.execute(attacker_db, 0, "SELECT current_user", 5000)
    assert rows == [(server.schema_of(attacker_db),)]
    for statement, fragment in ATTACKS[:8]:
        with pytest.raises(ShardError) as info:
            await attacker.execute(
                attacker_db, 0, statement.format(v=sql.Identifier(schema).as_string()), 5000
            )
        assert fragment in str(info.value), statement
    assert server.snapshot(schema) == before


async def test_an_unprivileged_url_serves_one_database_only(server: Server) -> None:
    url = _plain_role(server, create=True)
    first_db, second_db = _unique("first"), _unique("second")
    store = server.agent("agent-a", url)
    for shard in (0, 1):
        await store.execute(first_db, shard, "CREATE TABLE t (id INTEGER)", 5000)
    await store.execute(first_db, 1, "INSERT INTO t VALUES (7)", 5000)
    _, rows, _ = await store.execute(first_db, 1, "SELECT id FROM t", 5000)
    assert rows == [(7,)]

    with pytest.raises(ShardError) as info:
        await store.execute(second_db, 0, "SELECT 1", 5000)
    assert info.value.kind == "unavailable"
    message = str(info.value)
    assert "CREATEROLE" in message
    assert "CREATE on its database" in message
    assert first_db not in message

    # the refusal holds for another agent sharing the role, and after a restart
    other = server.agent("agent-b", url)
    with pytest.raises(ShardError) as info:
        await other.execute(second_db, 0, "SELECT 1", 5000)
    assert info.value.kind == "unavailable"
    assert "CREATEROLE" in str(info.value)
    await other.execute(first_db, 0, "SELECT 1", 5000)  # the same database is fine
    await store.close()
    restarted = server.agent("agent-a", url)
    with pytest.raises(ShardError) as info:
        await restarted.execute(second_db, 0, "SELECT 1", 5000)
    assert info.value.kind == "unavailable"
    assert server.query("SELECT 1 FROM pg_namespace WHERE nspname LIKE %s", (f"%{second_db}%",)) == []


async def test_an_unprivileged_url_without_create_says_what_is_missing(server: Server) -> None:
    store = server.agent("agent-a", _plain_role(server, create=False))
    with pytest.raises(ShardError) as info:
        await store.execute(_unique("db"), 0, "SELECT 1", 5000)
    assert info.value.kind == "unavailable"
    assert "grant it CREATE on its database" in str(info.value)


async def test_an_unreachable_server_is_unavailable_without_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = ShardStore(tmp_path, "postgresql://someone:hunter2-secret@127.0.0.1:1/nowhere?connect_timeout=2")
    try:
        with pytest.raises(ShardError) as info:
            await store.execute("db", 0, "SELECT 1", 2000)
        assert info.value.kind == "unavailable"
        assert "hunter2" not in str(info.value)
        assert "hunter2" not in caplog.text
        assert "cannot connect to the shard PostgreSQL" in caplog.text
    finally:
        await store.close()


# -- through the API: two users, two agents, one PostgreSQL database ---------------------------------

INTERVAL = 0.3
# how a refused statement may come back: the shard's "permission denied" (42501), or the
# router's own refusal before the statement reaches a shard
REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=INTERVAL)
    async with running_controller(settings) as running:
        yield running


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for agent in running:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def _start_agent(name: str, data_dir: Path, address: str, token: str, url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    env.update(A67_AGENT_TOKEN=token, A67_AGENT_SHARD_POSTGRES_URL=url)
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir), "--region", name,
            "--node-types", "database", "--controller", address]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def _user_with_agent(
    channel: grpc.aio.Channel,
    controller: Controller,
    agents: list[subprocess.Popen[bytes]],
    server: Server,
    email: str,
    name: str,
) -> tuple[str, str]:
    """Register ``email``, start one agent of theirs on the shared PostgreSQL; (token, node id)."""
    token = (await register(auth_pb2_grpc.AuthServiceStub(channel), email=email)).access_token
    nodes = node_pb2_grpc.NodeServiceStub(channel)
    enrollment = await nodes.CreateEnrollmentToken(
        node_pb2.CreateEnrollmentTokenRequest(max_uses=1), metadata=bearer(token)
    )
    data_dir = server.tmp / name
    server.data_dirs.append(data_dir)  # its roles are dropped with the rest
    agents.append(_start_agent(name, data_dir, controller.address, enrollment.token, server.url))
    for _ in range(600):
        listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
        ready = [n for n in listed if n.status in (2, 3)]  # READY, or BUSY on a loaded machine (CPU > 90 %)
        if ready:
            return token, ready[0].id
        await asyncio.sleep(0.05)
    raise AssertionError(f"the agent of {email} did not become ready")


async def _database(stub: query_pb2_grpc.QueryServiceStub, token: str, node_id: str, name: str) -> str:
    created = await stub.CreateDatabase(
        query_pb2.CreateDatabaseRequest(
            name=name,
            dialect="postgres",
            sharding=query_pb2.Sharding(
                strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=1, sharding_key="k"
            ),
            shards=[query_pb2.ShardPlacement(shard_index=0, primary_node_id=node_id)],
        ),
        metadata=bearer(token),
    )
    db_id = created.database.id
    await stub.ApplySchema(
        query_pb2.ApplySchemaRequest(
            db_id=db_id, ddl="CREATE TABLE t (k INTEGER NOT NULL, note TEXT, PRIMARY KEY (k))"
        ),
        metadata=bearer(token),
    )
    return db_id


async def test_attacks_through_execute_query_are_refused(
    server: Server,
    controller: Controller,
    channel: grpc.aio.Channel,
    agents: list[subprocess.Popen[bytes]],
) -> None:
    stub = query_pb2_grpc.QueryServiceStub(channel)
    ada, ada_node = await _user_with_agent(channel, controller, agents, server, "ada@example.com", "ada")
    eve, eve_node = await _user_with_agent(channel, controller, agents, server, "eve@example.com", "eve")
    ada_db = await _database(stub, ada, ada_node, "books")
    eve_db = await _database(stub, eve, eve_node, "mine")

    async def query(token: str, db_id: str, statement: str) -> query_pb2.ExecuteQueryResponse:
        return await stub.ExecuteQuery(
            query_pb2.ExecuteQueryRequest(db_id=db_id, query=statement), metadata=bearer(token)
        )

    await query(ada, ada_db, "INSERT INTO t (k, note) VALUES (1, 'the secret'), (2, 'more')")
    await query(eve, eve_db, "INSERT INTO t (k, note) VALUES (1, 'mine')")
    schema = sql.Identifier(server.schema_of(ada_db)).as_string()
    before = server.snapshot(server.schema_of(ada_db))

    attacks = [
        f"SELECT query_to_xml('SELECT * FROM {schema}.t', true, false, '')",
        f"SELECT note FROM {schema}.t",
        f"UPDATE {schema}.t SET note = 'owned' WHERE k = 1",
        f"INSERT INTO {schema}.t (k, note) VALUES (99, 'planted')",
        f"DELETE FROM {schema}.t WHERE k = 1",
        f"DROP TABLE IF EXISTS {schema}.t",
        f"CREATE TABLE {schema}.t2 (k INTEGER PRIMARY KEY)",
        "SELECT pg_read_file('PG_VERSION')",
        "SELECT current_setting('data_directory')",
        f"CREATE FUNCTION steal() RETURNS SETOF text LANGUAGE sql AS 'SELECT note FROM {schema}.t'",
        f"CREATE VIEW stolen AS SELECT note FROM {schema}.t",
        f"DO 'BEGIN EXECUTE ''DELETE FROM {schema}.t''; END'",
        f"INSERT INTO t (k, note) VALUES (5, (SELECT note FROM {schema}.t LIMIT 1))",
        "COPY t TO '/tmp/x'",
    ]
    for attack in attacks:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await query(eve, eve_db, attack)
        assert info.value.code() in REFUSED, (attack, info.value.code(), info.value.details())
        assert "the secret" not in (info.value.details() or ""), attack
    # search_path first, then an unqualified write: the victim's schema is not usable
    value = sql.Literal(schema).as_string()
    with contextlib.suppress(grpc.aio.AioRpcError):  # the router may refuse it already
        await query(eve, eve_db, f"SELECT set_config('search_path', {value}, false)")
    with contextlib.suppress(grpc.aio.AioRpcError):
        await query(eve, eve_db, "UPDATE t SET note = 'owned' WHERE k = 1")

    assert server.snapshot(server.schema_of(ada_db)) == before
    # and had a statement got past the router, PostgreSQL would have refused it: each
    # user's shard runs as a role of its own, with no privilege on the other's schema
    ada_schema, eve_schema = server.schema_of(ada_db), server.schema_of(eve_db)
    assert server.query(
        "SELECT pg_get_userbyid(nspowner), r.rolsuper FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner "
        "WHERE nspname IN (%s, %s) ORDER BY nspname = %s",
        (ada_schema, eve_schema, eve_schema),
    ) == [(ada_schema, False), (eve_schema, False)]
    assert server.query(
        "SELECT has_schema_privilege(%s, %s, 'USAGE'), has_schema_privilege(%s, %s, 'CREATE'), "
        "has_table_privilege(%s, %s, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')",
        (eve_schema, ada_schema, eve_schema, ada_schema, eve_schema, f"{schema}.t"),
    ) == [(False, False, False)]
    rows = await query(ada, ada_db, "SELECT k, note FROM t ORDER BY k")
    assert [
        [v.number_value if v.HasField("number_value") else v.string_value for v in r.values]
        for r in rows.data
    ] == [
        [1, "the secret"],
        [2, "more"],
    ]
