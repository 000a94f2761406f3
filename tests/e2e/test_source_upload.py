"""Source uploads through the real gateway: the raw tar.gz body (google.api.HttpBody, no JSON,
no base64) streams to the controller, which answers its SHA-256; the upload route has its own
body limit (per-route buffer config), and past it the gateway answers 413 with nothing stored."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Reply, Rest, RunningController, RunningGateway, start_gateway
from tests.support import PASSWORD

UPLOAD_LIMIT = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def upload_gateway(
    controller: RunningController, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """The e2e gateway (64 KiB body limit for API calls), with a 32 MiB upload limit."""
    yield from start_gateway(
        controller.address, tmp_path_factory.mktemp("upload"), max_upload_body_size=UPLOAD_LIMIT
    )


@pytest.fixture(scope="module")
def token(upload_gateway: RunningGateway) -> str:
    rest: Rest = upload_gateway.rest
    email = f"up-{uuid.uuid4().hex[:8]}@example.com"
    assert rest.post("/api/v1/auth/register", {"email": email, "password_hash": PASSWORD}).status == 201
    reply = rest.post("/api/v1/auth/login", {"email": email, "password_hash": PASSWORD})
    assert reply.status == 200, reply.body
    return str(reply.json["access_token"])


def send_raw(host: str, port: int, body: bytes, token: str, chunk_size: int | None) -> Reply:
    """POST ``body`` raw to /api/v1/sources over HTTP/1.1 (content-length, or chunked), sent
    from a thread while the answer is read (the gateway may answer 413 before reading it all)."""
    sock = socket.create_connection((host, port), timeout=60)
    framing = "transfer-encoding: chunked" if chunk_size else f"content-length: {len(body)}"
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /api/v1/sources HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/gzip\r\n"
        f"{auth}connection: close\r\n{framing}\r\n\r\n"
    )

    def pump() -> None:
        with contextlib.suppress(OSError):
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
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=60)
        sock.close()


def upload(gateway: RunningGateway, token: str, body: bytes, chunk_size: int | None = None) -> Reply:
    host, port = gateway.settings.listen
    return send_raw(host, port, body, token, chunk_size)


def data_dir(controller: RunningController) -> Path:
    argv = list(controller.process.argv)
    return Path(argv[argv.index("--data-dir") + 1])


def stored_sources(controller: RunningController) -> list[Path]:
    root = data_dir(controller) / "packages"
    return sorted(p for p in (root / "sources").rglob("*") if p.is_file()) + sorted(
        p for p in (root / "tmp").glob("*") if p.is_file()
    )


@pytest.mark.parametrize("chunk_size", [None, 256 * 1024])
def test_a_raw_body_bigger_than_the_api_limit_uploads_and_returns_its_digest(
    upload_gateway: RunningGateway, token: str, controller: RunningController, chunk_size: int | None
) -> None:
    # 20 MiB: over the 64 KiB API body limit, and over the controller's 17 MiB message limit, so
    # it only passes because the transcoder streams the body as many HttpBody messages.
    body = os.urandom(20 * 1024 * 1024 + 17)
    reply = upload(upload_gateway, token, body, chunk_size)
    assert reply.status == 201, (reply.status, reply.body[:300])
    assert reply.json == {"sha256": hashlib.sha256(body).hexdigest(), "size": str(len(body))}
    kept = [p for p in stored_sources(controller) if p.name == hashlib.sha256(body).hexdigest()]
    assert len(kept) == 1
    assert kept[0].read_bytes() == body


@pytest.mark.parametrize("chunk_size", [None, 256 * 1024])
def test_an_upload_over_the_route_limit_gets_413_and_nothing_is_stored(
    upload_gateway: RunningGateway, token: str, controller: RunningController, chunk_size: int | None
) -> None:
    before = stored_sources(controller)
    reply = upload(upload_gateway, token, os.urandom(UPLOAD_LIMIT + 1), chunk_size)
    assert reply.status == 413, (reply.status, reply.body[:300])
    assert reply.json == {
        "code": 8,
        "message": f"The source is larger than the gateway's upload limit of {UPLOAD_LIMIT} bytes; "
        "nothing was stored",
    }
    assert stored_sources(controller) == before


def test_an_upload_needs_a_token(upload_gateway: RunningGateway) -> None:
    reply = upload(upload_gateway, "", b"\x1f\x8b" + b"x" * 100)
    assert reply.status == 401, reply.body
