"""``a67 db`` (list), ``db show|create|schema|query|remove``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from automator67.v1 import common_pb2, query_pb2
from google.protobuf import json_format

from controller.client.app import command, common_options, state
from controller.client.cmd_nodes import all_nodes
from controller.client.errors import FAILED, INVALID, NOT_FOUND, USAGE, CliError
from controller.client.render import Output, cell_text, csv_text, enum_label, message_dict, when
from controller.client.session import Connection

STRATEGIES = {
    "hash": query_pb2.SHARDING_STRATEGY_HASH,
    "range": query_pb2.SHARDING_STRATEGY_RANGE,
    "directory": query_pb2.SHARDING_STRATEGY_DIRECTORY,
}
SCHEDULABLE = (common_pb2.NODE_STATUS_READY, common_pb2.NODE_STATUS_BUSY)


def all_databases(conn: Connection) -> Iterator[query_pb2.Database]:
    token = ""
    while True:
        reply = conn.call(
            conn.query.ListDatabases, query_pb2.ListDatabasesRequest(page_size=100, page_token=token)
        )
        yield from reply.databases
        token = reply.next_page_token
        if not token:
            return


def find_database(conn: Connection, ref: str) -> query_pb2.Database:
    for database in all_databases(conn):
        if ref in (database.name, database.id):
            return database
    raise CliError(
        f"You have no database named {ref!r}.",
        exit_code=NOT_FOUND,
        reason="DATABASE_NOT_FOUND",
        hint="list them: a67 db",
    )


def read_sql(text: str | None, file: str | None, what: str) -> str:
    """SQL from the argument, ``-f FILE`` (``-`` for standard input), or piped standard input."""
    if text and file:
        raise CliError(
            f"Give the {what} as an argument or with -f, not both.", exit_code=USAGE, reason="TWO_SOURCES"
        )
    if file == "-" or (not text and not file and not sys.stdin.isatty()):
        sql = sys.stdin.read()
    elif file:
        try:
            sql = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(
                f"Cannot read {file}: {exc.strerror}.", exit_code=USAGE, reason="UNREADABLE_FILE"
            ) from None
    else:
        sql = text or ""
    if not sql.strip():
        raise CliError(f"No {what} given.", exit_code=USAGE, reason="EMPTY_SQL")
    return sql.strip()


def strategy_label(value: int) -> str:
    return enum_label(query_pb2.ShardingStrategy.Name(value), "SHARDING_STRATEGY_")  # type: ignore[arg-type]


def _show_schema(out: Output, database: query_pb2.Database) -> None:
    if not database.tables:
        out.say(
            f'{database.name} has no tables yet. Add some with: a67 db schema {database.name} "CREATE TABLE …"'
        )
        return
    for table in database.tables:
        out.table(
            ["COLUMN", "TYPE", "NULLABLE"],
            [(c.name, c.type, "yes" if c.nullable else "no") for c in table.columns],
            title=table.name,
        )


def auto_placement(conn: Connection, shards: int, replicas: int) -> list[query_pb2.ShardPlacement]:
    """Primaries round-robin over your ready database nodes, replicas on the next ones."""
    nodes = [n for n in all_nodes(conn) if n.status in SCHEDULABLE]
    preferred = [n for n in nodes if "database" in n.capabilities.node_types] or nodes
    ids = sorted(n.id for n in preferred)
    if not ids:
        raise CliError(
            "You have no ready node to put the shards on.",
            exit_code=INVALID,
            reason="NO_DATABASE_NODES",
            hint="add one with: a67 nodes enroll (agents serve shards with --node-types database)",
        )
    if replicas >= len(ids):
        raise CliError(
            f"{replicas} replicas per shard need at least {replicas + 1} ready nodes; you have {len(ids)}.",
            exit_code=INVALID,
            reason="NOT_ENOUGH_NODES",
        )
    return [
        query_pb2.ShardPlacement(
            shard_index=i,
            primary_node_id=ids[i % len(ids)],
            replica_node_ids=[ids[(i + k) % len(ids)] for k in range(1, replicas + 1)],
        )
        for i in range(shards)
    ]


def _python_value(value: Any, column_type: str) -> Any:
    if isinstance(value, float) and value.is_integer() and "int" in column_type.lower():
        return int(value)
    return value


def render_result(out: Output, reply: query_pb2.ExecuteQueryResponse, *, as_csv: bool) -> None:
    columns = [c.name for c in reply.columns]
    types = [c.type for c in reply.columns]
    rows = [
        [
            _python_value(v, types[i] if i < len(types) else "")
            for i, v in enumerate(json_format.MessageToDict(row))
        ]
        for row in reply.data
    ]
    if out.as_json:
        body = message_dict(reply)
        body["data"] = rows
        out.json(body)
    elif as_csv:
        sys.stdout.write(csv_text(columns, rows))
    elif columns:
        out.table(columns, [[cell_text(v) for v in row] for row in rows])
    if not out.as_json:
        summary = (
            f"{reply.rows_returned} row{'s' if reply.rows_returned != 1 else ''} from "
            f"{reply.shards_queried} shard{'s' if reply.shards_queried != 1 else ''} in {reply.execution_time_ms} ms"
        )
        out.note(summary + (" - PARTIAL: some shards did not answer" if reply.partial else ""))
    if reply.partial and not out.as_json:
        failed = [s for s in reply.shard_statuses if s.status != "ok"]
        table = [(s.shard_index, s.status, s.node_id or "-", s.error_message) for s in reply.shard_statuses]
        err = Output()
        err.console = out.err
        err.table(["SHARD", "STATUS", "NODE", "ERROR"], table, title=f"{len(failed)} shard(s) failed")


def register(root: click.Group) -> None:
    @root.group("db", invoke_without_command=True)
    @common_options
    @click.pass_context
    def db(ctx: click.Context) -> int:
        """Your databases: list them (the default), create, apply schema, run SQL, remove.

        \b
        Examples:
          a67 db
          a67 db create shop --shards 2 --key customer_id
          a67 db query shop "SELECT count(*) FROM orders"
        """
        if ctx.invoked_subcommand is None:
            _list(state().output, state().connection())
        return 0

    @command(db, "list")
    def list_cmd() -> None:
        """List your databases.

        \b
        Example:
          a67 db list --json
        """
        _list(state().output, state().connection())

    @command(db, "show")
    @click.argument("database")
    def show(database: str) -> None:
        """Show a database: sharding, where each shard lives, its tables.

        \b
        Example:
          a67 db show shop
        """
        st = state()
        conn = st.connection()
        found = find_database(conn, database)
        if st.output.as_json:
            st.output.json({"database": message_dict(found)})
            return
        sharding = found.sharding
        st.output.fields(
            [
                ("name", found.name),
                ("id", found.id),
                ("dialect", found.dialect),
                (
                    "sharding",
                    f"{strategy_label(sharding.strategy)} on {sharding.sharding_key}, {sharding.shard_count} shards",
                ),
                ("reference tables", ", ".join(sharding.reference_tables) or "-"),
                ("created", when(found.created_at)),
            ]
        )
        st.output.table(
            ["SHARD", "PRIMARY", "REPLICAS"],
            [(s.shard_index, s.primary_node_id, ", ".join(s.replica_node_ids) or "-") for s in found.shards],
        )
        _show_schema(st.output, found)

    @command(db, "create")
    @click.argument("name")
    @click.option("--key", "sharding_key", required=True, help="The sharding key column.")
    @click.option(
        "--shards", type=click.IntRange(1, 64), default=1, show_default=True, help="Number of shards."
    )
    @click.option(
        "--strategy",
        type=click.Choice(sorted(STRATEGIES)),
        default="hash",
        show_default=True,
        help="How rows are split.",
    )
    @click.option("--dialect", type=click.Choice(["sqlite", "postgres"]), default="sqlite", show_default=True)
    @click.option(
        "--replicas",
        type=click.IntRange(0, 8),
        default=0,
        show_default=True,
        help="Replicas of each shard (on other nodes).",
    )
    @click.option("--reference-table", multiple=True, help="A table copied whole to every shard. Repeatable.")
    @click.option(
        "--placement",
        multiple=True,
        metavar="SHARD=PRIMARY[,REPLICA…]",
        help="Put a shard on given nodes (ids). Default: round-robin over your ready nodes.",
    )
    def create(
        name: str,
        sharding_key: str,
        shards: int,
        strategy: str,
        dialect: str,
        replicas: int,
        reference_table: tuple[str, ...],
        placement: tuple[str, ...],
    ) -> None:
        """Create a sharded database served by your nodes.

        \b
        Examples:
          a67 db create shop --key customer_id --shards 2
          a67 db create shop --key customer_id --shards 2 --replicas 1 --reference-table products
        """
        st = state()
        conn = st.connection()
        placements = _placements(placement, shards) if placement else auto_placement(conn, shards, replicas)
        created = conn.call(
            conn.query.CreateDatabase,
            query_pb2.CreateDatabaseRequest(
                name=name,
                dialect=dialect,
                sharding=query_pb2.Sharding(
                    strategy=STRATEGIES[strategy],
                    shard_count=shards,
                    sharding_key=sharding_key,
                    reference_tables=list(reference_table),
                ),
                shards=placements,
            ),
        ).database
        if st.output.as_json:
            st.output.json({"database": message_dict(created)})
        else:
            st.output.say(
                f"Created database {created.name} ({created.id}): {shards} {strategy} shard(s) on {sharding_key}."
            )

    @command(db, "schema")
    @click.argument("database")
    @click.argument("ddl", required=False)
    @click.option(
        "-f", "--file", "file", metavar="FILE", help="Read the DDL from FILE ('-': standard input)."
    )
    def schema(database: str, ddl: str | None, file: str | None) -> None:
        """Apply DDL to every shard, or show the schema when no DDL is given.

        \b
        Examples:
          a67 db schema shop -f schema.sql
          a67 db schema shop "CREATE TABLE orders (id INTEGER, customer_id INTEGER, PRIMARY KEY (customer_id, id))"
          a67 db schema shop          # show the tables (also with an empty standard input)
        """
        st = state()
        conn = st.connection()
        found = find_database(conn, database)
        statement = ""
        if ddl is None and file is None:
            # DDL piped in is applied; a terminal, or an empty pipe (a script), shows the schema
            statement = "" if sys.stdin.isatty() else sys.stdin.read().strip()
        else:
            statement = read_sql(ddl, file, "DDL")
        if not statement:
            updated = found
        else:
            updated = conn.call(
                conn.query.ApplySchema, query_pb2.ApplySchemaRequest(db_id=found.id, ddl=statement)
            ).database
        if st.output.as_json:
            st.output.json({"database": message_dict(updated)})
        else:
            _show_schema(st.output, updated)

    @command(db, "query")
    @click.argument("database")
    @click.argument("sql", required=False)
    @click.option(
        "-f", "--file", "file", metavar="FILE", help="Read the SQL from FILE ('-': standard input)."
    )
    @click.option("--csv", "as_csv", is_flag=True, help="Print the rows as CSV (with a header row).")
    @click.option("--allow-partial", is_flag=True, help="Return the rows of the shards that answered.")
    @click.option("--timeout-ms", type=click.IntRange(0), default=0, help="Deadline (default 30000).")
    def query(
        database: str, sql: str | None, file: str | None, as_csv: bool, allow_partial: bool, timeout_ms: int
    ) -> int:
        """Run one SQL statement, routed to the shards and merged.

        Rows print as a table (--csv or --json for scripts); with --allow-partial, the
        status of each shard is shown when some did not answer, and the exit code is 1.

        \b
        Examples:
          a67 db query shop "SELECT status, count(*) FROM orders GROUP BY status"
          a67 db query shop -f report.sql --csv > report.csv
          echo "SELECT 1" | a67 db query shop --json
        """
        st = state()
        conn = st.connection()
        statement = read_sql(sql, file, "SQL")
        found = find_database(conn, database)
        reply = conn.call(
            conn.query.ExecuteQuery,
            query_pb2.ExecuteQueryRequest(
                db_id=found.id, query=statement, timeout_ms=timeout_ms, allow_partial_results=allow_partial
            ),
        )
        render_result(st.output, reply, as_csv=as_csv)
        return FAILED if reply.partial else 0

    @command(db, "remove")
    @click.argument("database")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    def remove(database: str, yes: bool) -> None:
        """Delete a database (its shards' data included).

        \b
        Example:
          a67 db remove shop --yes
        """
        st = state()
        conn = st.connection()
        found = find_database(conn, database)
        if not yes and not st.output.as_json:
            click.confirm(f"Delete database {found.name} and all its data?", abort=True, err=True)
        conn.call(conn.query.DeleteDatabase, query_pb2.DeleteDatabaseRequest(db_id=found.id))
        if st.output.as_json:
            st.output.json({"removed": found.id, "name": found.name})
        else:
            st.output.say(f"Removed database {found.name}.")


def _placements(values: tuple[str, ...], shards: int) -> list[query_pb2.ShardPlacement]:
    result = []
    for value in values:
        index, sep, nodes = value.partition("=")
        ids = [n.strip() for n in nodes.split(",") if n.strip()]
        if not sep or not index.strip().isdigit() or not ids:
            raise CliError(
                f"--placement {value!r} must be SHARD=PRIMARY[,REPLICA...], like 0=node-a,node-b.",
                exit_code=USAGE,
                reason="BAD_PLACEMENT",
            )
        result.append(
            query_pb2.ShardPlacement(shard_index=int(index), primary_node_id=ids[0], replica_node_ids=ids[1:])
        )
    return result


def _list(out: Output, conn: Connection) -> None:
    databases = list(all_databases(conn))
    if out.as_json:
        out.json({"databases": [message_dict(d) for d in databases]})
        return
    if not databases:
        out.say("No databases yet. Create one with: a67 db create NAME --key COLUMN")
        return
    out.table(
        ["NAME", "ID", "DIALECT", "SHARDS", "KEY", "TABLES", "CREATED"],
        [
            (
                d.name,
                d.id,
                d.dialect,
                f"{d.sharding.shard_count} {strategy_label(d.sharding.strategy)}",
                d.sharding.sharding_key,
                ", ".join(t.name for t in d.tables) or "-",
                when(d.created_at),
            )
            for d in databases
        ],
    )
