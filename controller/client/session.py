"""A connection to the controller's user-facing gRPC port, with the signed-in session.

Every authenticated call sends ``authorization: Bearer <access token>``. An access token
that expires within :data:`REFRESH_MARGIN_SECONDS` (or that the controller calls expired)
is exchanged first with ``AuthService.Refresh`` for a new one and a rotated refresh token,
under a file lock so that concurrent ``a67`` processes never present the same
(single-use) refresh token twice. A session the controller has ended or that has
expired is forgotten, and the error says how to sign in again.

Addresses: ``host:port`` (plaintext; meant for loopback), ``https://host:port`` (TLS with
the system's roots), or either with ``--ca-cert``/``A67_CA_CERT`` (TLS with that CA).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from automator67.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    deployment_pb2_grpc,
    metrics_pb2_grpc,
    node_pb2_grpc,
    query_pb2_grpc,
    storage_pb2_grpc,
)

from controller.client.config import CredentialStore, StoredSession
from controller.client.errors import AUTH, SIGN_IN_AGAIN, USAGE, CliError, from_rpc_error

CTRL_C = threading.Event()
"""Set by the CLI's SIGINT handler (:func:`controller.client.main.main`) on Ctrl-C."""

REFRESH_MARGIN_SECONDS = 30.0
"""Refresh an access token that expires within this many seconds."""

DEFAULT_TIMEOUT = 60.0
"""Deadline of a unary call, in seconds."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest response accepted (query results can be large)."""

Reply = TypeVar("Reply")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def not_signed_in(address: str) -> CliError:
    return CliError(
        f"You are not signed in to the controller at {address}.",
        exit_code=AUTH,
        reason="NOT_SIGNED_IN",
        hint="sign in with: a67 login (or create an account with: a67 register)",
    )


def _target(address: str) -> tuple[str, bool]:
    """(host:port, TLS by scheme) of an address as the user wrote it."""
    for scheme, tls in (("https://", True), ("grpcs://", True), ("http://", False), ("grpc://", False)):
        if address.startswith(scheme):
            return address[len(scheme) :].rstrip("/"), tls
    return address.rstrip("/"), False


class Connection:
    """Stubs of every user-facing service on one channel, plus the stored session."""

    def __init__(self, address: str, config_dir: Path, *, ca_cert: str = "") -> None:
        self.address = address
        self.store = CredentialStore(config_dir)
        self._ca_cert = ca_cert

    @functools.cached_property
    def channel(self) -> grpc.Channel:
        target, tls = _target(self.address)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if not (tls or self._ca_cert):
            return grpc.insecure_channel(target, options=options)
        root: bytes | None = None
        if self._ca_cert:
            try:
                root = Path(self._ca_cert).read_bytes()
            except OSError as exc:
                raise CliError(
                    f"Cannot read the CA certificate {self._ca_cert}: {exc.strerror}.",
                    exit_code=USAGE,
                    reason="BAD_CA_CERT",
                ) from None
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)

    @functools.cached_property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @functools.cached_property
    def nodes(self) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self.channel)

    @functools.cached_property
    def deployments(self) -> deployment_pb2_grpc.DeploymentServiceStub:
        return deployment_pb2_grpc.DeploymentServiceStub(self.channel)

    @functools.cached_property
    def query(self) -> query_pb2_grpc.QueryServiceStub:
        return query_pb2_grpc.QueryServiceStub(self.channel)

    @functools.cached_property
    def metrics(self) -> metrics_pb2_grpc.MetricsServiceStub:
        return metrics_pb2_grpc.MetricsServiceStub(self.channel)

    @functools.cached_property
    def storage(self) -> storage_pb2_grpc.StorageServiceStub:
        return storage_pb2_grpc.StorageServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel, unless Ctrl-C interrupted this process: then a call may have
        been cut off mid-way in the main thread, and ``Channel.close`` can deadlock
        (grpc/grpc#19973; seen with ``a67 metrics --watch``). The process is ending: the
        kernel closes its sockets."""
        if "channel" in self.__dict__ and not CTRL_C.is_set():
            self.channel.close()

    # -- the session ----------------------------------------------------------------

    def stored(self) -> StoredSession:
        session = self.store.get(self.address)
        if session is None:
            raise not_signed_in(self.address)
        return session

    def save_session(self, email: str, user_id: str, access: str, refresh: str, expires_in: int) -> None:
        self.store.put(
            self.address,
            StoredSession(email, user_id, access, refresh, time.time() + max(0, expires_in)),
        )

    def access_token(self) -> str:
        session = self.stored()
        if session.expires_within(REFRESH_MARGIN_SECONDS):
            session = self.refresh(session.access_token)
        return session.access_token

    def refresh(self, stale_access_token: str) -> StoredSession:
        """A fresh session: another process's refresh if it already happened, else our own."""
        with self.store.locked():
            current = self.stored()
            if current.access_token != stale_access_token and not current.expires_within(
                REFRESH_MARGIN_SECONDS
            ):
                return current
            try:
                reply = self.auth.Refresh(
                    auth_pb2.RefreshRequest(), metadata=bearer(current.refresh_token), timeout=DEFAULT_TIMEOUT
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err, address=self.address)
                if error.exit_code == AUTH:
                    raise self._session_over(error) from None
                raise error from None
            self.save_session(
                current.email, current.user_id, reply.access_token, reply.refresh_token, reply.expires_in
            )
            return self.stored()

    def _session_over(self, error: CliError) -> CliError:
        self.store.remove(self.address)
        return CliError(
            f"Your session at {self.address} has expired or was ended: {error.message}",
            exit_code=AUTH,
            reason=error.reason,
            hint=SIGN_IN_AGAIN,
        )

    # -- calls ------------------------------------------------------------------------

    def call(
        self,
        method: Callable[..., Reply],
        request: Any,
        *,
        auth: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Reply:
        """A unary (or client-streaming) call; signed in unless ``auth`` is false."""
        if not auth:
            try:
                return method(request, timeout=timeout)
            except grpc.RpcError as err:
                raise from_rpc_error(err, address=self.address) from None
        token = self.access_token()
        for attempt in (1, 2):
            try:
                return method(request, metadata=bearer(token), timeout=timeout)
            except grpc.RpcError as err:
                error = from_rpc_error(err, address=self.address)
                if error.exit_code != AUTH:
                    raise error from None
                if error.reason == "TOKEN_EXPIRED" and attempt == 1:
                    token = self.refresh(token).access_token
                    continue
                raise self._session_over(error) from None
        raise AssertionError("unreachable")

    def stream(self, method: Callable[..., Any], request: Any) -> Stream:
        """A server-streaming call (see :class:`Stream`)."""
        return Stream(self, method, request)


class Stream:
    """The messages of a server-streaming call; errors become :class:`CliError`.

    If the controller ends the stream because the access token expired, the token is
    refreshed and the stream opened again (a watch then starts from the current state).
    :meth:`cancel` (from any thread) ends it quietly.
    """

    def __init__(self, conn: Connection, method: Callable[..., Any], request: Any) -> None:
        self._conn = conn
        self._method = method
        self._request = request
        self._call: Any = None
        self._cancelled = False

    def __iter__(self) -> Iterator[Any]:
        conn = self._conn
        token = conn.access_token()
        while not self._cancelled:
            self._call = self._method(self._request, metadata=bearer(token))
            if self._cancelled:
                self._call.cancel()
            try:
                yield from self._call
                return
            except grpc.RpcError as err:
                if self._cancelled:
                    return
                error = from_rpc_error(err, address=conn.address)
                if error.exit_code != AUTH:
                    raise error from None
                if error.reason != "TOKEN_EXPIRED":
                    raise conn._session_over(error) from None
                token = conn.refresh(token).access_token

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
