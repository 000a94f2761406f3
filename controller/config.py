"""The controller's settings: one typed object, built once from flags and environment.

Every field can be set by an environment variable ``A67_<FIELD>`` (upper case)
and most by a command-line flag of ``a67 serve``; flags win over environment.
With nothing set at all the controller runs on embedded defaults: an SQLite
file and development keys in ``data_dir``, and the in-process cache.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from controller.limits import DEFAULT_MAX_PACKAGE_BYTES

Environment = Literal["development", "production"]

TRANSCODING_OVERHEAD_BYTES = 1024 * 1024
"""What transcoding may add to a REST body on its way to gRPC: fields taken from the
path and query string (bounded by Envoy's 60 KiB header limit) and framing. JSON
itself never grows into protobuf (names become tags, base64 shrinks)."""

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
"""The gateway's default body limit (``A67_GATEWAY_MAX_REQUEST_BODY_SIZE``)."""


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


def check_tls_files(cert: str, key: str, *, cert_name: str, key_name: str) -> None:
    """Raise ``ValueError`` unless both or neither of a certificate and key are set, and readable."""
    if bool(cert) != bool(key):
        missing = key_name if cert else cert_name
        raise ValueError(f"TLS needs both a certificate and a key: {missing} is not set")
    for name, path in ((cert_name, cert), (key_name, key)):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{name}: cannot read {path!r}")


def require_tls_off_loopback(environment: str, address: str, tls: bool, *, setting: str, remedy: str) -> None:
    """In production, refuse a plaintext listener reachable from other machines."""
    if environment != "production" or tls:
        return
    host, _ = split_host_port(address)
    if not is_loopback(host):
        raise ValueError(
            f"{setting} is {address!r}, which other machines can reach, and it has no TLS: "
            f"in production a non-loopback address must serve TLS ({remedy}), or listen on 127.0.0.1"
        )


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "automator67"


@dataclass(frozen=True)
class Settings:
    """Everything the controller needs to start."""

    listen_address: str = "127.0.0.1:50051"
    """Host and port of the user-facing gRPC port (what Envoy and grpcurl use)."""

    node_listen_address: str = "127.0.0.1:50052"
    """Host and port of the node-facing port: mutual TLS only, where agents hold
    their ``NodeService.Connect`` streams. Empty disables it."""

    node_advertise_address: str = ""
    """The node port's address as nodes should dial it (returned by RegisterNode);
    empty means ``node_listen_address``."""

    heartbeat_interval_seconds: float = 30.0
    """How often nodes send a heartbeat (spec §4.4: 30 s). A node is suspect after
    one missed interval and failed after three."""

    node_restart_grace_seconds: float = 300.0
    """After a controller restart, how long a known node may not be declared failed
    (at least three heartbeat intervals). It must cover the agents' reconnect backoff,
    which grows while the controller is down (capped at 5 minutes), or a restart would
    fail healthy nodes and their rollouts; Nomad's failover_heartbeat_ttl is also 5 min."""

    data_dir: Path = field(default_factory=_default_data_dir)
    """Directory for the embedded SQLite store and the development keys."""

    controller_id: str = ""
    """This controller's name in the store's leases (which controller works on a deployment,
    refreshes a token). Empty: generated once and kept in ``data_dir/controller-id``, so a
    restarted controller takes its own leases back at once. Every controller sharing a
    store needs its own (its own data directory, or this set)."""

    store_url: str = ""
    """SQLAlchemy URL of the store; empty means ``sqlite:///<data_dir>/controller.db``.
    PostgreSQL: ``postgresql+psycopg://user@host:5432/db``."""

    cache_url: str = "memory://"
    """``memory://`` for the in-process TTL cache, or ``redis://host:6379/0``."""

    scale_out: bool = False
    """Let several controllers serve one store (experimental: what they share and what
    not yet is in docs/operations.md). Needs PostgreSQL and Redis. Off: a second
    controller on the store refuses to start."""

    environment: Environment = "development"
    """``production`` refuses to start without explicit key material and never
    generates development keys."""

    master_keys: str = ""
    """Vault keyring: comma-separated ``key_id:base64(32 bytes)`` entries; the last
    one encrypts new secrets, all of them decrypt. Empty in development means
    keys generated once into ``data_dir/keys``."""

    master_keys_file: str = ""
    """File holding the vault keyring (the same syntax as ``master_keys``), used when
    ``master_keys`` is empty; ``a67 vault rotate`` adds keys to it and the controller
    re-reads it while running. Empty: ``data_dir/keys/master.keys`` (development)."""

    vault_keyring_poll_seconds: float = 10.0
    """How often a running controller re-reads the keyring file and, after a master-key
    rotation, rewraps stored secrets under the new key."""

    jwt_private_key_file: str = ""
    """PEM file of the Ed25519 key that signs tokens; empty in development means a
    key generated once into ``data_dir/keys``."""

    jwt_retired_public_key_files: str = ""
    """Comma-separated PEM files of Ed25519 keys that signed tokens before a signing-key
    rotation (public or private keys; only the public half is used). Tokens they
    signed stay valid until they expire; new tokens are signed only by
    ``jwt_private_key_file``. Drop a file from the list once the refresh-token lifetime
    has passed since the rotation (docs/credentials.md)."""

    jwt_issuer: str = "automator67-controller"
    """The ``iss`` claim written into and required of every token."""

    jwt_audience: str = "automator67-api"
    """The ``aud`` claim written into and required of every token."""

    access_token_ttl_seconds: int = 3600
    """Lifetime of access tokens (spec §5.1: 1 hour)."""

    refresh_token_ttl_seconds: int = 7 * 24 * 3600
    """Lifetime of refresh tokens (spec §5.1: 7 days)."""

    drain_grace_seconds: float = 10.0
    """On SIGTERM, how long in-flight RPCs may take to finish before they are cancelled."""

    auto_migrate: bool = True
    """Migrate an out-of-date embedded SQLite store at start-up. Other stores are
    never migrated implicitly: ``a67 migrate`` does it."""

    log_level: str = "INFO"
    """Python logging level name."""

    tls_cert: str = ""
    """PEM certificate (chain) of the user-facing gRPC port. With ``tls_key`` set too,
    that port serves TLS only; empty means plaintext, which ``production`` allows only
    on a loopback address. ``a67 up`` gives the gateway the same pair."""

    tls_key: str = ""
    """PEM private key of ``tls_cert``."""

    tls_ca: str = ""
    """PEM CA bundle that verifies ``tls_cert``: what ``a67 up``'s gateway and readiness
    probe trust when they call the controller. Empty means ``tls_cert`` itself (right
    for a self-signed certificate)."""

    max_receive_message_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES + TRANSCODING_OVERHEAD_BYTES
    """Largest gRPC request message accepted. It must be at least the gateway's body
    limit plus :data:`TRANSCODING_OVERHEAD_BYTES`, so that every body the gateway lets
    through reaches a servicer (``a67 up`` raises it when the gateway's limit needs it)."""

    max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES
    """Largest uploaded application source (``UploadSource``), in bytes: 1 GiB."""

    xds_listen_address: str = "127.0.0.1:50053"
    """Where the controller serves Envoy's xDS (ADS) and access-log services to ingress
    Envoys (docs/ingress.md). No authentication: loopback or a private network only.
    Empty disables the ingress control plane."""

    apps_domain: str = "apps.localhost"
    """Apps answer on ``<deployment name>.<user handle>.<apps_domain>`` at the ingress."""

    ingress_url: str = "http://127.0.0.1:8081"
    """The ingress as users reach it: the base of the URLs GetDeployment shows."""

    ingress_drain_seconds: float = 5.0
    """A replica leaving (scale-down, rolling update) is first removed from the ingress
    endpoints; its requests in flight get this long before it is stopped."""

    storage_chunk_bytes: int = 4 * 1024 * 1024
    """Plaintext bytes per stored chunk (docs/storage.md): 4 MiB."""

    storage_max_bytes_per_user: int = 10 * 1024 * 1024 * 1024
    """Storage quota: bytes of complete files per user (10 GiB)."""

    storage_max_files_per_user: int = 100_000
    """Storage quota: files per user."""

    storage_gc_grace_seconds: float = 3600.0
    """How long deleted, replaced and broken uploads' chunks stay on the nodes before
    they are removed (readers that started before the change finish meanwhile)."""

    storage_gc_interval_seconds: float = 60.0
    """How often the storage garbage collector runs."""

    storage_repair_interval_seconds: float = 10.0
    """How often under-replicated chunks are looked for (besides node failures and
    corruption reports, which start a repair at once)."""

    storage_repair_rate_per_second: float = 20.0
    """Chunk copies the repairer makes per second at most (burst: one second's worth)."""

    max_query_bytes: int = 1024 * 1024
    """Longest SQL text ``ExecuteQuery``/``StreamQuery``/``ApplySchema`` accept (1 MiB);
    longer is ``INVALID_ARGUMENT`` (``QUERY_TOO_LONG``) before it is parsed."""

    max_result_rows: int = 100_000
    """Most rows one ``ExecuteQuery`` response (in a transaction too) returns; a larger
    result is ``RESOURCE_EXHAUSTED`` (``RESULT_TOO_LARGE``) naming ``StreamQuery``."""

    collect_shard_max_bytes: int = 256 * 1024 * 1024
    """Encoded bytes one shard statement of an ``ExecuteQuery`` may return (256 MiB)."""

    stream_shard_max_rows: int = 1_000_000_000
    """Rows one shard statement of a ``StreamQuery`` may return."""

    stream_shard_max_bytes: int = 64 * 1024**3
    """Encoded bytes one shard statement of a ``StreamQuery`` may return (64 GiB)."""

    shard_result_queue_batches: int = 4
    """Batches (about 128 KiB each) the controller queues per shard statement before the
    agent is paced by flow control."""

    query_merge_processes: int = 2
    """Worker processes that decode, merge and encode ``StreamQuery`` rows, off the
    controller's GIL (so heartbeats stay on time); a stream beyond them merges in a
    thread. 0: always in a thread."""

    provider_oauth: str = ""
    """The providers' OAuth 2.0 endpoints and client credentials (controller/credentials/),
    JSON: ``{"render": {"token_url": "https://…", "revocation_url": "https://…",
    "client_id": "…", "client_secret_file": "/etc/a67/render.secret"}, …}`` (or
    ``client_secret`` inline). A provider not named here has its tokens stored and
    delivered but never refreshed or revoked at the provider."""

    credential_refresh_share: float = 0.75
    """A provider token is refreshed when this share of its lifetime has passed…"""

    credential_refresh_jitter: float = 0.1
    """…plus or minus up to this share of its lifetime, at random (tokens issued together
    do not refresh together)."""

    credential_refresh_rate_per_second: float = 20.0
    """At most this many provider-token refreshes start per second (per controller)."""

    credential_refresh_concurrency: int = 8
    """At most this many refreshes in flight at once (per controller)."""

    credential_refresh_lease_seconds: float = 60.0
    """How long a controller holds a token's refresh lease (stored): no other controller
    refreshes that token meanwhile, even after the holder dies."""

    credential_refresh_poll_seconds: float = 30.0
    """How often the store is asked for tokens due (also picks up other controllers' work)."""

    credential_refresh_backoff_seconds: float = 5.0
    """First retry delay after a temporary refresh failure; doubled per failure (at most
    300 s, never past the token's expiry)."""

    credential_http_timeout_seconds: float = 10.0
    """Timeout of one call to a provider's token or revocation endpoint."""

    @property
    def tls(self) -> bool:
        """Whether the user-facing port serves TLS."""
        return bool(self.tls_cert and self.tls_key)

    @property
    def effective_store_url(self) -> str:
        """The store URL with the embedded default filled in."""
        return self.store_url or f"sqlite:///{self.data_dir / 'controller.db'}"

    def resolved_controller_id(self) -> str:
        """:attr:`controller_id`, or the one kept in ``data_dir/controller-id`` (made once)."""
        if self.controller_id:
            return self.controller_id
        path = self.data_dir / "controller-id"
        try:
            kept = path.read_text().strip()
        except FileNotFoundError:
            kept = ""
        if not kept:
            kept = f"{socket.gethostname()[:32]}-{uuid.uuid4().hex[:12]}"
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(kept + "\n")
        return kept

    @property
    def keys_dir(self) -> Path:
        """Where development keys live."""
        return self.data_dir / "keys"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``A67_*`` variables, then apply non-None ``overrides``."""
        values = values_from_env(cls, "A67_", environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced."""
        return replace(self, **overrides)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting."""
        if self.environment not in ("development", "production"):
            raise ValueError(f"A67_ENVIRONMENT must be development or production, not {self.environment!r}")
        if self.access_token_ttl_seconds <= 0 or self.refresh_token_ttl_seconds <= 0:
            raise ValueError("token lifetimes must be positive")
        if self.access_token_ttl_seconds >= self.refresh_token_ttl_seconds:
            raise ValueError("the access token lifetime must be shorter than the refresh token lifetime")
        try:
            split_host_port(self.listen_address)
        except ValueError as exc:
            raise ValueError(f"A67_LISTEN_ADDRESS must be host:port: {exc}") from None
        check_tls_files(self.tls_cert, self.tls_key, cert_name="A67_TLS_CERT", key_name="A67_TLS_KEY")
        if self.tls_ca and not os.access(self.tls_ca, os.R_OK):
            raise ValueError(f"A67_TLS_CA: cannot read {self.tls_ca!r}")
        require_tls_off_loopback(
            self.environment,
            self.listen_address,
            self.tls,
            setting="A67_LISTEN_ADDRESS (--listen)",
            remedy="--tls-cert and --tls-key, or A67_TLS_CERT and A67_TLS_KEY",
        )
        if self.max_package_bytes <= 0:
            raise ValueError("A67_MAX_PACKAGE_BYTES must be positive")
        if self.xds_listen_address:
            try:
                xds_host, _ = split_host_port(self.xds_listen_address)
            except ValueError as exc:
                raise ValueError(f"A67_XDS_LISTEN_ADDRESS must be host:port: {exc}") from None
            if self.environment == "production" and not is_loopback(xds_host):
                raise ValueError(
                    f"A67_XDS_LISTEN_ADDRESS is {self.xds_listen_address!r}: the xDS port has no "
                    "authentication, so in production it must listen on a loopback address"
                )
        if not re.fullmatch(
            r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", self.apps_domain
        ):
            raise ValueError(f"A67_APPS_DOMAIN must be a lower-case DNS name, not {self.apps_domain!r}")
        if not 0 <= self.ingress_drain_seconds <= 3600:
            raise ValueError("A67_INGRESS_DRAIN_SECONDS must be between 0 and 3600")
        if not 64 * 1024 <= self.storage_chunk_bytes <= 64 * 1024 * 1024:
            raise ValueError("A67_STORAGE_CHUNK_BYTES must be between 65536 and 67108864")
        if self.storage_max_bytes_per_user <= 0 or self.storage_max_files_per_user <= 0:
            raise ValueError(
                "A67_STORAGE_MAX_BYTES_PER_USER and A67_STORAGE_MAX_FILES_PER_USER must be positive"
            )
        if self.storage_gc_grace_seconds < 0 or self.storage_gc_interval_seconds <= 0:
            raise ValueError("A67_STORAGE_GC_GRACE_SECONDS must be >= 0, A67_STORAGE_GC_INTERVAL_SECONDS > 0")
        if self.storage_repair_interval_seconds <= 0 or self.storage_repair_rate_per_second <= 0:
            raise ValueError(
                "A67_STORAGE_REPAIR_INTERVAL_SECONDS and A67_STORAGE_REPAIR_RATE_PER_SECOND must be positive"
            )
        if not 1024 <= self.max_query_bytes <= 64 * 1024 * 1024:
            raise ValueError("A67_MAX_QUERY_BYTES must be between 1024 and 67108864")
        if self.max_result_rows <= 0 or self.collect_shard_max_bytes <= 0:
            raise ValueError("A67_MAX_RESULT_ROWS and A67_COLLECT_SHARD_MAX_BYTES must be positive")
        if self.stream_shard_max_rows <= 0 or self.stream_shard_max_bytes <= 0:
            raise ValueError("A67_STREAM_SHARD_MAX_ROWS and A67_STREAM_SHARD_MAX_BYTES must be positive")
        if not 1 <= self.shard_result_queue_batches <= 1024:
            raise ValueError("A67_SHARD_RESULT_QUEUE_BATCHES must be between 1 and 1024")
        if not 0 <= self.query_merge_processes <= 64:
            raise ValueError("A67_QUERY_MERGE_PROCESSES must be between 0 and 64")
        if not 0 < self.max_receive_message_bytes < 2**31:
            raise ValueError("A67_MAX_RECEIVE_MESSAGE_BYTES must be between 1 and 2147483647")
        if not 0 < self.credential_refresh_share < 1 or not 0 <= self.credential_refresh_jitter < 1:
            raise ValueError(
                "A67_CREDENTIAL_REFRESH_SHARE must be in (0, 1), A67_CREDENTIAL_REFRESH_JITTER in [0, 1)"
            )
        if self.credential_refresh_share + self.credential_refresh_jitter >= 1:
            raise ValueError("A67_CREDENTIAL_REFRESH_SHARE + A67_CREDENTIAL_REFRESH_JITTER must be below 1")
        if (
            self.credential_refresh_rate_per_second <= 0
            or self.credential_refresh_concurrency <= 0
            or self.credential_refresh_lease_seconds <= 0
            or self.credential_refresh_poll_seconds <= 0
            or self.credential_refresh_backoff_seconds <= 0
            or self.credential_http_timeout_seconds <= 0
        ):
            raise ValueError(
                "the A67_CREDENTIAL_REFRESH_* and A67_CREDENTIAL_HTTP_* settings must be positive"
            )
        if not (
            self.cache_url.startswith("memory://") or self.cache_url.startswith(("redis://", "rediss://"))
        ):
            raise ValueError(f"A67_CACHE_URL must be memory:// or redis://…, not {self.cache_url!r}")
        if self.scale_out and not (
            self.effective_store_url.startswith("postgresql")
            and self.cache_url.startswith(("redis://", "rediss://"))
        ):
            raise ValueError(
                "A67_SCALE_OUT: several controllers share one PostgreSQL store and one Redis; set "
                "A67_STORE_URL=postgresql+psycopg://… and A67_CACHE_URL=redis://… (the embedded "
                "SQLite store and in-process cache serve one controller)"
            )


def values_from_env(
    cls: type[Any],
    prefix: str,
    environ: Mapping[str, str] | None = None,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
) -> dict[str, Any]:
    """Field values of the dataclass ``cls`` from the variables ``<prefix><FIELD>`` that are set.

    Each value is converted by the field's type (int, float, bool, Path, else str), or by
    ``parsers[field]`` when given. Empty variables count as unset.

    >>> values_from_env(Settings, "A67_", {"A67_DRAIN_GRACE_SECONDS": "2.5", "A67_AUTO_MIGRATE": "no"})
    {'drain_grace_seconds': 2.5, 'auto_migrate': False}
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = env.get(f"{prefix}{f.name.upper()}")
        if raw is None or raw == "":
            continue
        parse = (parsers or {}).get(f.name)
        values[f.name] = parse(raw) if parse is not None else _coerce(f.type, raw)
    return values


def _coerce(kind: Any, raw: str) -> Any:
    if kind in ("int", int):
        return int(raw)
    if kind in ("float", float):
        return float(raw)
    if kind in ("bool", bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind in ("Path", Path):
        return Path(raw).expanduser()
    return raw
