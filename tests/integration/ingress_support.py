"""Real ingress Envoys for tests: start one against a controller's xDS port, read its admin."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.ingress.bootstrap import IngressProcess, IngressSettings, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    path: str,
    *,
    host: str = "",
    method: str = "GET",
    timeout: float = 5.0,
    body: bytes | None = None,
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Host": host} if host else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


class Ingress:
    """A running ingress Envoy with its admin interface."""

    def __init__(self, process: IngressProcess, port: int, admin_port: int) -> None:
        self.process = process
        self.port = port
        self.admin_port = admin_port

    def get(self, path: str, host: str = "", method: str = "GET", timeout: float = 5.0) -> Reply:
        return http_request(self.port, path, host=host, method=method, timeout=timeout)

    async def aget(self, path: str, host: str = "", method: str = "GET") -> Reply:
        return await asyncio.to_thread(self.get, path, host, method)

    def admin(self, path: str) -> str:
        return http_request(self.admin_port, path).body.decode()

    def endpoints(self, cluster: str) -> dict[str, int]:
        """``host:port`` → weight of the cluster's endpoints, from /config_dump (EDS as received)."""
        dump = json.loads(self.admin("/config_dump?include_eds"))
        found: dict[str, int] = {}
        for config in dump.get("configs", []):
            for entry in config.get("dynamic_endpoint_configs", []):
                assignment = entry.get("endpoint_config", {})
                if assignment.get("cluster_name") != cluster:
                    continue
                for group in assignment.get("endpoints", []):
                    for lb in group.get("lb_endpoints", []):
                        socket_address = lb["endpoint"]["address"]["socket_address"]
                        key = f"{socket_address['address']}:{socket_address['port_value']}"
                        found[key] = int(lb.get("load_balancing_weight", 1))
        return found

    def clusters(self) -> set[str]:
        dump = json.loads(self.admin("/config_dump?resource=dynamic_active_clusters"))
        return {c["cluster"]["name"] for c in dump.get("configs", [])}

    def versions(self) -> dict[str, str]:
        """The version Envoy accepted per resource kind, from /config_dump."""
        dump = json.loads(self.admin("/config_dump"))
        versions: dict[str, str] = {}
        for config in dump.get("configs", []):
            kind = config.get("@type", "").rsplit(".", 1)[-1]
            info = config.get("version_info") or ""
            if not info:
                dynamic = config.get("dynamic_route_configs") or config.get("dynamic_listeners") or []
                if dynamic:
                    first = dynamic[0]
                    info = first.get("version_info") or first.get("active_state", {}).get("version_info", "")
            versions[kind] = info
        return versions


@contextlib.asynccontextmanager
async def running_ingress(xds_address: str, workdir: Path, name: str = "ingress") -> AsyncIterator[Ingress]:
    """An ingress Envoy against ``xds_address``, ready (its listener came over xDS). The
    controller may run in this event loop, so readiness is waited for in a thread."""
    port, admin_port = free_port(), free_port()
    settings = IngressSettings(
        listen_address=f"127.0.0.1:{port}",
        xds_address=xds_address,
        admin_address=f"127.0.0.1:{admin_port}",
        node_id=f"test-{name}-{port}",
        concurrency=2,
        log_level="info",
    )
    config = write_config(settings, workdir / f"{name}.yaml")
    process = IngressProcess(config, settings, log_path=workdir / f"{name}.log", own_session=False)
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready, 30.0)
        yield Ingress(process, port, admin_port)
    finally:
        await asyncio.to_thread(process.stop)
