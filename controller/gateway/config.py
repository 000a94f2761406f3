"""The gateway's settings: one typed object, built once from flags and environment.

Every field can be set by an environment variable ``A67_GATEWAY_<FIELD>`` (upper
case) and most by a flag of ``a67 gateway``; flags win over environment. With
nothing set, the gateway listens for REST on ``127.0.0.1:8080`` and forwards to
the controller's gRPC port on ``127.0.0.1:50051``, with no admin interface.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from controller.config import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    TRANSCODING_OVERHEAD_BYTES,
    check_tls_files,
    is_loopback,
    require_tls_off_loopback,
    split_host_port,
    values_from_env,
)
from controller.limits import DEFAULT_MAX_PACKAGE_BYTES

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (the gateway template and the descriptor live there)."""

DEFAULT_TEMPLATE = REPO_ROOT / "gateway" / "envoy.yaml.tmpl"
DEFAULT_DESCRIPTOR = REPO_ROOT / "generated" / "automator67.binpb"
DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "dashboard"
"""The web dashboard's files (plain HTML, CSS and JavaScript modules; no build step)."""

StreamFormat = Literal["ndjson", "sse"]
STREAM_FORMATS: tuple[str, ...] = get_args(StreamFormat)
MAX_BODY_LIMIT = 1024 * 1024 * 1024
"""The largest body limit accepted: gRPC messages cannot exceed 2 GiB, and nothing here needs more."""

SHARED_VARIABLES = {"environment": "A67_ENVIRONMENT", "tls_cert": "A67_TLS_CERT", "tls_key": "A67_TLS_KEY"}
"""Fields the gateway shares with the controller: read from these variables unless
``A67_GATEWAY_<FIELD>`` is set."""

ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


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

    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    """Largest REST request body in bytes; a bigger one gets 413, whatever its framing
    (content-length or chunked). 16 MiB admits a deployment's 10 MiB source archive,
    which JSON carries as base64 (about 13.4 MiB). The controller's
    ``max_receive_message_bytes`` must be at least this plus
    :data:`~controller.config.TRANSCODING_OVERHEAD_BYTES` (its default is)."""

    max_upload_body_size: int = DEFAULT_MAX_PACKAGE_BYTES
    """Largest body of a source upload (``POST /api/v1/sources``, a raw tar.gz): that
    route has its own limit (1 GiB by default; keep it at most the controller's
    ``max_package_bytes``, which refuses anything bigger anyway). Bigger → 413."""

    request_timeout_seconds: float = 60.0
    """Upper bound on a unary call through the gateway (then 504). Watch
    streams have no such bound."""

    stream_idle_timeout_seconds: float = 3600.0
    """A watch stream that pushes nothing for this long is closed."""

    admin_address: str = ""
    """Envoy's admin interface (stats, ``/ready``): empty disables it; otherwise a
    loopback ``HOST:PORT``, because the admin interface can stop the process."""

    access_log_path: str = ""
    """File Envoy appends one line per request to, in Envoy's default access-log format
    (time, method, REST path, status, sizes, duration, user agent, request id: never
    a header such as ``authorization``, never a body); ``/dev/stdout`` works too.
    Empty: no access log."""

    concurrency: int = 0
    """Envoy worker threads; 0 means one per CPU."""

    log_level: str = "warning"
    """Envoy's log level: trace, debug, info, warning, error, critical or off."""

    environment: str = "development"
    """``production`` refuses a non-loopback ``listen_address`` without TLS, and a
    non-loopback upstream without ``upstream_tls_ca``. Read from ``A67_ENVIRONMENT``."""

    tls_cert: str = ""
    """PEM certificate (chain) Envoy serves REST with; with ``tls_key`` set too, the
    listener speaks HTTPS only (h2 and HTTP/1.1 by ALPN). Read from ``A67_TLS_CERT``
    unless ``A67_GATEWAY_TLS_CERT`` is set."""

    tls_key: str = ""
    """PEM private key of ``tls_cert`` (``A67_TLS_KEY`` unless ``A67_GATEWAY_TLS_KEY``)."""

    upstream_tls_ca: str = ""
    """PEM CA bundle that verifies the controller's certificate. Set, Envoy calls the
    controller over TLS (the controller then needs ``A67_TLS_CERT``/``A67_TLS_KEY``);
    empty, over plaintext HTTP/2."""

    dashboard: bool = True
    """Serve the web dashboard at the listener's root (``/``; the API stays under
    ``/api/``). Envoy answers each file itself, read once when it starts."""

    dashboard_dir: Path = DEFAULT_DASHBOARD
    """The folder of the dashboard's files; every file in it is served at ``/<name>``
    (``index.html`` also at ``/``)."""

    agent_controller_address: str = ""
    """The controller's address as a new node reaches it, shown in the dashboard's
    ``a67 agent --controller …`` enroll command. Empty means ``upstream_address``."""

    upstream_tls_server_name: str = ""
    """With ``upstream_tls_ca``: the name sent as SNI and required in the controller's
    certificate (a DNS name or IP address among its subject alternative names). Empty
    means the upstream host."""

    @property
    def tls(self) -> bool:
        """Whether Envoy serves HTTPS."""
        return bool(self.tls_cert and self.tls_key)

    @property
    def upstream_server_name(self) -> str:
        return self.upstream_tls_server_name or self.upstream[0]

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
        env = os.environ if environ is None else environ
        values = values_from_env(cls, "A67_GATEWAY_", env, {"cors_allowed_origins": parse_origins})
        for name, variable in SHARED_VARIABLES.items():
            if name not in values and env.get(variable):
                values[name] = env[variable]
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
        if not 0 < self.max_upload_body_size <= MAX_BODY_LIMIT:
            raise ValueError(
                f"A67_GATEWAY_MAX_UPLOAD_BODY_SIZE must be between 1 and {MAX_BODY_LIMIT} bytes, "
                f"not {self.max_upload_body_size}"
            )
        if not 0 < self.max_request_body_size <= MAX_BODY_LIMIT:
            raise ValueError(
                f"A67_GATEWAY_MAX_REQUEST_BODY_SIZE must be between 1 and {MAX_BODY_LIMIT} bytes, "
                f"not {self.max_request_body_size}"
            )
        if self.request_timeout_seconds <= 0 or self.stream_idle_timeout_seconds <= 0:
            raise ValueError("gateway timeouts must be positive")
        if any(c in self.access_log_path for c in '\n\r"\\'):
            raise ValueError(f"A67_GATEWAY_ACCESS_LOG_PATH: {self.access_log_path!r} is not a usable path")
        if self.concurrency < 0:
            raise ValueError("A67_GATEWAY_CONCURRENCY must be 0 (one per CPU) or more")
        if self.log_level not in ENVOY_LOG_LEVELS:
            raise ValueError(f"A67_GATEWAY_LOG_LEVEL must be one of {', '.join(ENVOY_LOG_LEVELS)}")
        if self.environment not in ("development", "production"):
            raise ValueError(f"A67_ENVIRONMENT must be development or production, not {self.environment!r}")
        check_tls_files(
            self.tls_cert, self.tls_key, cert_name="A67_GATEWAY_TLS_CERT", key_name="A67_GATEWAY_TLS_KEY"
        )
        if self.upstream_tls_ca and not os.access(self.upstream_tls_ca, os.R_OK):
            raise ValueError(f"A67_GATEWAY_UPSTREAM_TLS_CA: cannot read {self.upstream_tls_ca!r}")
        if self.agent_controller_address:
            try:
                split_host_port(self.agent_controller_address)
            except ValueError as exc:
                raise ValueError(f"A67_GATEWAY_AGENT_CONTROLLER_ADDRESS: {exc}") from None
        if self.dashboard and not self.dashboard_dir.is_dir():
            raise ValueError(f"A67_GATEWAY_DASHBOARD_DIR: {str(self.dashboard_dir)!r} is not a folder")
        if any(c in self.upstream_tls_server_name for c in " \"'\\/"):
            raise ValueError(f"A67_GATEWAY_UPSTREAM_TLS_SERVER_NAME: {self.upstream_tls_server_name!r}")
        require_tls_off_loopback(
            self.environment,
            self.listen_address,
            self.tls,
            setting="A67_GATEWAY_LISTEN_ADDRESS (--listen, --http-listen)",
            remedy="--tls-cert and --tls-key, or A67_TLS_CERT and A67_TLS_KEY",
        )
        require_tls_off_loopback(
            self.environment,
            self.upstream_address,
            bool(self.upstream_tls_ca),
            setting="A67_GATEWAY_UPSTREAM_ADDRESS (--upstream)",
            remedy="--upstream-tls-ca, or A67_GATEWAY_UPSTREAM_TLS_CA",
        )


def controller_receive_limit(max_request_body_size: int) -> int:
    """The smallest gRPC receive limit the controller needs behind a gateway with this body limit."""
    return max_request_body_size + TRANSCODING_OVERHEAD_BYTES


def parse_origins(raw: str) -> tuple[str, ...]:
    """``"https://a, https://b"`` → ``("https://a", "https://b")``."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


__all__ = [
    "DEFAULT_DASHBOARD",
    "DEFAULT_DESCRIPTOR",
    "DEFAULT_TEMPLATE",
    "ENVOY_LOG_LEVELS",
    "MAX_BODY_LIMIT",
    "REPO_ROOT",
    "STREAM_FORMATS",
    "GatewaySettings",
    "StreamFormat",
    "controller_receive_limit",
    "is_loopback",
    "parse_origins",
    "split_host_port",
]
