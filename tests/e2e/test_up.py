"""``a67 up`` as a user runs it: its children die with it however it dies, and TLS end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import psutil
import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc

from tests.e2e.conftest import Rest, free_port, grpcurl_binary
from tests.e2e.test_gateway_rest import A67, register, wait_for_output
from tests.selfsigned import CertPair, self_signed
from tests.support import PASSWORD

BANNER_END = "Press Ctrl-C to stop."


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    return {**env, **extra}


class Up:
    """One ``a67 up`` process with its output in files."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.stdout, self.stderr = workdir / f"up-{uuid.uuid4().hex[:6]}.out", workdir / "up.err"
        with self.stdout.open("wb") as out, self.stderr.open("ab") as err:
            self.process = subprocess.Popen(
                [*A67, "up", *args], stdout=out, stderr=err, start_new_session=True, env=env or clean_env()
            )

    def wait_banner(self) -> str:
        return wait_for_output(self.process, self.stdout, self.stderr, BANNER_END)

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def stop(self, extra: Sequence[psutil.Process] = ()) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for child in extra:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def up_args(
    workdir: Path, http_port: int, grpc_port: int, node_port: int, ingress_port: int = 0, xds_port: int = 0
) -> list[str]:
    return [
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--node-listen",
        f"127.0.0.1:{node_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--ingress-listen",
        f"127.0.0.1:{ingress_port or free_port()}",
        "--xds-listen",
        f"127.0.0.1:{xds_port or free_port()}",
        "--data-dir",
        str(workdir / "data"),
        "--log-level",
        "WARNING",
    ]


# -- process lifetime ---------------------------------------------------------------


def test_children_die_with_a_killed_a67_up_and_the_ports_can_be_reused(tmp_path: Path) -> None:
    ports = free_port(), free_port(), free_port(), free_port(), free_port()
    http_port, grpc_port, _, _, _ = ports
    args = up_args(tmp_path, *ports)  # the same ports again after the kill
    first = Up(tmp_path, *args)
    children: list[psutil.Process] = []
    try:
        first.wait_banner()
        children = first.children()
        assert len(children) == 3, children  # the controller, the gateway and the ingress, nothing between
        names = sorted(" ".join(c.cmdline()) for c in children)
        assert any("controller.cli serve" in n for n in names), names
        assert sum("envoy" in n for n in names) == 2, names

        first.process.kill()  # SIGKILL: no handler runs, nothing is stopped politely
        assert first.process.wait(timeout=10) == -signal.SIGKILL
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert len(gone) == 3
    finally:
        first.stop(children)

    second = Up(tmp_path, *args)
    try:
        banner = second.wait_banner()
        assert f"http://127.0.0.1:{http_port}" in banner
        _, session = register(Rest("127.0.0.1", http_port))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            me = auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(),
                metadata=(("authorization", f"Bearer {session['access_token']}"),),
                timeout=10,
            )
        assert me.user.id == session["user_id"]
    finally:
        children = second.children() if second.process.poll() is None else []
        second.stop(children)
    assert second.process.returncode == 0


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_up(tmp_path_factory: pytest.TempPathFactory, tls_pair: CertPair) -> Iterator[tuple[int, int, str]]:
    """``a67 up --tls-cert --tls-key``: (REST port, gRPC port, banner)."""
    workdir = tmp_path_factory.mktemp("tls-up")
    ports = free_port(), free_port(), free_port()
    up = Up(
        workdir, *up_args(workdir, *ports), "--tls-cert", str(tls_pair.cert), "--tls-key", str(tls_pair.key)
    )
    children: list[psutil.Process] = []
    try:
        banner = up.wait_banner()
        children = up.children()
        yield ports[0], ports[1], banner
    finally:
        up.stop(children)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_binary(), *args], capture_output=True, text=True, timeout=30, check=False)


def test_tls_banner_says_https_and_how_to_call_grpc(tls_up: tuple[int, int, str], tls_pair: CertPair) -> None:
    http_port, _, banner = tls_up
    assert f"https://127.0.0.1:{http_port}" in banner
    assert f"grpcurl -cacert {tls_pair.cert}" in banner


def test_grpcurl_with_the_ca_works_and_plaintext_fails(
    tls_up: tuple[int, int, str], tls_pair: CertPair
) -> None:
    _, grpc_port, _ = tls_up
    address = f"127.0.0.1:{grpc_port}"
    email = f"tls-{uuid.uuid4().hex[:8]}@example.com"
    ok = grpcurl(
        "-cacert",
        str(tls_pair.cert),
        "-d",
        json.dumps({"email": email, "password_hash": PASSWORD}),
        address,
        "automator67.v1.AuthService/Register",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["access_token"].count(".") == 2

    plaintext = grpcurl("-plaintext", address, "list")
    assert plaintext.returncode != 0
    assert "automator67" not in plaintext.stdout
    untrusted = grpcurl(address, "list")  # TLS, but without our CA
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr


def test_curl_with_the_ca_reaches_the_controller_through_the_gateway(
    tls_up: tuple[int, int, str], tls_pair: CertPair
) -> None:
    http_port, _, _ = tls_up
    url = f"https://127.0.0.1:{http_port}/api/v1/auth/register"
    body = json.dumps({"email": f"curl-{uuid.uuid4().hex[:8]}@example.com", "password_hash": PASSWORD})
    for http in ("--http1.1", "--http2"):
        result = subprocess.run(
            [
                "curl",
                "-sS",
                http,
                "--cacert",
                str(tls_pair.cert),
                "-w",
                "\n%{http_code} %{http_version}",
                "-X",
                "POST",
                url,
                "-d",
                body.replace("curl-", f"curl{http[-1]}-"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        payload, status = result.stdout.rsplit("\n", 1)
        assert status == ("201 1.1" if http == "--http1.1" else "201 2"), result.stdout
        assert json.loads(payload)["access_token"].count(".") == 2


def test_urllib_with_the_ca_works_and_plaintext_http_fails(
    tls_up: tuple[int, int, str], tls_pair: CertPair
) -> None:
    http_port, _, _ = tls_up
    context = ssl.create_default_context(cafile=str(tls_pair.cert))
    with urllib.request.urlopen(
        f"https://127.0.0.1:{http_port}/healthz", context=context, timeout=10
    ) as reply:
        assert (reply.status, reply.read()) == (200, b"ok\n")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://127.0.0.1:{http_port}/healthz", context=ssl.create_default_context(), timeout=10
        )


@pytest.mark.parametrize("command", ["up", "gateway"])
def test_production_on_a_public_address_without_tls_refuses_to_start(tmp_path: Path, command: str) -> None:
    public = f"0.0.0.0:{free_port()}"
    listen = (
        ["--http-listen", public, "--data-dir", str(tmp_path)] if command == "up" else ["--listen", public]
    )
    result = subprocess.run(
        [*A67, command, *listen],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(A67_ENVIRONMENT="production"),
    )
    assert result.returncode == 1, result.stderr
    assert f"A67_GATEWAY_LISTEN_ADDRESS (--listen, --http-listen) is '{public}'" in result.stderr
    assert "in production a non-loopback address must serve TLS" in result.stderr
    assert "--tls-cert and --tls-key" in result.stderr


def test_production_up_with_a_public_grpc_port_without_tls_refuses(tmp_path: Path) -> None:
    public = f"0.0.0.0:{free_port()}"
    result = subprocess.run(
        [*A67, "up", "--grpc-listen", public, "--data-dir", str(tmp_path), "--environment", "production"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert result.returncode == 1, result.stderr
    assert f"A67_LISTEN_ADDRESS (--listen) is '{public}'" in result.stderr
    assert "in production a non-loopback address must serve TLS" in result.stderr
