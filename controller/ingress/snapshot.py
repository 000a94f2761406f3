"""The ingress snapshot: deployments and their replicas in, Envoy resources out. Pure.

Nothing here does I/O or reads a clock: :func:`build_snapshot` turns a tuple of
:class:`AppRoute` (one per deployment that gets routes) and :class:`IngressOptions`
into the four kinds of resources an ingress Envoy asks for over ADS:

* **clusters** (CDS): one per deployment, named by its id, ``type: EDS``, weighted
  round robin, outlier detection (consecutive 5xx / gateway failures eject a replica for
  a while), panic mode off (an ejected replica is not used as long as another one is);
* **endpoints** (EDS): one ``ClusterLoadAssignment`` per deployment: its routable
  replicas (``host:port`` of the replica endpoint the agent reported) with
  ``load_balancing_weight`` = the node's weight (:func:`weight_of_score`);
* **routes** (RDS): one ``RouteConfiguration`` (:data:`ROUTE_CONFIG_NAME`): a virtual
  host per deployment for ``<name>.<handle>.<apps domain>``, and one default
  virtual host holding the path form ``/apps/<deployment id>/`` (prefix rewritten to
  ``/``) and a JSON 404 for everything else. GET and HEAD are retried on connect
  failures, resets and 5xx on another replica; other methods only when the request
  never reached a replica (connect failure, refused stream);
* **listeners** (LDS): per ingress (its own listen address, from the Envoy node's
  metadata), an HTTP connection manager that takes the routes over ADS, logs every
  request and every upstream attempt to the controller's access-log service, and
  answers local replies as JSON.

The builder returns every resource as a protobuf message in a :class:`Snapshot`,
keyed by type URL and resource name; versions are the server's business
(:mod:`controller.ingress.xds`). :class:`SnapshotBuilder` makes the same snapshot
(byte for byte) incrementally: it keeps each deployment's resources serialized and
rebuilds only those whose route changed, so a change costs in proportion to itself
rather than to every deployment.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.message import Message

from controller.ingress import envoy_types  # noqa: F401  (registers the Envoy types used below)

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
"""The order in which changes are pushed: clusters before their endpoints, listeners
before their routes (Envoy's recommended make-before-break order for ADS)."""

ROUTE_CONFIG_NAME = "a67_apps"
LISTENER_NAME = "a67_ingress"
XDS_CLUSTER = "a67_xds"
"""The static cluster in the ingress bootstrap that reaches the controller's xDS port;
the access-log service is called over it too."""
ACCESS_LOG_NAME = "a67_requests"
UPSTREAM_LOG_NAME = "a67_attempts"
"""``log_name`` of the two gRPC access logs: one entry per request (what the client
saw), one per upstream attempt (what each replica answered, retries included)."""

PATH_PREFIX = "/apps/"
NOT_FOUND_BODY = "No app is served at this address"

MIN_WEIGHT = 1
MAX_WEIGHT = 100
WEIGHT_STEP = 5
"""Weights are the node score (0..1) in steps of 5 out of 100, at least 1: a score
that wobbles by a fraction of a percent does not re-push endpoints."""

_LABEL = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One routable replica."""

    host: str
    port: int
    weight: int
    node_id: str = ""
    replica_index: int = 0


@dataclass(frozen=True, slots=True)
class AppRoute:
    """One deployment that gets routes: where it is reachable and which replicas serve it."""

    deployment_id: str
    name: str
    handle: str
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class IngressOptions:
    """What every ingress shares (from :class:`controller.config.Settings`)."""

    apps_domain: str = "apps.localhost"
    connect_timeout_seconds: float = 1.0
    request_timeout_seconds: float = 60.0
    retries: int = 2
    """Retries of one request on other replicas (so at most three replicas are tried)."""
    outlier_consecutive_5xx: int = 5
    outlier_interval_seconds: float = 1.0
    outlier_base_ejection_seconds: float = 5.0
    outlier_max_ejection_percent: int = 50
    access_log_flush_seconds: float = 0.2


@dataclass(frozen=True, slots=True)
class Encoded:
    """One resource as it goes on the wire: its deterministic serialization, and a digest of
    its name and bytes (what the xDS server compares instead of the bytes)."""

    name: str
    data: bytes
    digest: bytes


def encode(name: str, message: Message) -> Encoded:
    data = message.SerializeToString(deterministic=True)
    return Encoded(name, data, _entry_digest(name, data))


def _entry_digest(name: str, data: bytes) -> bytes:
    h = hashlib.sha256(name.encode())
    h.update(b"\0")
    h.update(data)
    return h.digest()


def content_digest(entries: Iterable[Encoded]) -> str:
    """The digest of some resources (in the order given): of their entry digests, not their bytes."""
    return hashlib.sha256(b"".join(e.digest for e in entries)).hexdigest()


class Snapshot:
    """Every resource by type URL, then by name: as protobuf messages, serialized, or both.

    Either form is derived from the other on first use (and kept): :func:`build_snapshot`
    makes messages, :class:`SnapshotBuilder` bytes; the xDS server reads bytes and digests.
    """

    __slots__ = ("_digests", "_encoded", "_messages")

    def __init__(
        self,
        resources: Mapping[str, Mapping[str, Message]] | None = None,
        *,
        encoded: Mapping[str, Mapping[str, Encoded]] | None = None,
    ) -> None:
        self._messages: dict[str, Mapping[str, Message]] = dict(resources or {})
        self._encoded: dict[str, Mapping[str, Encoded]] = dict(encoded or {})
        self._digests: dict[str, str] = {}

    def of(self, type_url: str) -> Mapping[str, Message]:
        messages = self._messages.get(type_url)
        if messages is None:
            message_class = _message_class(type_url)
            messages = {
                n: message_class.FromString(e.data) for n, e in self._encoded.get(type_url, {}).items()
            }
            self._messages[type_url] = messages
        return messages

    def encoded(self, type_url: str) -> Mapping[str, Encoded]:
        encoded = self._encoded.get(type_url)
        if encoded is None:
            encoded = {n: encode(n, m) for n, m in self._messages.get(type_url, {}).items()}
            self._encoded[type_url] = encoded
        return encoded

    def digest(self, type_url: str) -> str:
        """The digest of every resource of ``type_url`` (:func:`content_digest` in name order)."""
        digest = self._digests.get(type_url)
        if digest is None:
            encoded = self.encoded(type_url)
            digest = content_digest(encoded[n] for n in sorted(encoded))
            self._digests[type_url] = digest
        return digest


# -- names ---------------------------------------------------------------------------------------


def dns_label(text: str, limit: int = 63) -> str:
    """``text`` as a DNS label: ASCII lower case letters, digits and inner hyphens.

    >>> dns_label("Ada.Lovelace+test")
    'ada-lovelace-test'
    >>> dns_label("Zoë")
    'zoe'
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _LABEL.sub("-", ascii_text).strip("-")[:limit].strip("-")


def user_handle(email: str, user_id: str) -> str:
    """The user's label in app host names: ``<local part>-<first 8 hex of the user id>``.

    The local part of the (normalised) email, as a DNS label of at most 20 characters
    (``user`` if nothing is left), then 8 hex digits of the user id: readable, stable for
    the account's life, and distinct for two users whose emails share a local part
    (``ada@example.com`` and ``ada@example.org``).

    >>> user_handle("Ada.Lovelace@example.com", "3f2a1c9e-0d4b-4c3e-9a55-1b2c3d4e5f60")
    'ada-lovelace-3f2a1c9e'
    >>> user_handle("+++@example.com", "0000abcd-0000-0000-0000-000000000000")
    'user-0000abcd'
    """
    local = email.rsplit("@", 1)[0]
    label = dns_label(local, 20) or "user"
    short = "".join(c for c in user_id.lower() if c in "0123456789abcdef")[:8]
    return f"{label}-{short}"


def app_host(name: str, handle: str, apps_domain: str) -> str:
    """``<deployment name>.<user handle>.<apps domain>``."""
    return f"{name}.{handle}.{apps_domain}"


def app_urls(route: AppRoute, options: IngressOptions, ingress_base: str = "") -> list[str]:
    """The URLs of a deployment: the host form, and the path form on ``ingress_base``."""
    host = app_host(route.name, route.handle, options.apps_domain)
    port = ingress_base.rsplit(":", 1)[1] if ingress_base.count(":") >= 2 else ""
    urls = [f"http://{host}{':' + port if port else ''}/"]
    if ingress_base:
        urls.append(f"{ingress_base.rstrip('/')}{PATH_PREFIX}{route.deployment_id}/")
    return urls


def weight_of_score(score: float) -> int:
    """A node's score in ``[0, 1]`` as an endpoint weight: steps of 5 out of 100, at least 1.

    >>> weight_of_score(0.0), weight_of_score(0.42), weight_of_score(0.999), weight_of_score(2)
    (1, 40, 100, 100)
    """
    if score != score:  # NaN
        score = 0.5
    clamped = min(1.0, max(0.0, score))
    return max(MIN_WEIGHT, min(MAX_WEIGHT, round(clamped * MAX_WEIGHT / WEIGHT_STEP) * WEIGHT_STEP))


def split_endpoint(endpoint: str) -> tuple[str, int] | None:
    """``http://127.0.0.1:20001`` → ``("127.0.0.1", 20001)``; None if it has no port.

    >>> split_endpoint("http://127.0.0.1:20001"), split_endpoint("http://[::1]:8"), split_endpoint("x")
    (('127.0.0.1', 20001), ('::1', 8), None)
    """
    rest = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


# -- resources -----------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _message_class(type_url: str) -> Any:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(type_url.rsplit("/", 1)[1])


def _parse(type_url: str, body: dict[str, Any]) -> Message:
    message: Message = json_format.ParseDict(body, _message_class(type_url)())
    return message


def _json_404() -> dict[str, Any]:
    return {
        "match": {"prefix": "/"},
        "name": "not_found",
        "direct_response": {"status": 404, "body": {"inline_string": NOT_FOUND_BODY}},
    }


def _routes_to(
    cluster: str, match: dict[str, Any], options: IngressOptions, name: str
) -> list[dict[str, Any]]:
    """Two routes for one match: GET/HEAD with retries on 5xx and resets, the rest without."""
    base: dict[str, Any] = {"cluster": cluster, "timeout": _seconds(options.request_timeout_seconds)}
    if "prefix_rewrite" in match:
        base["prefix_rewrite"] = match.pop("prefix_rewrite")
    host_predicate = [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ]
    idempotent = {
        **base,
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,reset,5xx",
            "num_retries": options.retries,
            "retry_host_predicate": host_predicate,
            "host_selection_retry_max_attempts": "5",
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.050s"},
        },
    }
    other = {
        **base,
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream",
            "num_retries": options.retries,
            "retry_host_predicate": host_predicate,
            "host_selection_retry_max_attempts": "5",
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.050s"},
        },
    }
    method = {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}
    return [
        {"name": f"{name}_idempotent", "match": {**match, "headers": [method]}, "route": idempotent},
        {"name": name, "match": dict(match), "route": other},
    ]


def _virtual_host(app: AppRoute, options: IngressOptions) -> dict[str, Any]:
    """The virtual host of one deployment: its host name, every path to its cluster."""
    return {
        "name": f"app_{app.deployment_id}",
        "domains": [app_host(app.name, app.handle, options.apps_domain)],
        "routes": _routes_to(app.deployment_id, {"prefix": "/"}, options, f"host_{app.deployment_id}"),
    }


def _path_routes(app: AppRoute, options: IngressOptions) -> list[dict[str, Any]]:
    """The routes of one deployment in the default virtual host: ``/apps/<id>/`` and ``/apps/<id>``."""
    prefix = f"{PATH_PREFIX}{app.deployment_id}"
    return [
        *_routes_to(
            app.deployment_id,
            {"prefix": prefix + "/", "prefix_rewrite": "/"},
            options,
            f"path_{app.deployment_id}",
        ),
        *_routes_to(
            app.deployment_id, {"path": prefix, "prefix_rewrite": "/"}, options, f"bare_{app.deployment_id}"
        ),
    ]


def route_configuration(apps: Iterable[AppRoute], options: IngressOptions) -> Message:
    virtual_hosts: list[dict[str, Any]] = []
    path_routes: list[dict[str, Any]] = []
    for app in sorted(apps, key=lambda a: a.deployment_id):
        virtual_hosts.append(_virtual_host(app, options))
        path_routes += _path_routes(app, options)
    virtual_hosts.append({"name": "default", "domains": ["*"], "routes": [*path_routes, _json_404()]})
    return _parse(ROUTE, {"name": ROUTE_CONFIG_NAME, "virtual_hosts": virtual_hosts})


def _grpc_log(log_name: str, options: IngressOptions) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": log_name,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": XDS_CLUSTER}},
                "buffer_flush_interval": _seconds(options.access_log_flush_seconds),
                "buffer_size_bytes": 16384,
            },
        },
    }


def listener(name: str, host: str, port: int, options: IngressOptions) -> Message:
    """The HTTP listener of one ingress, on its own address."""
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "strip_any_host_port": True,
        "normalize_path": True,
        "merge_slashes": True,
        "rds": {
            "route_config_name": ROUTE_CONFIG_NAME,
            "config_source": {"ads": {}, "resource_api_version": "V3"},
        },
        "access_log": [_grpc_log(ACCESS_LOG_NAME, options)],
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    "upstream_log": [_grpc_log(UPSTREAM_LOG_NAME, options)],
                },
            }
        ],
        "local_reply_config": {
            "body_format": {
                "json_format": {"status": "%RESPONSE_CODE%", "message": "%LOCAL_REPLY_BODY%"},
            }
        },
    }
    return _parse(
        LISTENER,
        {
            "name": name,
            "address": {"socket_address": {"address": host, "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                    ]
                }
            ],
        },
    )


def cluster(app: AppRoute, options: IngressOptions) -> Message:
    return _parse(
        CLUSTER,
        {
            "name": app.deployment_id,
            "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
            "connect_timeout": _seconds(options.connect_timeout_seconds),
            "lb_policy": "ROUND_ROBIN",
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
            "outlier_detection": {
                "consecutive_5xx": options.outlier_consecutive_5xx,
                "consecutive_gateway_failure": 2,
                "enforcing_consecutive_gateway_failure": 100,
                "consecutive_local_origin_failure": 2,
                "split_external_local_origin_errors": True,
                "enforcing_consecutive_local_origin_failure": 100,
                "interval": _seconds(options.outlier_interval_seconds),
                "base_ejection_time": _seconds(options.outlier_base_ejection_seconds),
                "max_ejection_percent": options.outlier_max_ejection_percent,
            },
        },
    )


def load_assignment(app: AppRoute) -> Message:
    endpoints = [
        {
            "endpoint": {"address": {"socket_address": {"address": e.host, "port_value": e.port}}},
            "load_balancing_weight": e.weight,
            "metadata": {
                "filter_metadata": {"a67": {"node_id": e.node_id, "replica_index": e.replica_index}}
            },
        }
        for e in sorted(app.endpoints, key=lambda e: (e.replica_index, e.host, e.port))
    ]
    return _parse(
        ENDPOINT,
        {"cluster_name": app.deployment_id, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []},
    )


def build_snapshot(
    apps: Iterable[AppRoute], options: IngressOptions, listeners: Mapping[str, tuple[str, int]] = {}
) -> Snapshot:
    """Every resource for ``apps``; ``listeners`` maps a listener name to its address."""
    ordered = sorted(apps, key=lambda a: a.deployment_id)
    return Snapshot(
        {
            CLUSTER: {a.deployment_id: cluster(a, options) for a in ordered},
            ENDPOINT: {a.deployment_id: load_assignment(a) for a in ordered},
            ROUTE: {ROUTE_CONFIG_NAME: route_configuration(ordered, options)},
            LISTENER: {name: listener(name, host, port, options) for name, (host, port) in listeners.items()},
        }
    )


# -- the incremental builder ---------------------------------------------------------------------

VIRTUAL_HOST = "type.googleapis.com/envoy.config.route.v3.VirtualHost"
ROUTE_ENTRY = "type.googleapis.com/envoy.config.route.v3.Route"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string or a message) on the wire: tag, length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _field_number(type_url: str, field_name: str) -> int:
    number: int = _message_class(type_url).DESCRIPTOR.fields_by_name[field_name].number
    return number


_TEMPLATE_APP = AppRoute("template", "template", "template", (Endpoint("127.0.0.1", 1, 1, "node", 1),))


class _Templates:
    """A deployment's messages without ``json_format.ParseDict`` per deployment.

    Parsing the JSON form (the functions above, which :func:`build_snapshot` uses) is most
    of what building a deployment's resources costs in Python; apart from its id, name,
    handle and endpoints, every deployment's cluster, routes and virtual host are the same.
    So one of each is parsed per builder, and each deployment's is a copy (upb's C copy)
    with those fields set — the same messages, so the same bytes (the builder's test
    compares them with :func:`build_snapshot`'s)."""

    def __init__(self, options: IngressOptions) -> None:
        self.options = options
        app = _TEMPLATE_APP
        self.cluster = cluster(app, options)
        self.path_routes = [_parse(ROUTE_ENTRY, r) for r in _path_routes(app, options)]
        self.virtual_host = _parse(VIRTUAL_HOST, _virtual_host(app, options))
        self.lb_endpoint = load_assignment(app).endpoints[0].lb_endpoints[0]  # type: ignore[attr-defined]
        if (len(self.path_routes), len(self.virtual_host.routes)) != (4, 2):  # type: ignore[attr-defined]
            raise AssertionError("the route templates do not have the shape _Templates expects")

    @staticmethod
    def _copy(template: Message) -> Any:
        message = type(template)()
        message.CopyFrom(template)
        return message

    def cluster_for(self, deployment_id: str) -> Message:
        message = self._copy(self.cluster)
        message.name = deployment_id
        return cast(Message, message)

    def path_routes_for(self, deployment_id: str) -> list[Message]:
        """The default virtual host's routes to one deployment (see :func:`_path_routes`)."""
        prefix = f"{PATH_PREFIX}{deployment_id}"
        routes = [self._copy(r) for r in self.path_routes]
        for route, name in zip(routes, ("path_", "path_", "bare_", "bare_"), strict=True):
            route.route.cluster = deployment_id
            base = f"{name}{deployment_id}"
            route.name = f"{base}_idempotent" if route.match.headers else base
        routes[0].match.prefix = routes[1].match.prefix = prefix + "/"
        routes[2].match.path = routes[3].match.path = prefix
        return routes

    def virtual_host_for(self, app: AppRoute) -> Message:
        """One deployment's virtual host (see :func:`_virtual_host`)."""
        host = self._copy(self.virtual_host)
        host.name = f"app_{app.deployment_id}"
        host.domains[0] = app_host(app.name, app.handle, self.options.apps_domain)
        for route in host.routes:
            route.route.cluster = app.deployment_id
            base = f"host_{app.deployment_id}"
            route.name = f"{base}_idempotent" if route.match.headers else base
        return cast(Message, host)

    def load_assignment_for(self, app: AppRoute) -> Message:
        """One deployment's endpoints (see :func:`load_assignment`)."""
        message: Any = _message_class(ENDPOINT)(cluster_name=app.deployment_id)
        if app.endpoints:
            locality = message.endpoints.add()
            for e in sorted(app.endpoints, key=lambda e: (e.replica_index, e.host, e.port)):
                lb = locality.lb_endpoints.add()
                lb.CopyFrom(self.lb_endpoint)
                socket = lb.endpoint.address.socket_address
                socket.address = e.host
                socket.port_value = e.port
                lb.load_balancing_weight.value = e.weight
                fields = lb.metadata.filter_metadata["a67"].fields
                fields["node_id"].string_value = e.node_id
                fields["replica_index"].number_value = e.replica_index
        return cast(Message, message)


@dataclass(frozen=True, slots=True)
class _Built:
    """One deployment's resources, serialized: reused as long as its :class:`AppRoute` is equal."""

    app: AppRoute
    cluster: Encoded
    load_assignment: Encoded
    virtual_host: bytes
    """Its virtual host, as a ``virtual_hosts`` field of the route configuration."""
    path_routes: bytes
    """Its path routes, as ``routes`` fields of the default virtual host."""


class SnapshotBuilder:
    """:func:`build_snapshot`, incremental: a rebuild costs in proportion to what changed.

    Each deployment's cluster, load assignment, virtual host and path routes are kept
    serialized, keyed by its :class:`AppRoute` (a frozen value) and this builder's options:
    an equal route reuses them, a changed one rebuilds only what depends on what changed.
    The route configuration (one resource holding every deployment's routes) is spliced
    from the kept pieces on the wire level, and only when a route piece changed. The
    result is byte for byte what :func:`build_snapshot` makes of the same routes (a test
    checks); listeners are not built here (the xDS server makes one per ingress).
    """

    def __init__(self, options: IngressOptions) -> None:
        self.options = options
        self._built: dict[str, _Built] = {}
        self._route: Encoded | None = None
        vh_routes = _field_number(VIRTUAL_HOST, "routes")
        self._vh_field = _field_number(ROUTE, "virtual_hosts")
        self._route_head = _field(_field_number(ROUTE, "name"), ROUTE_CONFIG_NAME.encode())
        self._default_head = _field(_field_number(VIRTUAL_HOST, "name"), b"default") + _field(
            _field_number(VIRTUAL_HOST, "domains"), b"*"
        )
        self._default_tail = _field(vh_routes, _serialize(_parse(ROUTE_ENTRY, _json_404())))
        self._path_field = vh_routes
        self._templates = _Templates(options)

    def _entry(self, app: AppRoute, old: _Built | None) -> _Built:
        t = self._templates
        if old is None:
            return _Built(
                app,
                encode(app.deployment_id, t.cluster_for(app.deployment_id)),
                encode(app.deployment_id, t.load_assignment_for(app)),
                self._virtual_host_bytes(app),
                b"".join(
                    _field(self._path_field, _serialize(r)) for r in t.path_routes_for(app.deployment_id)
                ),
            )
        # the cluster and the path routes depend on the deployment id (and the options) only
        was = old.app
        return _Built(
            app,
            old.cluster,
            old.load_assignment
            if was.endpoints == app.endpoints
            else encode(app.deployment_id, t.load_assignment_for(app)),
            old.virtual_host
            if (was.name, was.handle) == (app.name, app.handle)
            else self._virtual_host_bytes(app),
            old.path_routes,
        )

    def _virtual_host_bytes(self, app: AppRoute) -> bytes:
        return _field(self._vh_field, _serialize(self._templates.virtual_host_for(app)))

    def build(self, apps: Iterable[AppRoute]) -> Snapshot:
        """The snapshot of ``apps`` (clusters, endpoints, routes), reusing what did not change."""
        old = self._built
        built: dict[str, _Built] = {}
        routes_changed = False
        for app in sorted(apps, key=_deployment_id):
            entry = old.get(app.deployment_id)
            if entry is None or (entry.app is not app and entry.app != app):
                fresh = self._entry(app, entry)
                routes_changed = (
                    routes_changed or entry is None or fresh.virtual_host is not entry.virtual_host
                )
                entry = fresh
            built[app.deployment_id] = entry
        if len(built) != len(old) or built.keys() != old.keys():
            routes_changed = True
        self._built = built
        if self._route is None or routes_changed:
            self._route = self._route_configuration()
        return Snapshot(
            encoded={
                CLUSTER: {name: b.cluster for name, b in built.items()},
                ENDPOINT: {name: b.load_assignment for name, b in built.items()},
                ROUTE: {ROUTE_CONFIG_NAME: self._route},
            }
        )

    def _route_configuration(self) -> Encoded:
        entries = self._built.values()
        default = b"".join([self._default_head, *(b.path_routes for b in entries), self._default_tail])
        data = b"".join(
            [self._route_head, *(b.virtual_host for b in entries), _field(self._vh_field, default)]
        )
        return Encoded(ROUTE_CONFIG_NAME, data, _entry_digest(ROUTE_CONFIG_NAME, data))


def _deployment_id(app: AppRoute) -> str:
    return app.deployment_id


def _serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)
