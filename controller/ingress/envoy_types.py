"""Imports the Envoy API modules (from the ``xds-protos`` package) whose message types
the ingress builds, sends or receives, so that they are in protobuf's default pool
(``google.protobuf.Any`` packing and ``json_format`` look types up there)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_als_config_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

__all__ = [
    "accesslog_pb2",
    "ads_pb2_grpc",
    "als_pb2",
    "als_pb2_grpc",
    "cluster_pb2",
    "discovery_pb2",
    "endpoint_pb2",
    "grpc_als_config_pb2",
    "http_connection_manager_pb2",
    "listener_pb2",
    "previous_hosts_pb2",
    "route_pb2",
    "router_pb2",
]
