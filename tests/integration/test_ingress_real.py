"""The ingress end to end: a real controller, real ingress Envoys, real agents running real apps.

1. Three replicas answer on their host route and their path route; the split over 300
   requests follows the endpoint weights Envoy holds; GetDeployment shows the URLs and
   the traffic; a second ingress started late gets the whole current state.
2. ``kill -9`` of a node under a steady GET loop: no request fails, and its endpoint
   leaves Envoy's configuration within the failure window.
3. Scale up and down, then delete: endpoints follow; the routes go (JSON 404).
4. App traffic makes node health: a replica answering 500 makes its node degraded;
   bad SQL from the user does not.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time
from pathlib import Path

import grpc
from automator67.v1 import common_pb2, deployment_pb2

from tests.integration.ingress_support import running_ingress
from tests.integration.test_deployments import manifest, source_tar_gz
from tests.integration.test_deployments_real import Client, _until, processes
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

HEARTBEAT = 0.3

APP = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INDEX = os.environ["A67_REPLICA_INDEX"]
FAIL_INDEX = os.environ.get("FAIL_INDEX", "")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/health":
            code, body = 200, b"ok"
        elif INDEX == FAIL_INDEX:
            code, body = 500, b"broken"
        else:
            code, body = 200, f"replica {INDEX} path {self.path}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def app_manifest(name: str, replicas: int, fail_index: str = "") -> deployment_pb2.DeploymentManifest:
    return manifest(
        name=name,
        replicas=replicas,
        env={"FAIL_INDEX": fail_index} if fail_index else {},
        resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
        health_check=deployment_pb2.HealthCheck(
            path="/health", interval_seconds=2, timeout_seconds=1, retries=3
        ),
    )


async def _deploy(client: Client, name: str, replicas: int, fail_index: str = "") -> str:
    created = await client.deployments.CreateDeployment(
        deployment_pb2.CreateDeploymentRequest(
            manifest=app_manifest(name, replicas, fail_index), source_tar_gz=source_tar_gz({"app.py": APP})
        ),
        metadata=bearer(client.token),
    )
    await client.wait(
        created.deployment_id,
        lambda d: d.current_replicas == replicas and all(a.status == "running" for a in d.node_assignments),
        f"{replicas} running replicas",
        within=40.0,
    )
    return str(created.deployment_id)


def _ports(count: int) -> list[tuple[int, int]]:
    base = 30000 + (os.getpid() % 50) * 100
    return [(base + i * 20, base + i * 20 + 19) for i in range(count)]


async def test_routes_weights_urls_and_a_late_ingress(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            xds = controller.ingress.address
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=3)
            for region, ports in zip(["eu", "us", "ap"], _ports(3), strict=True):
                procs.agent(controller.address, enrollment, region, ports)
            await client.wait_ready(3)
            async with running_ingress(xds, tmp_path, "first") as ingress:
                deployment_id = await _deploy(client, "hello", 3)
                d = await client.get(deployment_id)
                replica_addresses = {a.endpoint.removeprefix("http://") for a in d.node_assignments}

                # GetDeployment shows both URL forms.
                host_url, path_url = d.urls
                assert host_url.startswith("http://hello.ada-")
                assert ".apps.localhost" in host_url
                assert path_url == f"{settings.ingress_url}/apps/{deployment_id}/"
                host = host_url.removeprefix("http://").split("/")[0].split(":")[0]

                await _until(
                    lambda: asyncio.to_thread(
                        lambda: set(ingress.endpoints(deployment_id)) == replica_addresses
                    ),
                    "the three replicas in Envoy's endpoints",
                )
                # The host form and the path form (prefix rewritten to /).
                reply = await ingress.aget("/some/page?x=1", host=host)
                assert reply.status == 200, reply
                assert reply.body.endswith(b"path /some/page?x=1"), reply
                reply = await ingress.aget(f"/apps/{deployment_id}/some/page")
                assert reply.status == 200, reply
                assert reply.body.endswith(b"path /some/page"), reply
                reply = await ingress.aget(f"/apps/{deployment_id}")
                assert reply.status == 200, reply
                assert reply.body.endswith(b"path /"), reply
                # Unknown host or path: a JSON 404.
                for path, h in (("/", "nope.ada.apps.localhost"), ("/apps/unknown/", "")):
                    reply = await ingress.aget(path, host=h)
                    assert reply.status == 404
                    assert reply.headers["content-type"] == "application/json"
                    assert reply.json["message"] == "No app is served at this address"

                # 300 requests split by the weights Envoy holds (weighted round robin:
                # each replica's share within 5 points of its weight's share).
                weights = ingress.endpoints(deployment_id)
                by_index = {
                    a.endpoint.removeprefix("http://"): str(a.replica_index) for a in d.node_assignments
                }

                def spread() -> collections.Counter[str]:
                    seen: collections.Counter[str] = collections.Counter()
                    for _ in range(300):
                        r = ingress.get("/", host=host)
                        assert r.status == 200, r
                        seen[r.body.split()[1].decode()] += 1
                    return seen

                seen = await asyncio.to_thread(spread)
                total_weight = sum(weights.values())
                for address, weight in weights.items():
                    expected = 300 * weight / total_weight
                    assert abs(seen[by_index[address]] - expected) <= 15, (seen, weights)

                # The traffic reached the controller through the access logs.
                async def counted() -> bool:
                    t = (await client.get(deployment_id)).traffic
                    return t.requests >= 303 and t.latency_p99_ms > 0 and t.requests_per_second > 0

                await _until(counted, "the requests in GetDeployment's traffic")
                traffic = (await client.get(deployment_id)).traffic
                assert traffic.error_rate == 0.0
                assert traffic.window_seconds == 60.0
                assert 0 < traffic.latency_p50_ms <= traffic.latency_p99_ms

                # A second ingress, connecting late, gets the full current state.
                async with running_ingress(xds, tmp_path, "second") as late:
                    await _until(
                        lambda: asyncio.to_thread(
                            lambda: set(late.endpoints(deployment_id)) == replica_addresses
                        ),
                        "the late ingress to have every endpoint",
                    )
                    reply = await late.aget("/", host=host)
                    assert reply.status == 200
                    assert late.versions() == ingress.versions()
                clients = list(controller.ingress.xds.clients.values())
                assert len(clients) == 1
                assert not clients[0].nacks


class _Loop:
    """GET requests back to back on ``threads`` threads, counting every outcome."""

    def __init__(self, ingress: object, path: str, host: str, threads: int = 4) -> None:
        self._ingress = ingress
        self._path, self._host = path, host
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self._ingress.get(self._path, host=self._host)  # type: ignore[attr-defined]
                outcome = "" if reply.status == 200 else f"{reply.status} {reply.body[:100]!r}"
            except OSError as exc:
                outcome = repr(exc)
            with self._lock:
                if outcome:
                    self.failures.append(outcome)
                else:
                    self.ok += 1

    def __enter__(self) -> _Loop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


async def test_kill_9_of_a_node_under_load_fails_no_get(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=3)
            agents = {
                region: procs.agent(controller.address, enrollment, region, ports)
                for region, ports in zip(["eu", "us", "ap"], _ports(3), strict=True)
            }
            nodes = {n.id: n.region for n in await client.wait_ready(3)}
            async with running_ingress(controller.ingress.address, tmp_path) as ingress:
                deployment_id = await _deploy(client, "steady", 3)
                d = await client.get(deployment_id)
                everything = {a.endpoint.removeprefix("http://") for a in d.node_assignments}
                await _until(
                    lambda: asyncio.to_thread(lambda: set(ingress.endpoints(deployment_id)) == everything),
                    "every replica in Envoy",
                )
                victim = next(a for a in d.node_assignments if a.replica_index == 0)
                dead = victim.endpoint.removeprefix("http://")
                window = controller.fleet.health_config.failed_after_seconds
                with _Loop(ingress, f"/apps/{deployment_id}/", "") as loop:
                    await _until(
                        lambda: asyncio.to_thread(lambda: loop.ok >= 50), "50 requests before the kill"
                    )
                    agents[nodes[victim.node_id]].send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                    await _until(
                        lambda: asyncio.to_thread(lambda: dead not in ingress.endpoints(deployment_id)),
                        "the dead node's endpoint to leave Envoy",
                        within=window,
                    )
                    removed_after = time.monotonic() - killed_at
                    before = loop.ok
                    await _until(
                        lambda: asyncio.to_thread(lambda: loop.ok >= before + 100), "100 more requests"
                    )
                assert loop.failures == [], loop.failures[:5]
                assert removed_after <= window
                # The replica is placed again elsewhere, and its new endpoint joins.
                await client.wait(
                    deployment_id,
                    lambda d: any(
                        a.replica_index == 0 and a.node_id != victim.node_id and a.status == "running"
                        for a in d.node_assignments
                    ),
                    "replica 0 running on another node",
                )
                d = await client.get(deployment_id)
                again = {
                    a.endpoint.removeprefix("http://") for a in d.node_assignments if a.status == "running"
                }
                await _until(
                    lambda: asyncio.to_thread(lambda: set(ingress.endpoints(deployment_id)) == again),
                    "the re-placed replica in Envoy",
                )


async def test_scale_drain_and_delete(tmp_path: Path) -> None:
    settings = controller_settings(
        # The drain window must outlast seeing the endpoint leave Envoy (a store read and
        # config_dump polls): at 1.5 s a loaded machine saw the replica already stopped.
        tmp_path / "controller",
        heartbeat_interval_seconds=HEARTBEAT,
        ingress_drain_seconds=8.0,
    )
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=3)
            for region, ports in zip(["eu", "us", "ap"], _ports(3), strict=True):
                procs.agent(controller.address, enrollment, region, ports)
            await client.wait_ready(3)
            async with running_ingress(controller.ingress.address, tmp_path) as ingress:
                deployment_id = await _deploy(client, "scaled", 1)

                async def endpoints_are(count: int) -> set[str]:
                    d = await client.get(deployment_id)
                    want = {
                        a.endpoint.removeprefix("http://")
                        for a in d.node_assignments
                        if a.status == "running"
                    }
                    await _until(
                        lambda: asyncio.to_thread(
                            lambda: len(want) == count and set(ingress.endpoints(deployment_id)) == want
                        ),
                        f"{count} endpoints in Envoy",
                    )
                    return want

                await endpoints_are(1)
                await client.deployments.ScaleDeployment(
                    deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=3),
                    metadata=bearer(client.token),
                )
                await client.wait(deployment_id, lambda d: d.current_replicas == 3, "3 running replicas")
                three = await endpoints_are(3)

                # Scale down: the endpoints leave Envoy at once; the replicas stop only
                # after the drain time (they still answer directly meanwhile).
                d = await client.get(deployment_id)
                leaving = {
                    a.endpoint.removeprefix("http://") for a in d.node_assignments if a.replica_index >= 1
                }
                scaled_down = time.monotonic()
                await client.deployments.ScaleDeployment(
                    deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=1),
                    metadata=bearer(client.token),
                )
                remaining = await endpoints_are(1)
                assert remaining == three - leaving
                port = int(next(iter(leaving)).rsplit(":", 1)[1])
                from tests.integration.ingress_support import http_request

                assert (await asyncio.to_thread(http_request, port, "/")).status == 200  # draining, still up

                async def stopped() -> bool:
                    try:
                        await asyncio.to_thread(http_request, port, "/", timeout=1.0)
                    except OSError:
                        return True
                    return False

                await _until(stopped, "the scaled-down replica to stop after draining")
                # Not before the drain time: heartbeats reporting the draining replica (every
                # 0.3 s) must not have the fence stop it early as one no longer assigned.
                assert time.monotonic() - scaled_down >= settings.ingress_drain_seconds

                # Delete: the routes go, both forms answer a JSON 404, the cluster leaves Envoy.
                host = (
                    (await client.get(deployment_id))
                    .urls[0]
                    .removeprefix("http://")
                    .split(":")[0]
                    .rstrip("/")
                )
                assert (await ingress.aget("/", host=host)).status == 200
                await client.deployments.DeleteDeployment(
                    deployment_pb2.DeleteDeploymentRequest(deployment_id=deployment_id),
                    metadata=bearer(client.token),
                )
                await _until(
                    lambda: asyncio.to_thread(lambda: deployment_id not in ingress.clusters()),
                    "the cluster to leave Envoy",
                )
                for reply in (
                    await ingress.aget("/", host=host),
                    await ingress.aget(f"/apps/{deployment_id}/"),
                ):
                    assert reply.status == 404
                    assert reply.json["message"] == "No app is served at this address"


async def test_app_errors_degrade_their_node_but_bad_sql_does_not(tmp_path: Path) -> None:
    from automator67.v1 import query_pb2, query_pb2_grpc

    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=2)
            for region, ports in zip(["eu", "us"], _ports(2), strict=True):
                procs.agent(controller.address, enrollment, region, ports)
            await client.wait_ready(2)
            queries = query_pb2_grpc.QueryServiceStub(channel)

            # Bad SQL, many times: the user's mistake, not the nodes'. It reaches the shards
            # (the agents) and fails there.
            ids = [n.id for n in await client.list_nodes()]
            created = await queries.CreateDatabase(
                query_pb2.CreateDatabaseRequest(
                    name="shop",
                    dialect="sqlite",
                    sharding=query_pb2.Sharding(
                        strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=2, sharding_key="customer_id"
                    ),
                    shards=[
                        query_pb2.ShardPlacement(shard_index=0, primary_node_id=ids[0]),
                        query_pb2.ShardPlacement(shard_index=1, primary_node_id=ids[1]),
                    ],
                ),
                metadata=bearer(client.token),
            )
            db_id = created.database.id
            await queries.ApplySchema(
                query_pb2.ApplySchemaRequest(
                    db_id=db_id, ddl="CREATE TABLE orders (id INTEGER NOT NULL, customer_id INTEGER NOT NULL)"
                ),
                metadata=bearer(client.token),
            )
            failed = 0
            for _ in range(40):
                try:
                    await queries.ExecuteQuery(
                        query_pb2.ExecuteQueryRequest(db_id=db_id, query="SELECT no_such_column FROM orders"),
                        metadata=bearer(client.token),
                    )
                except grpc.aio.AioRpcError:
                    failed += 1
            assert failed == 40
            await asyncio.sleep(0)  # (no wait needed: the state is checked over several heartbeats below)
            for _ in range(10):
                statuses = {n.status for n in await client.list_nodes()}
                assert common_pb2.NODE_STATUS_DEGRADED not in statuses, statuses
                await asyncio.sleep(HEARTBEAT)

            # A replica answering 500: its node becomes degraded; the other one does not.
            async with running_ingress(controller.ingress.address, tmp_path) as ingress:
                deployment_id = await _deploy(client, "flaky", 2, fail_index="0")
                d = await client.get(deployment_id)
                bad_node = next(a.node_id for a in d.node_assignments if a.replica_index == 0)
                good_node = next(a.node_id for a in d.node_assignments if a.replica_index == 1)
                await _until(
                    lambda: asyncio.to_thread(lambda: len(ingress.endpoints(deployment_id)) == 2),
                    "2 endpoints",
                )

                async def degraded() -> bool:
                    for _ in range(20):
                        await ingress.aget(f"/apps/{deployment_id}/")
                    nodes = {n.id: n for n in await client.list_nodes()}
                    return bool(nodes[bad_node].status == common_pb2.NODE_STATUS_DEGRADED)

                await _until(degraded, "the node of the failing replica to be degraded", within=30.0)
                nodes = {n.id: n for n in await client.list_nodes()}
                assert nodes[good_node].status in (common_pb2.NODE_STATUS_READY, common_pb2.NODE_STATUS_BUSY)
                assert controller.ingress.traffic.node(bad_node).error_rate_percent > 5.0
                assert controller.ingress.traffic.node(good_node).errors == 0


async def test_the_docs_examples_run(tmp_path: Path) -> None:
    """docs/ingress.md's curl block, run by bash against a real deployment."""
    import re
    import subprocess

    text = (Path(__file__).parents[2] / "docs" / "ingress.md").read_text()
    block = re.search(r"```bash\n(INGRESS=.*?)```", text, re.S)
    assert block is not None, "the curl example block is missing from docs/ingress.md"
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            client = Client(channel, await _user(channel))
            procs.agent(controller.address, await client.enrollment(uses=1), "eu", _ports(1)[0])
            await client.wait_ready(1)
            async with running_ingress(controller.ingress.address, tmp_path) as ingress:
                deployment_id = await _deploy(client, "hello", 1)
                d = await client.get(deployment_id)
                handle = d.urls[0].removeprefix("http://hello.").split(".apps.localhost")[0]
                await _until(
                    lambda: asyncio.to_thread(lambda: len(ingress.endpoints(deployment_id)) == 1),
                    "1 endpoint",
                )
                script = block.group(1).replace(
                    "INGRESS=http://127.0.0.1:8081", f"INGRESS=http://127.0.0.1:{ingress.port}"
                )
                result = await asyncio.to_thread(
                    subprocess.run,
                    ["bash", "-euo", "pipefail", "-c", script],
                    env={**os.environ, "HANDLE": handle, "ID": deployment_id},
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert result.returncode == 0, result.stderr
                lines = result.stdout.splitlines()
                assert lines[0].startswith("replica 0 path /")
                assert lines[1] == "replica 0 path /"
                assert lines[2] == "404"
                assert lines[3] == '{"message":"No app is served at this address","status":404}'


class _DrainWatch:
    """Polls, on a thread, whether each ``endpoint`` is still in Envoy's cluster and still
    answers directly; records a violation if one stops answering while Envoy still routes
    to it (its process stopped before it was drained)."""

    def __init__(self, ingress: object, cluster: str, endpoints: set[str]) -> None:
        self._ingress, self._cluster = ingress, cluster
        self.pending = set(endpoints)  # not yet seen both out of Envoy and stopped
        self.left: set[str] = set()
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from tests.integration.ingress_support import http_request

        while not self._stop.is_set() and self.pending:
            for endpoint in sorted(self.pending):
                port = int(endpoint.rsplit(":", 1)[1])
                try:
                    http_request(port, "/health", timeout=1.0)
                    answering = True
                except OSError:
                    answering = False
                # read Envoy after the probe: a refused probe with the endpoint still routed
                # means the process stopped first
                routed = endpoint in self._ingress.endpoints(self._cluster)  # type: ignore[attr-defined]
                if not routed:
                    self.left.add(endpoint)
                if not answering:
                    if routed:
                        self.violations.append(f"{endpoint} stopped while Envoy still routed to it")
                    self.pending.discard(endpoint)

    def __enter__(self) -> _DrainWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_rolling_update_under_load_fails_no_request(tmp_path: Path) -> None:
    settings = controller_settings(
        tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT, ingress_drain_seconds=3.0
    )
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=3)
            for region, ports in zip(["eu", "us", "ap"], _ports(3), strict=True):
                procs.agent(controller.address, enrollment, region, ports)
            await client.wait_ready(3)
            async with running_ingress(controller.ingress.address, tmp_path) as ingress:
                deployment_id = await _deploy(client, "rolling", 2)
                d = await client.get(deployment_id)
                old = {a.endpoint.removeprefix("http://") for a in d.node_assignments}
                await _until(
                    lambda: asyncio.to_thread(lambda: set(ingress.endpoints(deployment_id)) == old),
                    "both v1 replicas in Envoy",
                )
                v2 = APP.replace('f"replica {INDEX}', 'f"v2 replica {INDEX}')
                assert v2 != APP
                with (
                    _Loop(ingress, f"/apps/{deployment_id}/", "") as loop,
                    _DrainWatch(ingress, deployment_id, old) as watch,
                ):
                    await _until(lambda: asyncio.to_thread(lambda: loop.ok >= 50), "50 requests on v1")
                    await client.deployments.UpdateDeployment(
                        deployment_pb2.UpdateDeploymentRequest(
                            deployment_id=deployment_id,
                            manifest=app_manifest("rolling", 2),
                            source_tar_gz=source_tar_gz({"app.py": v2}),
                        ),
                        metadata=bearer(client.token),
                    )
                    d = await client.wait(
                        deployment_id,
                        lambda d: (
                            d.version == 2
                            and d.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING
                            and len(d.node_assignments) == 2
                            and all(a.status == "running" for a in d.node_assignments)
                        ),
                        "version 2 running on both replicas",
                        within=60.0,
                    )
                    new = {a.endpoint.removeprefix("http://") for a in d.node_assignments}
                    assert not new & old
                    await _until(
                        lambda: asyncio.to_thread(lambda: set(ingress.endpoints(deployment_id)) == new),
                        "Envoy routing to the v2 replicas only",
                    )
                    await _until(
                        lambda: asyncio.to_thread(lambda: not watch.pending),
                        "the v1 replicas to stop",
                        within=30,
                    )
                    before = loop.ok
                    await _until(
                        lambda: asyncio.to_thread(lambda: loop.ok >= before + 50), "50 requests on v2"
                    )
                assert loop.failures == [], loop.failures[:5]
                assert watch.violations == []
                assert watch.left == old  # each left Envoy (and only then stopped)
                reply = await ingress.aget(f"/apps/{deployment_id}/")
                assert reply.body.startswith(b"v2 replica")


async def test_the_ingress_keeps_serving_while_the_controller_restarts_then_resyncs(tmp_path: Path) -> None:
    from tests.integration.ingress_support import free_port

    ports = {name: f"127.0.0.1:{free_port()}" for name in ("api", "nodes", "xds")}
    settings = controller_settings(
        tmp_path / "controller",
        heartbeat_interval_seconds=HEARTBEAT,
        listen_address=ports["api"],
        node_listen_address=ports["nodes"],
        xds_listen_address=ports["xds"],
    )
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as first,
            grpc.aio.insecure_channel(ports["api"]) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=2)
            for region, port_range in zip(["eu", "us"], _ports(2), strict=True):
                procs.agent(ports["api"], enrollment, region, port_range)
            await client.wait_ready(2)
            deployment_id = await _deploy(client, "survivor", 1)
            async with running_ingress(ports["xds"], tmp_path) as ingress:
                await _until(
                    lambda: asyncio.to_thread(lambda: len(ingress.endpoints(deployment_id)) == 1),
                    "the deployment's endpoint in Envoy",
                )
                # The controller stops: Envoy keeps its last configuration and keeps serving.
                await first.stop(grace=0.5)
                with _Loop(ingress, f"/apps/{deployment_id}/", "") as loop:
                    await _until(
                        lambda: asyncio.to_thread(lambda: loop.ok >= 50), "50 requests, controller down"
                    )
                assert loop.failures == [], loop.failures[:5]
                # It comes back on the same addresses; Envoy reconnects and follows what changes.
                async with (
                    running_controller(settings) as again,
                    grpc.aio.insecure_channel(ports["api"]) as channel2,
                ):
                    client = Client(channel2, client.token)
                    # both agents back on their streams (the listing may still show the state
                    # stored before the restart)
                    await _until(
                        lambda: asyncio.to_thread(lambda: len(again.fleet.streams) == 2), "agents back"
                    )
                    await client.wait_ready(2)
                    await client.deployments.ScaleDeployment(
                        deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=2),
                        metadata=bearer(client.token),
                    )
                    d = await client.wait(
                        deployment_id,
                        lambda d: (
                            d.current_replicas == 2 and all(a.status == "running" for a in d.node_assignments)
                        ),
                        "2 running replicas after the restart",
                        within=40.0,
                    )
                    want = {a.endpoint.removeprefix("http://") for a in d.node_assignments}
                    await _until(
                        lambda: asyncio.to_thread(lambda: set(ingress.endpoints(deployment_id)) == want),
                        "Envoy resynchronised with the restarted controller",
                    )
                    assert (await ingress.aget(f"/apps/{deployment_id}/")).status == 200
