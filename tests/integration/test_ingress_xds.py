"""The xDS server against a real Envoy, without a controller: weights and NACKs.

Three small HTTP servers stand for replicas; the test publishes snapshots built by the
pure builder and watches what Envoy does with them.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from controller.ingress.snapshot import AppRoute, Endpoint, IngressOptions, build_snapshot
from controller.ingress.xds import XdsServer, add_to_server
from tests.integration.ingress_support import running_ingress
from tests.integration.test_deployments_real import _until


class _Named(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[list[int]]:
    servers = []
    for name in ("a", "b", "c"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [s.server_address[1] for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
async def xds() -> AsyncIterator[tuple[XdsServer, str]]:
    server = grpc.aio.server()
    xds = XdsServer(IngressOptions())
    add_to_server(server, xds)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield xds, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _app(ports: list[int], weights: list[int]) -> AppRoute:
    endpoints = tuple(
        Endpoint("127.0.0.1", port, weight, f"node-{i}", i)
        for i, (port, weight) in enumerate(zip(ports, weights, strict=True))
    )
    return AppRoute("dep-1", "web", "ada-12345678", endpoints)


async def test_the_split_follows_the_weights(
    tmp_path: Path, backends: list[int], xds: tuple[XdsServer, str]
) -> None:
    server, address = xds
    server.publish(build_snapshot([_app(backends, [10, 30, 60])], IngressOptions()))
    async with running_ingress(address, tmp_path) as ingress:
        await _until(lambda: asyncio.to_thread(lambda: len(ingress.endpoints("dep-1")) == 3), "3 endpoints")

        def spread() -> collections.Counter[str]:
            seen: collections.Counter[str] = collections.Counter()
            for _ in range(300):
                reply = ingress.get("/", host="web.ada-12345678.apps.localhost")
                assert reply.status == 200, reply
                seen[reply.body.decode()] += 1
            return seen

        seen = await asyncio.to_thread(spread)
        # Weighted round robin: 30 / 90 / 180 of 300, each within 15 (5 points).
        for name, expected in (("a", 30), ("b", 90), ("c", 180)):
            assert abs(seen[name] - expected) <= 15, seen

        # New weights are pushed, not restarted into: the split follows.
        server.publish(build_snapshot([_app(backends, [60, 30, 10])], IngressOptions()))
        await _until(
            lambda: asyncio.to_thread(
                lambda: (
                    sorted(ingress.endpoints("dep-1").values()) == [10, 30, 60]
                    and ingress.endpoints("dep-1")[f"127.0.0.1:{backends[0]}"] == 60
                )
            ),
            "the new weights in Envoy",
        )
        seen = await asyncio.to_thread(spread)
        for name, expected in (("a", 180), ("b", 90), ("c", 30)):
            assert abs(seen[name] - expected) <= 15, seen


async def test_a_nack_is_recorded_and_not_pushed_again(
    tmp_path: Path, backends: list[int], xds: tuple[XdsServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, address = xds
    good = build_snapshot([_app(backends, [1, 1, 1])], IngressOptions())
    server.publish(good)
    async with running_ingress(address, tmp_path) as ingress:
        await _until(lambda: asyncio.to_thread(lambda: len(ingress.endpoints("dep-1")) == 3), "3 endpoints")
        (client,) = server.clients.values()
        accepted = client.acked["type.googleapis.com/envoy.config.cluster.v3.Cluster"]
        # A cluster Envoy must refuse: a zero connect timeout.
        server.publish(build_snapshot([_app(backends, [1, 1, 1])], IngressOptions(connect_timeout_seconds=0)))
        await _until(lambda: asyncio.to_thread(lambda: bool(client.nacks)), "Envoy's NACK")
        nack = client.nacks[0]
        assert nack.type_url.endswith("Cluster"), nack
        assert "connect_timeout" in nack.message, nack
        assert any(
            "rejected Cluster" in r.getMessage() and "connect_timeout" in r.getMessage()
            for r in caplog.records
        )
        sent = server.responses_sent
        # Envoy keeps serving the last good version, and nothing is sent again meanwhile.
        for _ in range(5):
            assert (await ingress.aget("/", host="web.ada-12345678.apps.localhost")).status == 200
            await asyncio.sleep(0.1)
        assert server.responses_sent == sent
        assert len(client.nacks) == 1
        assert client.acked["type.googleapis.com/envoy.config.cluster.v3.Cluster"] == accepted
        # Good content again is pushed and accepted.
        server.publish(build_snapshot([_app(backends, [2, 1, 1])], IngressOptions()))
        await _until(
            lambda: asyncio.to_thread(lambda: 2 in ingress.endpoints("dep-1").values()),
            "the next good version",
        )
        await _until(
            lambda: asyncio.to_thread(
                lambda: (
                    client.acked["type.googleapis.com/envoy.config.cluster.v3.Cluster"] == str(server.version)
                )
            ),
            "the cluster ACK",
        )
