"""HTTP/2 keepalive of node streams: one definition for the agent and the controller.

The **agent** pings every half heartbeat interval and gives the controller half an
interval to answer, even when no call is active, so a dead TCP connection (a
controller that lost power, a NAT that forgot the flow) is noticed by the agent
within one heartbeat interval and it reconnects. Below a 1 s interval the 500 ms
floors apply, so that takes up to 1 s.

The **controller** needs no pings to notice a silent node: the heartbeats are its
liveness signal (suspect after 1.1 intervals of silence, failed after 3.1, see
:mod:`controller.nodes.health`), and a connection that breaks cleanly (kill -9,
reset) ends the stream at once. Its own pings only reclaim half-open connections,
so it pings every :data:`SERVER_PING_INTERVALS` intervals (a quarter of the agent's
rate) instead of every half interval: the node port's ping traffic per connection is
2.5 pings per 4 intervals, not 4 per 1 (the agent's 2 plus the controller's 2), on
top of the heartbeat and its ack. A half-open connection is closed within 2.5
intervals; the node is suspect after 1.1 intervals whatever happens to it.

The server accepts pings every quarter interval without counting a strike (grpc's
default, 5 minutes, would close every agent's connection with GOAWAY
``too_many_pings``).

>>> dict(client_options(30_000))["grpc.keepalive_time_ms"], dict(client_options(30_000))["grpc.keepalive_timeout_ms"]
(15000, 15000)
"""

from __future__ import annotations

# Shortest ping period and ping timeout, whatever the interval.
FLOOR_MS = 500

SERVER_PING_INTERVALS = 2
"""The controller pings a silent connection every this many heartbeat intervals."""


def _ping_ms(interval_ms: int) -> int:
    return max(FLOOR_MS, int(interval_ms) // 2)


def client_options(interval_ms: int) -> list[tuple[str, int]]:
    """The agent channel's keepalive settings for a heartbeat interval of ``interval_ms``."""
    return [
        ("grpc.keepalive_time_ms", _ping_ms(interval_ms)),
        ("grpc.keepalive_timeout_ms", _ping_ms(interval_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(interval_ms: int) -> list[tuple[str, int]]:
    """The controller's settings, agreeing with :func:`client_options` (see the module docstring).

    >>> dict(server_options(30_000))["grpc.keepalive_time_ms"], dict(server_options(30_000))["grpc.keepalive_timeout_ms"]
    (60000, 15000)
    """
    return [
        ("grpc.keepalive_time_ms", max(FLOOR_MS, SERVER_PING_INTERVALS * int(interval_ms))),
        ("grpc.keepalive_timeout_ms", _ping_ms(interval_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", max(100, int(interval_ms) // 4)),
        ("grpc.http2.max_ping_strikes", 0),
    ]
