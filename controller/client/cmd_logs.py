"""``a67 logs APP [-f] [--replica N] [--since 10m] [--tail N]``: an app's output
(``DeploymentService.GetReplicaLogs``), and the last lines shown when a rollout fails."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click
from automator67.v1 import deployment_pb2

from controller.client.app import command, state
from controller.client.cmd_apps import find_app
from controller.client.render import Output
from controller.client.session import Connection, bearer

FAILURE_TAIL_LINES = 20
"""Lines of each replica's log ``a67 deploy`` shows when the rollout fails."""

FAILURE_LOGS_SECONDS = 15.0
"""How long ``a67 deploy`` waits for those lines."""


def line_time(line: deployment_pb2.LogLine) -> str:
    """A line's time as ``2024-05-01T12:00:00.123Z`` (UTC), or empty if unknown."""
    if not line.HasField("time"):
        return ""
    moment = datetime.fromtimestamp(line.time.seconds + line.time.nanos / 1e9, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{line.time.nanos // 1_000_000:03d}Z"


def line_records(batch: deployment_pb2.GetReplicaLogsResponse) -> list[dict[str, Any]]:
    """The batch as one JSON object per line (``--json``), or one for a replica's error."""
    if batch.error_message:
        return [
            {"replica_index": batch.replica_index, "node_id": batch.node_id, "error": batch.error_message}
        ]
    return [
        {
            "replica_index": batch.replica_index,
            "node_id": batch.node_id,
            "generation": batch.generation,
            "time": line_time(line) or None,
            "text": line.text,
        }
        for line in batch.lines
    ]


def print_batch(
    out: Output,
    batch: deployment_pb2.GetReplicaLogsResponse,
    *,
    timestamps: bool = True,
    nodes: dict[int, str] | None = None,
) -> None:
    """Write one batch: ``<time> [<replica>] <text>`` lines to stdout (as they are: no
    markup), or JSON lines with ``--json``; a replica's error goes to stderr. ``nodes``
    (replica → the node its last lines came from) makes a move visible: a note on stderr
    when a replica's lines start coming from another node (a follow goes after it)."""
    if nodes is not None and batch.lines:
        before = nodes.get(batch.replica_index)
        if before is not None and before != batch.node_id:
            out.note(
                f"a67: replica {batch.replica_index} moved from node {before} to node {batch.node_id} "
                f"(generation {batch.generation}); following it there"
            )
        nodes[batch.replica_index] = batch.node_id
    if out.as_json:
        for record in line_records(batch):
            out.json_line(record)
        return
    if batch.error_message:
        where = f" on node {batch.node_id}" if batch.node_id else ""
        out.note(f"a67: replica {batch.replica_index}{where}: {batch.error_message}")
        return
    text = "".join(
        (f"{line_time(line)} " if timestamps and line_time(line) else "")
        + f"[{batch.replica_index}] {line.text}\n"
        for line in batch.lines
    )
    sys.stdout.write(text)
    sys.stdout.flush()


def show_failure_logs(conn: Connection, out: Output, deployment_id: str) -> None:
    """After a failed rollout: the last lines of each replica's log on stderr (best effort:
    a failure to read them is not reported)."""
    if out.as_json:
        return
    request = deployment_pb2.GetReplicaLogsRequest(deployment_id=deployment_id, tail_lines=FAILURE_TAIL_LINES)
    try:
        call = conn.deployments.GetReplicaLogs(
            request, metadata=bearer(conn.access_token()), timeout=FAILURE_LOGS_SECONDS
        )
        lines: dict[int, list[str]] = {}
        for batch in call:
            lines.setdefault(batch.replica_index, []).extend(line.text for line in batch.lines)
    except Exception:  # the rollout's own error matters more (grpc.RpcError too)
        return
    for index in sorted(lines):
        if lines[index]:
            out.note(f"last lines of replica {index}'s log:")
            for text in lines[index][-FAILURE_TAIL_LINES:]:
                out.note(f"  {text}")


def register(root: click.Group) -> None:
    @command(root, "logs")
    @click.argument("app")
    @click.option(
        "--follow", "-f", is_flag=True, help="Keep printing new lines as they are written (Ctrl-C stops)."
    )
    @click.option("--replica", type=click.IntRange(0), help="Only this replica (default: all of them).")
    @click.option(
        "--since",
        metavar="WHEN",
        default="",
        help='Only lines written since then: a duration ("10m", "90s", "2h", "1d") or an RFC 3339 time.',
    )
    @click.option(
        "--tail",
        "tail_lines",
        type=click.IntRange(1, 10_000),
        default=100,
        show_default=True,
        help="At most this many of the last lines of each replica.",
    )
    @click.option("--no-timestamps", is_flag=True, help="Print the lines without their times.")
    def logs(
        app: str, follow: bool, replica: int | None, since: str, tail_lines: int, no_timestamps: bool
    ) -> None:
        """Show an app's output (APP is a name or id): the last lines of each replica,
        then with -f new lines as they are written, until Ctrl-C. A followed replica that
        moves to another node (its node failed, a drain) is followed there.

        Each line is printed as "<time> [<replica>] <text>" (one JSON object per line with
        --json). Credentials in the lines are masked.

        \b
        Examples:
          a67 logs hello
          a67 logs hello -f --replica 0
          a67 logs hello --since 10m --tail 500 --json
        """
        st = state()
        out = st.output
        conn = st.connection()
        found = find_app(conn, app)
        request = deployment_pb2.GetReplicaLogsRequest(
            deployment_id=found.id, since=since, tail_lines=tail_lines, follow=follow
        )
        if replica is not None:
            request.replica_index = replica
        stream = conn.stream(conn.deployments.GetReplicaLogs, request)
        nodes: dict[int, str] = {}
        try:
            for batch in stream:
                print_batch(out, batch, timestamps=not no_timestamps, nodes=nodes)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how following ends
        finally:
            stream.cancel()
