"""The controller process: health, reflection, embedded defaults and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controller.server import SERVICE_NAMES, Controller
from tests.selfsigned import self_signed
from tests.support import PASSWORD


async def test_every_service_reports_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names: set[str] = set()
    async for reply in replies:
        names |= {s.name for s in reply.list_services_response.service}
    assert set(SERVICE_NAMES) <= names
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert len(SERVICE_NAMES) == 6


async def test_stop_turns_health_not_serving(controller: Controller, channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(controller.stop(grace=1.0))
    second = await watch.read()
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_serve(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
            "--node-listen",
            "127.0.0.1:0",
            "--xds-listen",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_serving(address: str, process: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(
                    f"controller exited early:\n{process.stdout.read() if process.stdout else ''}"
                )
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("controller did not become SERVING")


def test_serve_on_embedded_defaults_then_drain_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    process = _start_serve(tmp_path, port)
    try:
        _wait_serving(f"127.0.0.1:{port}", process)
        keys = sorted((tmp_path / "keys").iterdir())
        assert keys, "development keys were not generated"
        for key in keys:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert (tmp_path / "controller.db").exists()

        async def in_flight_then_sigterm() -> list[object]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
                stub = auth_pb2_grpc.AuthServiceStub(chan)
                health = health_pb2_grpc.HealthStub(chan)
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                calls = [
                    asyncio.ensure_future(
                        stub.Register(
                            auth_pb2.RegisterRequest(email=f"u{i}@example.com", password_hash=PASSWORD)
                        )
                    )
                    for i in range(12)
                ]
                await asyncio.sleep(0.05)
                process.send_signal(signal.SIGTERM)
                # The health stream sees NOT_SERVING, then ends cleanly.
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                return list(await asyncio.gather(*calls, return_exceptions=True))

        results = asyncio.run(in_flight_then_sigterm())
        assert all(isinstance(r, auth_pb2.RegisterResponse) for r in results), results
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "generated development keys" in output
        assert "draining" in output
        assert PASSWORD not in output
        for line in output.splitlines():
            assert "eyJ" not in line, f"a token reached the log: {line}"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_second_start_reuses_the_development_keys(tmp_path: Path) -> None:
    contents = []
    for _ in range(2):
        port = _free_port()
        process = _start_serve(tmp_path, port)
        try:
            _wait_serving(f"127.0.0.1:{port}", process)
            contents.append({p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()})
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            if process.stdout:
                process.stdout.close()
    assert contents[0] == contents[1]


def test_production_without_master_key_refuses_to_start(tmp_path: Path) -> None:
    process = _start_serve(tmp_path, _free_port(), "--environment", "production")
    output, _ = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "A67_MASTER_KEYS" in output
    assert not (tmp_path / "keys").exists()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = _start_serve(tmp_path, port)
        output, _ = process.communicate(timeout=30)
    assert process.returncode != 0
    assert f"127.0.0.1:{port}" in output


@pytest.mark.parametrize("flag", ["--help"])
def test_cli_help(flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", flag], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "serve" in result.stdout
    assert "migrate" in result.stdout


# -- TLS on the user-facing port --------------------------------------------------


def _health_over(channel: grpc.Channel) -> int:
    return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_user_port_with_a_certificate_serves_tls_only(tmp_path: Path) -> None:
    pair = self_signed(tmp_path / "tls")
    port = _free_port()
    process = _start_serve(tmp_path / "data", port, "--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    address = f"127.0.0.1:{port}"
    credentials = grpc.ssl_channel_credentials(root_certificates=pair.cert_pem)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                with grpc.secure_channel(address, credentials) as chan:
                    if _health_over(chan) == health_pb2.HealthCheckResponse.SERVING:
                        break  # NOT_SERVING while it still starts
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "no TLS health answer SERVING in 30 s"
            time.sleep(0.1)
        with grpc.insecure_channel(address) as chan, pytest.raises(grpc.RpcError) as plaintext:
            _health_over(chan)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the certificate is refused too.
        other = self_signed(tmp_path / "other")
        untrusted = grpc.ssl_channel_credentials(root_certificates=other.cert_pem)
        with grpc.secure_channel(address, untrusted) as chan, pytest.raises(grpc.RpcError) as refused:
            _health_over(chan)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "(TLS)" in output


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])  # noqa: S104 (refused, never bound)
def test_production_refuses_a_non_loopback_user_port_without_tls(tmp_path: Path, host: str) -> None:
    process = _start_serve(
        tmp_path, _free_port(), "--environment", "production", "--listen", f"{host}:{_free_port()}"
    )
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2, output
    assert f"A67_LISTEN_ADDRESS (--listen) is '{host}:" in output
    assert "in production a non-loopback address must serve TLS" in output
    assert "--tls-cert and --tls-key" in output
    assert not (tmp_path / "keys").exists()


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    pair = self_signed(tmp_path / "tls")
    process = _start_serve(tmp_path / "data", _free_port(), "--tls-cert", str(pair.cert))
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2, output
    assert "TLS needs both a certificate and a key: A67_TLS_KEY is not set" in output


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    pair, other = self_signed(tmp_path / "a"), self_signed(tmp_path / "b")
    process = _start_serve(
        tmp_path / "data", _free_port(), "--tls-cert", str(pair.cert), "--tls-key", str(other.key)
    )
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2, output
    assert f"Cannot use the TLS certificate {pair.cert} with the key {other.key}" in output
