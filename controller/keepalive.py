"""HTTP/2 keepalive of node streams: one definition for the agent and the controller.

Both ends ping every half heartbeat interval and give the other half an interval to
answer, even when no call is active, so a dead TCP connection (a node that lost
power, a NAT that forgot the flow) is noticed within one heartbeat interval — well
inside the three-interval failure window — and the stream break makes the node
suspect at once. Below a 1 s interval the 500 ms floors apply, so detection takes
up to 1 s. The server accepts pings every quarter interval without counting a
strike (grpc's default, 5 minutes, would close every agent's connection with
GOAWAY ``too_many_pings``).

>>> dict(client_options(30_000))["grpc.keepalive_time_ms"], dict(client_options(30_000))["grpc.keepalive_timeout_ms"]
(15000, 15000)
"""

from __future__ import annotations

# Shortest ping period and ping timeout, whatever the interval.
FLOOR_MS = 500


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
    """The controller's settings, agreeing with :func:`client_options`."""
    return [
        *client_options(interval_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", max(100, int(interval_ms) // 4)),
        ("grpc.http2.max_ping_strikes", 0),
    ]
