"""The gateway's settings: one typed object, built once from flags and environment.

Every field can be set by an environment variable ``A67_GATEWAY_<FIELD>`` (upper
case) and most by a flag of ``a67 gateway``; flags win over environment. With
nothing set, the gateway listens for REST on ``127.0.0.1:8080`` and forwards to
the controller's gRPC port on ``127.0.0.1:50051``, with no admin interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from controller.config import values_from_env

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (the gateway template and the descriptor live there)."""

DEFAULT_TEMPLATE = REPO_ROOT / "gateway" / "envoy.yaml.tmpl"
DEFAULT_DESCRIPTOR = REPO_ROOT / "generated" / "automator67.binpb"

StreamFormat = Literal["ndjson", "sse"]
STREAM_FORMATS: tuple[str, ...] = get_args(StreamFormat)
ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


def split_host_port(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; ``"[::1]:8080"`` → ``("::1", 8080)``.

    >>> split_host_port("[::1]:80")
    ('::1', 80)
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, not {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewaySettings:
    """Everything needed to render the Envoy configuration and run Envoy."""

    listen_address: str = "127.0.0.1:8080"
    """Host and port where Envoy serves REST/JSON (what the dashboard and curl use)."""

    upstream_address: str = "127.0.0.1:50051"
    """Host and port of the controller's gRPC port that Envoy forwards to."""

    descriptor_path: Path = DEFAULT_DESCRIPTOR
    """Descriptor set (``protoc --include_imports``) holding the services and the
    ``google.rpc`` detail types; ``scripts/gen_protos.py`` writes it."""

    template_path: Path = DEFAULT_TEMPLATE
    """The Envoy configuration template."""

    cors_allowed_origins: tuple[str, ...] = ("http://localhost:3000", "http://127.0.0.1:3000")
    """Origins of the dashboard that browsers may call the API from (exact
    matches, e.g. ``https://dash.example.com``; ``*`` allows any origin). Set
    as a comma-separated list in the environment or on the command line."""

    stream_format: StreamFormat = "ndjson"
    """How server-streaming RPCs (``…:watch``) reach the browser: ``ndjson`` (one
    JSON object per line, read with ``fetch``) or ``sse`` (``text/event-stream``
    ``data:`` events). Each message is flushed as the controller sends it."""

    max_connections: int = 10000
    """Most open client connections, and most requests in flight to the controller
    (each open watch stream holds one)."""

    max_request_body_size: int = 16 * 1024 * 1024
    """Largest REST request body in bytes; a bigger one gets 413. 16 MiB admits a
    deployment's 10 MiB source archive, which JSON carries as base64 (about 13.4 MiB),
    and matches the controller's gRPC message limit."""

    request_timeout_seconds: float = 60.0
    """Upper bound on a unary call through the gateway (then 504). Watch
    streams have no such bound."""

    stream_idle_timeout_seconds: float = 3600.0
    """A watch stream that pushes nothing for this long is closed."""

    admin_address: str = ""
    """Envoy's admin interface (stats, ``/ready``): empty disables it; otherwise a
    loopback ``HOST:PORT``, because the admin interface can stop the process."""

    concurrency: int = 0
    """Envoy worker threads; 0 means one per CPU."""

    log_level: str = "warning"
    """Envoy's log level: trace, debug, info, warning, error, critical or off."""

    @property
    def listen(self) -> tuple[str, int]:
        return split_host_port(self.listen_address)

    @property
    def upstream(self) -> tuple[str, int]:
        return split_host_port(self.upstream_address)

    @property
    def admin(self) -> tuple[str, int] | None:
        return split_host_port(self.admin_address) if self.admin_address else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        """Build settings from ``A67_GATEWAY_*`` variables, then apply non-None ``overrides``."""
        values = values_from_env(cls, "A67_GATEWAY_", environ, {"cors_allowed_origins": parse_origins})
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> GatewaySettings:
        """A validated copy with some fields replaced (``None`` values are ignored)."""
        settings = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting."""
        for name in ("listen_address", "upstream_address"):
            try:
                split_host_port(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"A67_GATEWAY_{name.upper()}: {exc}") from None
        if self.admin_address:
            try:
                host, _ = split_host_port(self.admin_address)
            except ValueError as exc:
                raise ValueError(f"A67_GATEWAY_ADMIN_ADDRESS: {exc}") from None
            if not is_loopback(host):
                raise ValueError(
                    f"A67_GATEWAY_ADMIN_ADDRESS must be a loopback address, not {self.admin_address!r}"
                )
        if not self.cors_allowed_origins:
            raise ValueError("A67_GATEWAY_CORS_ALLOWED_ORIGINS needs at least one origin")
        for origin in self.cors_allowed_origins:
            if origin != "*" and (
                "://" not in origin or origin.endswith("/") or any(c in origin for c in " \"'\\")
            ):
                raise ValueError(
                    f"A67_GATEWAY_CORS_ALLOWED_ORIGINS: {origin!r} is not an origin like https://host[:port]"
                )
        if self.stream_format not in STREAM_FORMATS:
            raise ValueError(f"A67_GATEWAY_STREAM_FORMAT must be one of {', '.join(STREAM_FORMATS)}")
        if self.max_connections <= 0:
            raise ValueError("A67_GATEWAY_MAX_CONNECTIONS must be positive")
        if self.max_request_body_size <= 0:
            raise ValueError("A67_GATEWAY_MAX_REQUEST_BODY_SIZE must be positive")
        if self.request_timeout_seconds <= 0 or self.stream_idle_timeout_seconds <= 0:
            raise ValueError("gateway timeouts must be positive")
        if self.concurrency < 0:
            raise ValueError("A67_GATEWAY_CONCURRENCY must be 0 (one per CPU) or more")
        if self.log_level not in ENVOY_LOG_LEVELS:
            raise ValueError(f"A67_GATEWAY_LOG_LEVEL must be one of {', '.join(ENVOY_LOG_LEVELS)}")


def parse_origins(raw: str) -> tuple[str, ...]:
    """``"https://a, https://b"`` → ``("https://a", "https://b")``."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())
