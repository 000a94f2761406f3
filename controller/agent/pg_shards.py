"""Tenant isolation for PostgreSQL shards: each shard is reached through its own LOGIN role.

Shards of different users' databases may live on the same PostgreSQL server, even in
the same database. ``SET search_path`` is no fence (user SQL can change it, or name
another schema outright), so the fence is PostgreSQL's own privilege system:

* **Privileged URL** (``--shard-postgres-url`` names a superuser, or a role with
  CREATEROLE and CREATE on its database): for every shard the agent creates a role
  ``a67s<agent tag>_<database id>_<shard index>`` — LOGIN NOSUPERUSER NOCREATEDB
  NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS, a connection limit, member of no
  role — which owns exactly the schema of the same name (``search_path`` pinned to it
  with ``ALTER ROLE … SET``) and has no privilege on any other schema. The agent then
  connects *as* that role (not ``SET ROLE``, which user SQL could ``RESET``): the
  superuser never runs user SQL. Once per database it revokes ``CREATE`` and
  ``TEMPORARY`` on the database and everything on schema ``public`` from ``PUBLIC``.
* **Unprivileged URL**: every shard runs as the URL's own role, so that role may hold
  the shards of one database id only; a shard of another database is refused
  (``error_kind`` ``unavailable``, naming the missing privilege). The check looks at
  every ``a67`` schema the role owns, so it also holds across restarts and across
  agents that share the role.

Role passwords are derived (HMAC-SHA-256) from a random 256-bit agent secret kept in
``<data dir>/shards/postgres-shards.secret`` (mode 0600); only their SCRAM verifiers
travel to the server, and neither ever reaches a log or an error message. The agent
tag (from the same secret) makes names unique per agent, so replicas of one shard on
two agents that share a PostgreSQL database get separate schemas.

Schemas made by older agents (``a67_<database id with - as _>_<shard index>``, owned
by the URL's role) are adopted on first use: renamed to the new name and, with a
privileged URL, handed over to the shard's role with everything in them.

What PostgreSQL does not hide: the system catalogues are readable by every role, so a
shard role that reads ``pg_catalog`` directly sees other shards' schema and table
*names* (and other metadata such as view definitions), never their rows.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from controller.agent.identity import _write_new
from controller.agent.shards import ShardError

log = logging.getLogger(__name__)

SECRET_FILE = "postgres-shards.secret"  # noqa: S105 (a file name)
# Connections a shard role may hold: the agent uses one per shard for single statements and
# one per open transaction on the shard (at most ``shards.MAX_PG_TRANSACTIONS``); the rest
# is slack for a reconnect while the server still counts a dead connection.
CONNECTION_LIMIT = 40
ROLE_PREFIX = "a67s"
TAG_LENGTH = 10
_MAX_IDENTIFIER = 63  # NAMEDATALEN - 1
_COMMENT = "automator67 shard of database {database_id}, shard {shard_index}"
_COMMENT_RE = re.compile(r"^automator67 shard of database ([A-Za-z0-9_-]{1,64}), shard \d+$")
_ATTEMPTS = 3

UNREACHABLE = "the shard database cannot be reached"
NEEDS_PRIVILEGE = (
    "this agent cannot isolate the shards of different databases on its PostgreSQL server: "
    "the role of its --shard-postgres-url is neither a superuser nor has CREATEROLE together with "
    "CREATE on its database, so it serves the shards of one database only and already serves "
    "another's. Grant that role CREATEROLE and CREATE on the database (every shard then gets a role "
    "of its own), or give each database's agents a PostgreSQL role of their own"
)


# --------------------------------------------------------------------------- names and secrets


def load_secret(data_dir: Path) -> bytes:
    """The agent's shard secret, generated into ``<data dir>/shards/`` (0600) on first use."""
    directory = data_dir / "shards"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / SECRET_FILE
    if not path.exists() and _write_new(path, (secrets.token_hex(32) + "\n").encode(), 0o600):
        log.info("generated the PostgreSQL shard secret %s", path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); tightening it to 0600", path, mode)
        path.chmod(0o600)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        log.error("%s is not a PostgreSQL shard secret (64 hex digits); move it away to regenerate", path)
        raise ShardError(
            "unavailable", "the agent's PostgreSQL shard secret is unusable (see the agent's log)"
        )
    return bytes.fromhex(text)


def agent_tag(secret: bytes) -> str:
    """This agent's part of every role and schema name (hex, :data:`TAG_LENGTH` characters)."""
    return hmac.new(secret, b"automator67 shard tag", hashlib.sha256).hexdigest()[:TAG_LENGTH]


def shard_name(tag: str, database_id: str, shard_index: int) -> str:
    """The name of a shard's role and of the schema it owns (at most 63 bytes)."""
    name = f"{ROLE_PREFIX}{tag}_{database_id}_{shard_index}"
    if len(name) > _MAX_IDENTIFIER:
        digest = hashlib.sha256(database_id.encode()).hexdigest()[:32]
        name = f"{ROLE_PREFIX}{tag}_h{digest}_{shard_index}"
    return name


def legacy_schema_name(database_id: str, shard_index: int) -> str:
    """The schema older agents used (truncated as PostgreSQL truncated it)."""
    return f"a67_{database_id.replace('-', '_')}_{shard_index}"[:_MAX_IDENTIFIER]


def shard_password(secret: bytes, role: str) -> str:
    """The password of ``role``: never stored, never logged."""
    return hmac.new(secret, b"automator67 shard password\0" + role.encode(), hashlib.sha256).hexdigest()


def _same_database(name: str, comment: str | None, database_id: str) -> bool:
    """Whether the a67 schema ``name`` (with its comment) holds a shard of ``database_id``."""
    if comment and (match := _COMMENT_RE.match(comment)):
        return match.group(1) == database_id
    if name.startswith(ROLE_PREFIX):
        rest = name[len(ROLE_PREFIX) + TAG_LENGTH + 1 :]
        owner, _, index = rest.rpartition("_")
        digest = "h" + hashlib.sha256(database_id.encode()).hexdigest()[:32]
        return index.isdigit() and owner in (database_id, digest)
    legacy = re.escape(database_id.replace("-", "_"))
    return re.fullmatch(rf"a67_{legacy}_\d+", name) is not None


def _redacted(text: str, url: str) -> str:
    """``text`` without the URL's password (libpq may echo parts of a malformed URL)."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        return "(the URL could not be parsed)"
    return text.replace(str(password), "***") if password else text


# --------------------------------------------------------------------------- the connections


class PostgresShards:
    """Opens the connection each PostgreSQL shard's statements run on, isolated as above.

    Not safe for concurrent use: the caller (``ShardStore``) serializes :meth:`open`.
    """

    def __init__(self, url: str, data_dir: Path) -> None:
        self._url = url
        self._data_dir = data_dir
        self._secret: bytes | None = None
        self._admin: psycopg.AsyncConnection[Any] | None = None
        self._privileged = False
        self._superuser = False
        self._claimed: str | None = None  # unprivileged: the one database id served
        self._ready: set[str] = set()  # shards set up by open() in this process

    @property
    def privileged(self) -> bool:
        return self._privileged

    async def open(self, database_id: str, shard_index: int) -> psycopg.AsyncConnection[Any]:
        """A new autocommit connection for the shard, its schema created (or adopted) first."""
        if self._secret is None:
            self._secret = load_secret(self._data_dir)
        admin = await self._admin_connection()
        name = shard_name(agent_tag(self._secret), database_id, shard_index)
        try:
            if self._privileged:
                conn = await self._open_as_role(admin, name, database_id, shard_index)
            else:
                conn = await self._open_shared(admin, name, database_id, shard_index)
            self._ready.add(name)
            return conn
        except psycopg.OperationalError as exc:
            await self._drop_admin()
            log.warning("PostgreSQL shard %s: %s", name, _redacted(str(exc).strip(), self._url))
            raise ShardError("unavailable", UNREACHABLE) from exc
        except psycopg.Error as exc:
            log.warning("setting up PostgreSQL shard %s: %s", name, _redacted(str(exc).strip(), self._url))
            raise ShardError(
                "unavailable", "the shard's schema could not be set up (see the agent's log)"
            ) from exc

    async def reopen(self, database_id: str, shard_index: int) -> psycopg.AsyncConnection[Any]:
        """Another connection for a shard :meth:`open` has set up: no provisioning again
        (a transaction's own connection; concurrent provisioning would race on the catalogue)."""
        name = self.name_of(database_id, shard_index)
        if name not in self._ready:
            return await self.open(database_id, shard_index)
        if not self._privileged:
            conn = await self._connect()
            try:
                await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(name)))
            except psycopg.Error as exc:
                await conn.close()
                raise ShardError("unavailable", UNREACHABLE) from exc
            return conn
        assert self._secret is not None
        return await self._connect(user=name, password=shard_password(self._secret, name))

    def name_of(self, database_id: str, shard_index: int) -> str:
        """The shard's role and schema name (used to name its prepared transactions)."""
        if self._secret is None:
            self._secret = load_secret(self._data_dir)
        return shard_name(agent_tag(self._secret), database_id, shard_index)

    async def close(self) -> None:
        await self._drop_admin()

    # ----------------------------------------------------------------------- admin connection

    async def _connect(self, user: str = "", password: str = "") -> psycopg.AsyncConnection[Any]:
        try:
            conninfo = psycopg.conninfo.make_conninfo(
                self._url, **({"user": user, "password": password} if user else {})
            )
            return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            message = _redacted(str(exc).strip(), self._url)
            if password:
                message = message.replace(password, "***")
            who = f" as {user}" if user else ""
            log.warning("cannot connect to the shard PostgreSQL%s (%s): %s", who, type(exc).__name__, message)
            raise ShardError("unavailable", UNREACHABLE) from exc

    async def _admin_connection(self) -> psycopg.AsyncConnection[Any]:
        if self._admin is not None and not self._admin.closed:
            return self._admin
        admin = await self._connect()
        try:
            cursor = await admin.execute(
                "SELECT r.rolsuper, r.rolcreaterole, has_database_privilege(current_database(), 'CREATE') "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
            row = await cursor.fetchone()
            superuser, createrole, create = row if row else (False, False, False)
            self._superuser = bool(superuser)
            self._privileged = bool(superuser or (createrole and create))
            if self._privileged:
                await self._harden_database(admin)
        except BaseException:
            await admin.close()
            raise
        if not self._privileged:
            log.warning(
                "the role of --shard-postgres-url is neither a superuser nor has CREATEROLE and CREATE "
                "on its database: this agent will serve the shards of one database only"
            )
        self._admin = admin
        return admin

    async def _drop_admin(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def _harden_database(self, admin: psycopg.AsyncConnection[Any]) -> None:
        """Take from PUBLIC what a shard role must not have (needs the database's owner)."""
        database = sql.Identifier(admin.info.dbname)
        try:
            await admin.execute(
                sql.SQL("REVOKE CREATE, TEMPORARY ON DATABASE {} FROM PUBLIC").format(database)
            )
            if await self._schema_exists(admin, "public"):
                await admin.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        except psycopg.errors.InsufficientPrivilege as exc:  # not the owner: PostgreSQL warns, or says so
            log.warning("could not take privileges from PUBLIC on the shard database: %s", str(exc).strip())
        cursor = await admin.execute(
            "SELECT d.datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(d.datacl) a WHERE a.grantee = 0 "
            "AND a.privilege_type IN ('CREATE', 'TEMPORARY')) FROM pg_database d "
            "WHERE d.datname = current_database()"
        )
        still = await cursor.fetchone()
        if still and still[0]:
            log.warning(
                "PUBLIC keeps CREATE or TEMPORARY on the shard database (the agent's role does not own it): "
                "run REVOKE CREATE, TEMPORARY ON DATABASE … FROM PUBLIC as its owner"
            )

    # ----------------------------------------------------------------------- privileged: a role per shard

    async def _open_as_role(
        self, admin: psycopg.AsyncConnection[Any], name: str, database_id: str, shard_index: int
    ) -> psycopg.AsyncConnection[Any]:
        assert self._secret is not None
        password = shard_password(self._secret, name)
        verifier = admin.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
        for attempt in range(_ATTEMPTS):
            try:
                async with admin.transaction():
                    await self._provision(admin, name, verifier, database_id, shard_index)
                break
            except (pg_errors.DuplicateObject, pg_errors.DuplicateSchema, pg_errors.InvalidSchemaName) as exc:
                # another agent adopted the legacy schema (or made the same object) meanwhile
                if attempt == _ATTEMPTS - 1:
                    raise ShardError("unavailable", "the shard's schema could not be set up") from exc
            except psycopg.errors.InsufficientPrivilege as exc:
                log.warning("setting up the role of PostgreSQL shard %s: %s", name, str(exc).strip())
                raise ShardError(
                    "unavailable",
                    "the role of the agent's --shard-postgres-url lacks a privilege needed to set up this "
                    "shard's own role and schema (superuser, or CREATEROLE and CREATE on the database)",
                ) from exc
        conn = await self._connect(user=name, password=password)
        try:
            cursor = await conn.execute(
                "SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls OR r.rolreplication "
                "OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid), current_schema() "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
            row = await cursor.fetchone()
        except psycopg.Error:
            await conn.close()
            raise
        if row is None or row[0] or row[1] != name:
            await conn.close()
            log.error("PostgreSQL role %s has privileges a shard role must not have, or no schema", name)
            raise ShardError(
                "unavailable", "the shard's PostgreSQL role is not isolated (see the agent's log)"
            )
        return conn

    async def _provision(
        self,
        admin: psycopg.AsyncConnection[Any],
        name: str,
        verifier: str,
        database_id: str,
        shard_index: int,
    ) -> None:
        role = sql.Identifier(name)
        options = sql.SQL(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS "
            "CONNECTION LIMIT {} PASSWORD {}"
        ).format(sql.Literal(CONNECTION_LIMIT), sql.Literal(verifier))
        cursor = await admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        if await cursor.fetchone():
            await admin.execute(sql.SQL("ALTER ROLE {} WITH ").format(role) + options)
        else:
            await admin.execute(sql.SQL("CREATE ROLE {} WITH ").format(role) + options)
            log.info("created PostgreSQL role %s for shard %d of database %s", name, shard_index, database_id)
        if not self._superuser:
            # CREATEROLE alone may not create objects for a role it is not a member of
            cursor = await admin.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (name,))
            member = await cursor.fetchone()
            if not (member and member[0]):
                await admin.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(role))
        await admin.execute(sql.SQL("ALTER ROLE {} SET search_path TO {}").format(role, role))
        await admin.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(admin.info.dbname), role)
        )
        if not await self._schema_exists(admin, name):
            legacy = legacy_schema_name(database_id, shard_index)
            if await self._schema_exists(admin, legacy):
                await admin.execute(
                    sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(legacy), role)
                )
                log.info("adopted the schema %s of an older agent as %s", legacy, name)
            else:
                await admin.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(role, role))
        await admin.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(role, role))
        await admin.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(role))
        await admin.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                role,
                sql.Literal(_COMMENT.format(database_id=database_id, shard_index=shard_index)),
            )
        )
        await self._hand_over_contents(admin, name)

    @staticmethod
    async def _schema_exists(admin: psycopg.AsyncConnection[Any], name: str) -> bool:
        cursor = await admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,))
        return await cursor.fetchone() is not None

    @staticmethod
    async def _hand_over_contents(admin: psycopg.AsyncConnection[Any], name: str) -> None:
        """Make the shard's role own whatever its schema holds (an adopted schema's tables, …)."""
        role = sql.Identifier(name)
        statements: list[sql.Composed] = []
        kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}
        cursor = await admin.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
            "AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = %s) ORDER BY c.relname",
            (name, name),
        )
        for relname, relkind in await cursor.fetchall():
            statements.append(
                sql.SQL("ALTER {} {} OWNER TO {}").format(
                    sql.SQL(kinds[relkind]), sql.Identifier(name, relname), role
                )
            )
        for statement in statements:
            await admin.execute(statement)
        statements = []
        # sequences owned by a column moved with their table; these are the free-standing ones
        cursor = await admin.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'S' "
            "AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = %s) ORDER BY c.relname",
            (name, name),
        )
        for (relname,) in await cursor.fetchall():
            statements.append(
                sql.SQL("ALTER SEQUENCE {} OWNER TO {}").format(sql.Identifier(name, relname), role)
            )
        cursor = await admin.execute(
            "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname = %s AND t.typowner <> (SELECT oid FROM pg_roles WHERE rolname = %s) "
            "AND (t.typtype IN ('e', 'd', 'r') OR (t.typtype = 'c' AND "
            "(SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')) ORDER BY t.typname",
            (name, name),
        )
        for (typname,) in await cursor.fetchall():
            statements.append(
                sql.SQL("ALTER TYPE {} OWNER TO {}").format(sql.Identifier(name, typname), role)
            )
        cursor = await admin.execute(
            "SELECT p.oid::regprocedure::text, p.prokind FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s "
            "AND p.proowner <> (SELECT oid FROM pg_roles WHERE rolname = %s) ORDER BY 1",
            (name, name),
        )
        for signature, prokind in await cursor.fetchall():
            # the signature is PostgreSQL's own rendering of the routine, identifiers quoted
            keyword = "AGGREGATE" if prokind == "a" else "ROUTINE"
            statements.append(
                sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(keyword), sql.SQL(signature), role)
            )
        for statement in statements:
            await admin.execute(statement)

    # ----------------------------------------------------------------------- unprivileged: one database

    async def _open_shared(
        self, admin: psycopg.AsyncConnection[Any], name: str, database_id: str, shard_index: int
    ) -> psycopg.AsyncConnection[Any]:
        if self._claimed not in (None, database_id):
            raise ShardError("unavailable", NEEDS_PRIVILEGE)
        cursor = await admin.execute(
            "SELECT n.nspname, obj_description(n.oid, 'pg_namespace') FROM pg_namespace n "
            "JOIN pg_roles r ON r.oid = n.nspowner WHERE r.rolname = current_user "
            "AND (n.nspname LIKE 'a67s%' OR n.nspname LIKE 'a67\\_%')"
        )
        for schema, comment in await cursor.fetchall():
            if not _same_database(schema, comment, database_id):
                raise ShardError("unavailable", NEEDS_PRIVILEGE)
        schema_id = sql.Identifier(name)
        try:
            async with admin.transaction():
                if not await self._schema_exists(admin, name):
                    legacy = legacy_schema_name(database_id, shard_index)
                    if await self._schema_exists(admin, legacy):
                        await admin.execute(
                            sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(legacy), schema_id)
                        )
                        log.info("adopted the schema %s of an older agent as %s", legacy, name)
                    else:
                        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(schema_id))
                await admin.execute(
                    sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                        schema_id,
                        sql.Literal(_COMMENT.format(database_id=database_id, shard_index=shard_index)),
                    )
                )
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ShardError(
                "unavailable",
                "the role of the agent's --shard-postgres-url cannot create this shard's schema: "
                "grant it CREATE on its database",
            ) from exc
        self._claimed = database_id
        conn = await self._connect()
        try:
            await conn.execute(sql.SQL("SET search_path TO {}").format(schema_id))
        except psycopg.Error:
            await conn.close()
            raise
        return conn
