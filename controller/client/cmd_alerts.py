"""``a67 alerts`` (what the controller did or holds for you: mass-failure freezes, failed
and reverted rollouts) and ``a67 alerts unfreeze`` (lift a recovery freeze)."""

from __future__ import annotations

import click
from automator67.v1 import node_pb2

from controller.client.app import command, common_options, state
from controller.client.render import message_dict, when


def register(root: click.Group) -> None:
    @root.group("alerts", invoke_without_command=True)
    @common_options
    @click.option("--all", "show_all", is_flag=True, help="Also the alerts that no longer apply.")
    @click.option(
        "--limit", type=click.IntRange(1, 500), default=50, show_default=True, help="At most this many."
    )
    @click.pass_context
    def alerts(ctx: click.Context, show_all: bool, limit: int) -> None:
        """Alerts about your fleet, newest first: recovery frozen after a mass failure,
        rollouts that failed or were reverted.

        \b
        Examples:
          a67 alerts
          a67 alerts --all --json
          a67 alerts unfreeze            # lift a mass-failure freeze
        """
        if ctx.invoked_subcommand is not None:
            return
        st = state()
        conn = st.connection()
        reply = conn.call(conn.nodes.ListAlerts, node_pb2.ListAlertsRequest(page_size=limit))
        shown = [a for a in reply.alerts if show_all or a.active]
        if st.output.as_json:
            st.output.json({"alerts": [message_dict(a) for a in shown]})
            return
        if not shown:
            st.output.say(
                "No alerts." if show_all else "No alert applies now (--all lists the earlier ones)."
            )
            return
        st.output.table(
            ["when", "kind", "applies", "deployment", "message"],
            [
                (
                    when(a.created_at),
                    a.kind,
                    "yes" if a.active else "no",
                    a.deployment_id[:8] or "-",
                    a.message,
                )
                for a in shown
            ],
        )

    @command(alerts, "unfreeze")
    def unfreeze() -> None:
        """Lift a mass-failure freeze: replicas of failed nodes are placed elsewhere again.

        \b
        Example:
          a67 alerts unfreeze
        """
        st = state()
        conn = st.connection()
        reply = conn.call(conn.nodes.UnfreezeRecovery, node_pb2.UnfreezeRecoveryRequest())
        if st.output.as_json:
            st.output.json(message_dict(reply))
        elif reply.was_frozen:
            st.output.say(f"Recovery resumed: {len(reply.recovering_node_ids)} node(s) being recovered.")
        else:
            st.output.say("Recovery was not frozen: nothing to lift.")
