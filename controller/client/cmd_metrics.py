"""``a67 metrics`` (the fleet now) and ``a67 metrics --watch`` (live)."""

from __future__ import annotations

from typing import Any

import click
from automator67.v1 import metrics_pb2
from rich.live import Live
from rich.table import Table

from controller.client.app import command, state
from controller.client.render import message_dict, when


def _table(m: metrics_pb2.SystemMetrics) -> Table:
    table = Table(show_header=False, box=None, title="fleet", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in _pairs(m):
        table.add_row(key, value)
    return table


def _pairs(m: metrics_pb2.SystemMetrics) -> list[tuple[str, str]]:
    return [
        ("nodes", f"{m.healthy_nodes} healthy of {m.total_nodes}"),
        ("cpu", f"{m.cpu_percent:.1f}% of {m.total_cpu_cores:g} cores"),
        ("memory", f"{m.memory_percent:.1f}% of {m.total_memory_gb:g} GB"),
        ("errors", f"{m.error_rate:.2f}%"),
        ("response time", f"{m.avg_response_time_ms:.1f} ms average"),
        ("at", when(m.time)),
    ]


def register(root: click.Group) -> None:
    @command(root, "metrics")
    @click.option(
        "--watch", "-w", is_flag=True, help="Keep showing the metrics as they change (Ctrl-C stops)."
    )
    @click.option(
        "--interval",
        type=click.FloatRange(0.1),
        default=1.0,
        show_default=True,
        help="Seconds between updates.",
    )
    @click.option("--count", type=click.IntRange(1), help="With --watch: stop after this many updates.")
    def metrics(watch: bool, interval: float, count: int | None) -> None:
        """The fleet's metrics: nodes, CPU, memory, errors, response time.

        With --watch they update live (one JSON document per line with --json).

        \b
        Examples:
          a67 metrics
          a67 metrics --watch
          a67 metrics --watch --json --count 5
        """
        st = state()
        out = st.output
        conn = st.connection()
        if not watch:
            m = conn.call(conn.metrics.GetSystemMetrics, metrics_pb2.GetSystemMetricsRequest()).metrics
            if out.as_json:
                out.json({"metrics": message_dict(m)})
            else:
                out.fields(_pairs(m), title="fleet")
            return
        stream = conn.stream(
            conn.metrics.WatchSystemMetrics,
            metrics_pb2.WatchSystemMetricsRequest(min_interval_ms=int(interval * 1000)),
        )
        live: Any = None
        seen = 0
        try:
            for reply in stream:
                seen += 1
                if out.as_json:
                    out.json_line({"metrics": message_dict(reply.metrics)})
                elif out.console.is_terminal:
                    if live is None:
                        live = Live(_table(reply.metrics), console=out.console, auto_refresh=False)
                        live.start()
                    live.update(_table(reply.metrics), refresh=True)
                else:
                    out.fields(_pairs(reply.metrics), title="fleet")
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends
        finally:
            stream.cancel()
            if live is not None:
                live.stop()
