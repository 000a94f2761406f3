"""HTTP status codes other than 200 for REST callers behind Envoy.

Envoy's transcoder maps gRPC codes to HTTP codes, but a success is always 200.
A servicer that should answer 201 or 202 sends this response header as initial
metadata; the gateway's Lua filter turns it into ``:status`` and removes it.
gRPC callers simply see (and may ignore) the header.
"""

from __future__ import annotations

from typing import Any

import grpc

HTTP_STATUS_HEADER = "x-a67-http-status"


async def set_http_status(context: grpc.aio.ServicerContext[Any, Any], status: int) -> None:
    """Ask the gateway to answer with ``status`` instead of 200."""
    await context.send_initial_metadata(((HTTP_STATUS_HEADER, str(status)),))
