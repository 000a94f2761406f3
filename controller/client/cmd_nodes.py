"""``a67 nodes`` (list), ``nodes show|drain|undrain|remove|enroll``."""

from __future__ import annotations

from collections.abc import Iterator

import click
from automator67.v1 import common_pb2, node_pb2

from controller.client.app import command, common_options, state
from controller.client.errors import NOT_FOUND, USAGE, CliError
from controller.client.render import enum_label, message_dict, percent, when
from controller.client.session import Connection, _target

AGENT_DATA_DIR = "~/.local/share/automator67-agent"


def all_nodes(conn: Connection) -> Iterator[node_pb2.Node]:
    token = ""
    while True:
        reply = conn.call(conn.nodes.ListNodes, node_pb2.ListNodesRequest(page_size=100, page_token=token))
        yield from reply.nodes
        token = reply.next_page_token
        if not token:
            return


def find_node(conn: Connection, ref: str) -> node_pb2.Node:
    """A node by id or unique id prefix."""
    nodes = list(all_nodes(conn))
    exact = [n for n in nodes if n.id == ref]
    matches = exact or [n for n in nodes if n.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(
            f"You have no node {ref!r}.",
            exit_code=NOT_FOUND,
            reason="NODE_NOT_FOUND",
            hint="list them: a67 nodes",
        )
    raise CliError(
        f"{ref!r} matches {len(matches)} nodes; give more of the id.",
        exit_code=USAGE,
        reason="AMBIGUOUS_NODE",
    )


def status_label(status: common_pb2.NodeStatus.ValueType) -> str:
    return enum_label(common_pb2.NodeStatus.Name(status), "NODE_STATUS_")


def _list(conn: Connection) -> None:
    out = state().output
    nodes = list(all_nodes(conn))
    if out.as_json:
        out.json({"nodes": [message_dict(n) for n in nodes]})
        return
    if not nodes:
        out.say("No nodes yet. Add one with: a67 nodes enroll")
        return
    out.table(
        ["ID", "STATUS", "REGION", "PROVIDER", "CPU", "MEMORY", "REQUESTS", "REPLICAS", "LAST HEARTBEAT"],
        [
            (
                n.id,
                status_label(n.status),
                n.region or "-",
                enum_label(common_pb2.Provider.Name(n.provider), "PROVIDER_"),
                percent(n.metrics.cpu_percent),
                percent(n.metrics.memory_percent),
                n.metrics.active_requests,
                n.deployments,
                when(n.last_heartbeat),
            )
            for n in nodes
        ],
    )


def register(root: click.Group) -> None:
    @root.group("nodes", invoke_without_command=True)
    @common_options
    @click.pass_context
    def nodes(ctx: click.Context) -> int:
        """Your nodes: list them (the default), show, drain, remove, enroll new ones.

        \b
        Examples:
          a67 nodes
          a67 nodes enroll --region eu-west
          a67 nodes drain 3f2a
        """
        if ctx.invoked_subcommand is None:
            _list(state().connection())
        return 0

    @command(nodes, "list")
    def list_cmd() -> None:
        """List your nodes with status, region and load.

        \b
        Example:
          a67 nodes list --json
        """
        _list(state().connection())

    @command(nodes, "show")
    @click.argument("node")
    def show(node: str) -> None:
        """Show one node (by id or a unique prefix of it).

        \b
        Example:
          a67 nodes show 3f2a
        """
        st = state()
        conn = st.connection()
        found = conn.call(conn.nodes.GetNode, node_pb2.GetNodeRequest(node_id=find_node(conn, node).id)).node
        if st.output.as_json:
            st.output.json({"node": message_dict(found)})
            return
        caps, metrics = found.capabilities, found.metrics
        st.output.fields(
            [
                ("id", found.id),
                ("status", status_label(found.status)),
                ("region", found.region or "-"),
                ("provider", enum_label(common_pb2.Provider.Name(found.provider), "PROVIDER_")),
                ("endpoint", found.endpoint or "-"),
                ("node types", ", ".join(caps.node_types) or "-"),
                (
                    "capacity",
                    f"{caps.cpu_cores:g} cores, {caps.memory_gb:g} GB memory, {caps.disk_gb:g} GB disk",
                ),
                (
                    "load",
                    f"cpu {percent(metrics.cpu_percent)}, memory {percent(metrics.memory_percent)}, "
                    f"disk {percent(metrics.disk_percent)}, {metrics.active_requests} active requests",
                ),
                ("errors", f"{metrics.error_rate:g}% ({metrics.avg_response_time_ms:g} ms average response)"),
                ("replicas", found.deployments),
                ("registered", when(found.created_at)),
                ("last heartbeat", when(found.last_heartbeat)),
            ]
        )

    @command(nodes, "drain")
    @click.argument("node")
    def drain(node: str) -> None:
        """Stop placing new replicas on a node (it keeps what it runs).

        \b
        Example:
          a67 nodes drain 3f2a
        """
        st = state()
        conn = st.connection()
        drained = conn.call(
            conn.nodes.DrainNode, node_pb2.DrainNodeRequest(node_id=find_node(conn, node).id)
        ).node
        if st.output.as_json:
            st.output.json({"node": message_dict(drained)})
        else:
            st.output.say(f"Node {drained.id} is {status_label(drained.status)}: no new replicas go to it.")

    @command(nodes, "undrain")
    @click.argument("node")
    def undrain(node: str) -> None:
        """Let a drained node take new replicas again.

        \b
        Example:
          a67 nodes undrain 3f2a
        """
        st = state()
        conn = st.connection()
        undrained = conn.call(
            conn.nodes.UndrainNode, node_pb2.UndrainNodeRequest(node_id=find_node(conn, node).id)
        ).node
        if st.output.as_json:
            st.output.json({"node": message_dict(undrained)})
        else:
            st.output.say(
                f"Node {undrained.id} is {status_label(undrained.status)}: it takes new replicas again."
            )

    @command(nodes, "remove")
    @click.argument("node")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    def remove(node: str, yes: bool) -> None:
        """Remove a node: its stream is closed and its certificate no longer accepted.

        \b
        Example:
          a67 nodes remove 3f2a --yes
        """
        st = state()
        conn = st.connection()
        found = find_node(conn, node)
        if not yes and not st.output.as_json:
            click.confirm(f"Remove node {found.id} ({found.region or 'no region'})?", abort=True, err=True)
        conn.call(conn.nodes.DeregisterNode, node_pb2.DeregisterNodeRequest(node_id=found.id))
        if st.output.as_json:
            st.output.json({"removed": found.id})
        else:
            st.output.say(f"Removed node {found.id}.")

    @command(nodes, "enroll")
    @click.option(
        "--uses", default=1, show_default=True, help="How many nodes may enroll with the token (1-100)."
    )
    @click.option("--ttl", default=3600, show_default=True, help="Seconds the token is valid (60-86400).")
    @click.option("--region", help="Add --region REGION to the printed agent command.")
    @click.option(
        "--node-types", metavar="TYPES", help="Add --node-types TYPES (e.g. compute,database) to the command."
    )
    @click.option("--data-dir", default=AGENT_DATA_DIR, show_default=True, help="The agent's data directory.")
    @click.option(
        "--agent-controller",
        metavar="HOST:PORT",
        help="The controller address as the node reaches it (default: the one this command used).",
    )
    def enroll(
        uses: int,
        ttl: int,
        region: str | None,
        node_types: str | None,
        data_dir: str,
        agent_controller: str | None,
    ) -> None:
        """Create an enrollment token and print the command that enrolls a node.

        Run the printed command on the node. The token is shown only once; it travels in
        the A67_AGENT_TOKEN environment variable, never on the agent's command line.

        \b
        Example:
          a67 nodes enroll --uses 3 --region eu-west
        """
        st = state()
        conn = st.connection()
        reply = conn.call(
            conn.nodes.CreateEnrollmentToken,
            node_pb2.CreateEnrollmentTokenRequest(ttl_seconds=ttl, max_uses=uses),
        )
        target = agent_controller or _target(conn.address)[0]
        words = ["a67", "agent", "--controller", target, "--data-dir", data_dir]
        if region:
            words += ["--region", region]
        if node_types:
            words += ["--node-types", node_types]
        ca = st.connection()._ca_cert
        if ca:
            words += ["--controller-tls-ca", ca]
        agent = " ".join(_quote(w) for w in words)
        line = f"A67_AGENT_TOKEN={reply.token} {agent}"
        if st.output.as_json:
            st.output.json(
                {
                    "token": reply.token,
                    "expires_at": message_dict(reply).get("expires_at"),
                    "max_uses": reply.max_uses,
                    "command": line,
                }
            )
            return
        st.output.note(
            f"Enrollment token created: valid until {when(reply.expires_at)} for {reply.max_uses} "
            f"node{'s' if reply.max_uses != 1 else ''}; it is shown only now. On the node, run:"
        )
        st.output.command_line(line)


def _quote(word: str) -> str:
    if word.startswith("~/"):
        import shlex

        return "~/" + shlex.quote(word[2:])
    import shlex

    return shlex.quote(word)
